"""One line from an error: dinodet's contract with users is one line per problem."""
from __future__ import annotations


def first_line(error: BaseException | str) -> str:
    """The first line of ``error``'s message (an exception or a text); for an empty message, the
    exception's type name (or ``"unknown error"`` for an empty text)."""
    lines = str(error).strip().splitlines()
    if lines:
        return lines[0]
    return type(error).__name__ if isinstance(error, BaseException) else "unknown error"
