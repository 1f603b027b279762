"""dinodet's error family and the one-line rule.

Every error meant for a user derives from ``DinodetError`` and carries a one-line message that
names the file or setting at fault; the CLI catches this one type and prints ``dinodet: error:``.
The concrete classes live here, so that any module can raise them without importing another
part of the package (they are also importable from the module that mostly raises them).
"""
from __future__ import annotations


class DinodetError(Exception):
    """Base of the errors whose message is meant for users (one line, naming the file)."""


class ConfigError(DinodetError, ValueError):
    """A config key or value that does not exist or does not fit."""


class CheckpointError(DinodetError, ValueError):
    """A checkpoint that cannot be read or does not fit the requested model (one-line message)."""


class ImageLoadError(DinodetError, ValueError):
    """An image file that is missing, unreadable or not a decodable image (one-line message)."""


class DatasetError(DinodetError, ValueError):
    """A dataset that cannot be used at all (layout not found, annotation file unparsable); one-line message."""


class TrainingError(DinodetError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); one-line message."""


class ExportError(DinodetError, ValueError):
    """An export that cannot be done as asked (one-line message)."""


def first_line(error: BaseException | str) -> str:
    """The first line of ``error``'s message (an exception or a text); for an empty message, the
    exception's type name (or ``"unknown error"`` for an empty text)."""
    lines = str(error).strip().splitlines()
    if lines:
        return lines[0]
    return type(error).__name__ if isinstance(error, BaseException) else "unknown error"
