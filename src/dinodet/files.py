"""Writing result files so that a reader (or a crash) never sees half of one, and never over a
user's own files (a manifest in each output folder lists what dinodet wrote there)."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
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


def check_out_file(path: Path, name: str = "--out") -> None:
    """Before the slow work: ``path`` can be written as a file (it is no folder, and its folder is
    or can be made writable), so that a long export does not end on an unwritable output.

    Raises:
        ConfigError: a folder is in the way, or no permission to write.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{name} '{path}' is a folder; it must be a file name")
    check_out_folder(path.parent, f"{name} '{path}': its folder")


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


# The files dinodet wrote in an output folder.  dinodet replaces or deletes only files it can show it
# wrote (they are listed here): a user's file of the same name is never touched without --overwrite.
OUTPUTS_MANIFEST = ".dinodet-outputs.json"


def dinodet_outputs(folder: Path) -> dict[str, str]:
    """The files of ``folder`` that dinodet wrote (name -> command), as its manifest lists them.  A
    missing or unreadable manifest proves nothing: every file is then foreign."""
    try:
        files = json.loads((Path(folder) / OUTPUTS_MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(files, dict):
        return {}
    # plain names only: a manifest edited to name '../x' must not reach outside the folder
    return {k: v for k, v in files.items()
            if isinstance(k, str) and isinstance(v, str) and k not in ("", ".", "..") and "/" not in k
            and os.sep not in k}


def foreign_files(folder: Path, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that exist in ``folder`` (as anything: a file, a folder, a link) but are not
    dinodet's (``dinodet_outputs``): the files that writing ``names`` would replace."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = dinodet_outputs(folder)
    return [n for n in dict.fromkeys(names) if n not in ours and os.path.lexists(folder / n)]


def check_not_foreign(folder: Path, names: Iterable[str], *, overwrite: bool = False, name: str = "--out") -> None:
    """Before the slow work: writing ``names`` into ``folder`` replaces no file dinodet did not write,
    unless ``overwrite``.  ``name`` is the option the message names.

    Raises:
        ConfigError: naming the first such file.
    """
    foreign = [] if overwrite else foreign_files(folder, names)
    if foreign:
        raise ConfigError(f"{name} '{folder}' holds '{foreign[0]}', which dinodet did not write; choose another "
                          "folder or pass --overwrite")


def record_outputs(folder: Path, names: Iterable[str], command: str) -> None:
    """Add ``names`` (files just written into ``folder`` by ``command``) to the folder's manifest,
    so that a later run may replace them."""
    names = list(names)
    if names:
        files = {**dinodet_outputs(folder), **dict.fromkeys(names, command)}
        write_json_atomic(Path(folder) / OUTPUTS_MANIFEST, {"files": dict(sorted(files.items()))})


def remove_outputs(folder: Path, keep: Iterable[str]) -> None:
    """Delete the files of ``folder`` that dinodet wrote (its manifest lists them) except ``keep``:
    an earlier run's leftovers; anything else stays."""
    keep = set(keep)
    ours = dinodet_outputs(folder)
    stale = [n for n in ours if n not in keep]
    for n in stale:
        path = Path(folder) / n
        if path.is_symlink() or path.is_file():
            path.unlink()
    if stale:
        write_json_atomic(Path(folder) / OUTPUTS_MANIFEST, {"files": {n: c for n, c in ours.items() if n in keep}})
