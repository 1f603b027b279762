"""Pictures written by ``dinodet.engine.plots`` say their warnings through dinodet's log."""
from __future__ import annotations

import warnings
from pathlib import Path

from dinodet.engine.plots import plot_class_counts


def test_matplotlib_warnings_are_logged_naming_the_picture(tmp_path: Path, capsys):
    from dinodet.cli import printed_logs

    path = tmp_path / "counts.png"
    with warnings.catch_warnings(), printed_logs():
        warnings.simplefilter("error")  # a warning reaching Python's own printing fails the test
        plot_class_counts({"\u732b": 3, "dog": 1}, path)  # a class name the default font has no glyph for
    err = capsys.readouterr().err.splitlines()
    assert path.is_file()
    assert len(err) == 1 and err[0].startswith(f"dinodet: warning: {path}: Glyph 29483"), err
    assert "missing from font" in err[0]
