"""Writing result files so that a reader (or a crash) never sees half of one."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def json_text(data: Any) -> str:
    """A list as one element per line (valid JSON that is still easy to grep and diff, e.g. COCO
    result records); anything else indented."""
    if isinstance(data, list):
        return "[\n" + ",\n".join(json.dumps(x) for x in data) + ("\n]\n" if data else "]\n")
    return json.dumps(data, indent=2) + "\n"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON (``json_text``) to ``path`` through a temporary file and a rename.

    The temporary file lives in the same folder because ``os.replace`` is atomic only within one
    file system; a plain ``open`` (not ``mkstemp``) keeps the usual umask permissions.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json_text(data))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
