"""Which layout a dataset folder is in (``--format auto``), and split-name aliases shared by the
layouts.

Detection looks only at file names, in an order that keeps the layouts apart even on
case-insensitive file systems (COCO's ``annotations/`` holds JSON, VOC's ``Annotations/`` XML):

* ``coco``: ``annotations/*.json``;
* ``roboflow``: ``SPLIT/_annotations.coco.json`` (Roboflow's COCO export, RF-DETR's default);
* ``voc``: ``Annotations/*.xml`` (Pascal VOC);
* ``cvat``: ``annotations.xml`` (CVAT for images 1.1);
* ``yolo``: ``labels/``, ``SPLIT/labels/`` or a ``*.yaml`` (Ultralytics layouts).

A folder matching none is read as COCO, whose error then lists the paths it tried.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .report import SplitNotFoundError

logger = logging.getLogger(__name__)

LAYOUTS = ("coco", "yolo", "roboflow", "voc", "cvat")
FORMATS = ("auto", *LAYOUTS)
ROBOFLOW_ANNOTATIONS = "_annotations.coco.json"
CVAT_ANNOTATIONS = "annotations.xml"


def split_aliases(split: str) -> list[str]:
    """Names a split may go by: ``val`` is ``valid`` in Roboflow exports, ``validation`` elsewhere."""
    if split == "val":
        return ["val", "valid", "validation"]
    if split in ("valid", "validation"):
        return [split, "val"]
    return [split]


def looks_like_yolo(root: Path) -> bool:
    return (root / "labels").is_dir() or any(root.glob("*/labels")) or any(root.glob("*.yaml"))


def detect_format(root: str | Path) -> str | None:
    """The layout of ``root`` (see the module docstring), or ``None`` when none matches."""
    root = Path(root)
    if (root / "annotations").is_dir() and any((root / "annotations").glob("*.json")):
        return "coco"
    if any(root.glob(f"*/{ROBOFLOW_ANNOTATIONS}")):
        return "roboflow"
    if (root / "Annotations").is_dir() and any((root / "Annotations").glob("*.xml")):
        return "voc"
    if (root / CVAT_ANNOTATIONS).is_file():
        return "cvat"
    if looks_like_yolo(root):
        return "yolo"
    return None


def resolve_format(root: str | Path, format: str) -> str:
    """``format`` itself, or for ``auto`` the detected layout (COCO when none is recognised)."""
    if format != "auto":
        return format
    found = detect_format(root)
    logger.debug("'%s': %s", root, f"{found} layout (detected)" if found else "no layout recognised; reading it as COCO")
    return found or "coco"


def resolve_roboflow_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of a Roboflow COCO export's ``split``; the images lie beside
    the annotation file, and ``val`` is found as ``valid``."""
    root = Path(root)
    tried = [root / s / ROBOFLOW_ANNOTATIONS for s in split_aliases(split)]
    for ann in tried:
        if ann.is_file():
            return ann, ann.parent
    raise SplitNotFoundError(f"Roboflow annotations of split '{split}' not found; tried: "
                             + ", ".join(str(t) for t in tried))


def drop_roboflow_placeholder(data: dict) -> None:
    """Remove the category a Roboflow export adds for the dataset itself (``supercategory: none``,
    no box, the supercategory of the real classes), which would otherwise become an empty class."""
    cats = data.get("categories")
    if not isinstance(cats, list) or not all(isinstance(c, dict) for c in cats):
        return
    used = {a.get("category_id") for a in data.get("annotations") or [] if isinstance(a, dict)}
    parents = {c.get("supercategory") for c in cats}
    data["categories"] = [c for c in cats if not (c.get("supercategory") == "none" and c.get("id") not in used
                                                  and c.get("name") in parents)]
