"""``dinodet.errors.first_line``: the one line a user sees of an error."""
from dinodet.errors import first_line


def test_first_line_of_exceptions_and_texts():
    assert first_line(ValueError("  bad value\nsecond line\n")) == "bad value"
    assert first_line(KeyError()) == "KeyError"  # no message: the type says what happened
    assert first_line("\n  two\nlines") == "two"
    assert first_line("   ") == "unknown error"


def test_user_errors_share_one_base_and_keep_their_old_types():
    """The CLI catches DinodetError alone; code that caught ValueError / RuntimeError still works."""
    import dinodet
    from dinodet import errors

    for name in ("ConfigError", "CheckpointError", "ImageLoadError", "DatasetError", "ExportError"):
        cls = getattr(dinodet, name)
        assert issubclass(cls, errors.DinodetError) and issubclass(cls, ValueError), name
    assert issubclass(dinodet.TrainingError, errors.DinodetError) and issubclass(dinodet.TrainingError, RuntimeError)
    # the modules that raise them name the same classes
    from dinodet.checkpoint import CheckpointError
    from dinodet.config import ConfigError
    from dinodet.data.images import ImageLoadError
    from dinodet.data.report import DatasetError, SplitNotFoundError

    assert (CheckpointError, ConfigError, ImageLoadError, DatasetError) == (
        errors.CheckpointError, errors.ConfigError, errors.ImageLoadError, errors.DatasetError)
    assert issubclass(SplitNotFoundError, errors.DinodetError)
