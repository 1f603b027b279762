"""CVAT "for images 1.1" exports, converted on load to the COCO-format dict that
``coco.index_coco`` cleans.

Layout: ``ROOT/annotations.xml`` and the images in ``ROOT/images/`` (or ``ROOT/images/SUBSET/``).
Each ``<image name width height subset?>`` holds ``<box label xtl ytl xbr ybr occluded>`` in
continuous pixel coordinates (COCO's frame).  Splits are the ``subset`` attribute's values (``val``
also finds ``valid``/``Validation``, case does not matter); an export without subsets, or with one,
is a single split that ``train`` (and its own name) names.  Classes are the ``<meta>`` labels in
their order, else the boxes' labels sorted; category id = position + 1.  Shapes other than boxes
(polygons, points, ...) are counted and ignored.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

from .layouts import CVAT_ANNOTATIONS, split_aliases
from .report import DataReport, SplitNotFoundError
from .xmlsafe import child_text, number, parse_xml
from .yolo import SOURCE_KEY, file_image_ids

_SHAPES = ("polygon", "polyline", "points", "mask", "ellipse", "cuboid", "skeleton", "tag")


def resolve_cvat_split(root: str | Path, split: str) -> tuple[Path, Element, list[Element]]:
    """(annotation file, its parsed root, the ``<image>`` entries of ``split``)."""
    ann = Path(root) / CVAT_ANNOTATIONS
    if not ann.is_file():
        raise SplitNotFoundError(f"no CVAT '{CVAT_ANNOTATIONS}' in '{root}'")
    xml = parse_xml(ann)
    entries = xml.findall("image")
    subsets = list(dict.fromkeys(e.get("subset", "") for e in entries))
    wanted = {s.lower() for s in split_aliases(split)}
    if len(subsets) <= 1 and (split == "train" or subsets[:1] == [split]):
        return ann, xml, entries
    chosen = {s for s in subsets if s.lower() in wanted}
    if not chosen:
        have = ", ".join(f"'{s}'" for s in subsets if s) or "none (one split: 'train')"
        raise SplitNotFoundError(f"CVAT split '{split}' not found in {ann}; its subsets: {have}")
    return ann, xml, [e for e in entries if e.get("subset", "") in chosen]


def cvat_to_coco(root: str | Path, split: str, report: DataReport) -> tuple[dict[str, Any], Path, str]:
    """(COCO-format dict, image folder, source name) of a CVAT ``split``.  Boxes without four numbers
    and labels missing from ``<meta>`` are reported (one line each) and skipped."""
    ann, xml, entries = resolve_cvat_split(root, split)
    img_dir = Path(root) / "images"
    names = list(dict.fromkeys(n for n in (child_text(lb, "name") for lb in xml.iterfind("meta//labels/label")) if n))
    declared = bool(names)
    if not declared:
        names = sorted({b.get("label", "") for e in xml.iterfind("image") for b in e.findall("box")} - {""})
    cat_ids = {n: i + 1 for i, n in enumerate(names)}

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    others: Counter[str] = Counter()
    file_names = [e.get("name", "") for e in entries]
    for entry, name, image_id in zip(entries, file_names, file_image_ids([Path(n).stem for n in file_names])):
        if not name:
            report.add("invalid_annotations", f"{ann}: <image id='{entry.get('id')}'> has no name; skipped")
            continue
        subset = entry.get("subset", "")
        in_subset = Path(subset) / name
        file_name = in_subset.as_posix() if subset and (img_dir / in_subset).is_file() else name
        images.append({"id": image_id, "file_name": file_name, "width": _size(entry.get("width")),
                       "height": _size(entry.get("height"))})
        for tag in _SHAPES:
            others[tag] += len(entry.findall(tag))
        for k, box in enumerate(entry.findall("box"), 1):
            where = f"{ann}: image '{name}' box {k}"
            label = box.get("label")
            coords = [number(box.get(t)) for t in ("xtl", "ytl", "xbr", "ybr")]
            if label is None or None in coords:
                report.add("invalid_annotations", f"{where}: no label or no four-number xtl/ytl/xbr/ybr; skipped")
                continue
            if label not in cat_ids:
                report.add("unknown_category", f"{where}: label '{label}' is not among the task's labels; skipped")
                continue
            x1, y1, x2, y2 = coords
            w, h = x2 - x1, y2 - y1  # type: ignore[operator]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[label],
                                "bbox": [x1, y1, w, h], "area": max(w, 0) * max(h, 0), "iscrowd": 0,
                                SOURCE_KEY: f"{where} ('{label}')"})
    if sum(others.values()):
        shapes = ", ".join(f"{n} {t}" for t, n in others.items() if n)
        report.note(f"{ann}: {shapes} ignored (only boxes are read)")
    categories = [{"id": i, "name": n, "supercategory": ""} for n, i in cat_ids.items()]
    return ({"info": {"description": f"converted from CVAT annotations {ann}"}, "images": images,
             "annotations": annotations, "categories": categories}, img_dir, str(ann))


def _size(text: str | None) -> int:
    value = number(text)
    return int(value) if value and value > 0 else 0  # 0: read from the image
