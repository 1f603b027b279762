"""``dinodet.errors.first_line``: the one line a user sees of an error."""
from dinodet.errors import first_line


def test_first_line_of_exceptions_and_texts():
    assert first_line(ValueError("  bad value\nsecond line\n")) == "bad value"
    assert first_line(KeyError()) == "KeyError"  # no message: the type says what happened
    assert first_line("\n  two\nlines") == "two"
    assert first_line("   ") == "unknown error"
