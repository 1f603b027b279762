"""Writing result files so that a reader (or a crash) never sees half of one."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError


def check_out_folder(out_dir: Path, name: str = "--out") -> None:
    """Before the slow work: ``out_dir`` must be (or become, with its parents) a folder we can write
    in, so that a long run does not end on an unwritable output.  ``name`` is the option the
    message names.

    Raises:
        ConfigError: a file is in the way, or no permission to write.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{name} '{out_dir}' is a file; it must be a folder (created if needed)")
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{name} '{out_dir}': '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} '{out_dir}': no permission to write in '{existing}'")


def json_text(data: Any) -> str:
    """A list as one element per line (valid JSON that is still easy to grep and diff, e.g. COCO
    result records); anything else indented."""
    if isinstance(data, list):
        return "[\n" + ",\n".join(json.dumps(x) for x in data) + ("\n]\n" if data else "]\n")
    return json.dumps(data, indent=2) + "\n"


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``.

    The temporary file lives in the same folder because ``os.replace`` is atomic only within one
    file system; its name keeps the suffix (image writers pick the format from it), and a plain
    ``open`` (not ``mkstemp``) keeps the usual umask permissions.
    """
    path = Path(path)
    # the stem is shortened: a name near the file system's 255-byte limit must still get a temporary
    tmp = path.with_name(f".{path.stem[:64]}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # name the file the user asked for, not the temporary one
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON (``json_text``) to ``path`` atomically (``write_atomic``)."""
    write_atomic(path, lambda tmp: tmp.write_text(json_text(data), encoding="utf-8"))


def save_image_atomic(image: Any, path: Path, **options: Any) -> None:
    """``image.save(path, **options)`` (a PIL image) atomically (``write_atomic``)."""
    write_atomic(path, lambda tmp: image.save(tmp, **options))
