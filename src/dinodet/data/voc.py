"""Pascal VOC datasets, converted on load to the COCO-format dict that ``coco.index_coco`` cleans.

Layout::

    ROOT/Annotations/*.xml                          one file per image
    ROOT/JPEGImages/*.jpg
    ROOT/ImageSets/Main/{train,val,trainval,test}.txt   image ids of each split
    ROOT/labels.txt                                 optional: class names, one a line, in class order

Without ``ImageSets/Main`` every annotation file belongs to the ``train`` split.  Class names come
from ``labels.txt``, else from every annotation file (not just the split's, so that all splits get
the same classes), sorted; category id = position + 1.  Boxes are VOC's 1-based inclusive pixel
indices, converted as detectron2 does (``xmin - 1, ymin - 1, xmax, ymax`` in continuous
coordinates).  ``difficult`` objects become ``iscrowd`` annotations: left out of training, and
COCOeval neither rewards nor penalises detections on them, which is VOC's rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .layouts import split_aliases
from .report import DataReport, DatasetError, SplitNotFoundError
from .xmlsafe import child_text, number, parse_xml
from .yolo import SOURCE_KEY, file_image_ids, read_names

LABELS_FILE = "labels.txt"


@dataclass
class _VocObject:
    name: str | None
    box: tuple[float, float, float, float] | None  # xmin, ymin, xmax, ymax as written
    difficult: bool


@dataclass
class _VocRecord:
    file_name: str
    width: int
    height: int
    objects: list[_VocObject] = field(default_factory=list)


def resolve_voc_paths(root: str | Path, split: str) -> tuple[Path, Path, list[str], Path]:
    """(annotation folder, image folder, image ids of ``split``, where the ids come from)."""
    root = Path(root)
    ann_dir, img_dir, sets = root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main"
    if not ann_dir.is_dir():
        raise SplitNotFoundError(f"no VOC 'Annotations' folder in '{root}'")
    if not sets.is_dir():
        if split != "train":
            raise SplitNotFoundError(f"'{root}' has no ImageSets/Main, so all its images are the 'train' split; "
                                     f"there is no '{split}'")
        return ann_dir, img_dir, sorted(p.stem for p in ann_dir.glob("*.xml")), ann_dir
    tried = [sets / f"{s}.txt" for s in split_aliases(split)]
    for ids_file in tried:
        if ids_file.is_file():
            return ann_dir, img_dir, _read_ids(ids_file), ids_file
    raise SplitNotFoundError(f"VOC split '{split}' not found; tried: " + ", ".join(str(t) for t in tried))


def _read_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read the image ids in '{path}': {e}") from None
    return [ln.split()[0] for ln in lines if ln.strip()]


def voc_to_coco(root: str | Path, split: str, report: DataReport) -> tuple[dict[str, Any], Path, str]:
    """(COCO-format dict, image folder, source name) of a VOC ``split``.  Unreadable or unsafe XML
    files, ids without an annotation file, boxes without four numbers and names outside
    ``labels.txt`` are reported (one line each) and skipped."""
    root = Path(root)
    ann_dir, img_dir, ids, source = resolve_voc_paths(root, split)
    labels_file = root / LABELS_FILE
    scanned = ids if labels_file.is_file() else sorted(p.stem for p in ann_dir.glob("*.xml"))
    records: dict[str, _VocRecord | str] = {}  # id -> record, or why it cannot be read
    for stem in dict.fromkeys(scanned):
        path = ann_dir / f"{stem}.xml"
        if path.is_file():
            try:
                records[stem] = _read_record(path)
            except DatasetError as e:
                records[stem] = str(e)
    if labels_file.is_file():
        names = read_names(labels_file)
    else:
        names = sorted({o.name for r in records.values() if isinstance(r, _VocRecord) for o in r.objects if o.name})
    cat_ids = {n: i + 1 for i, n in enumerate(names)}

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for stem, image_id in zip(ids, file_image_ids(ids)):
        record = records.get(stem)
        xml = ann_dir / f"{stem}.xml"
        if record is None:
            report.add("orphan_annotations", f"{source}: image id '{stem}' has no annotation file {xml}; skipped")
            continue
        if isinstance(record, str):
            report.add("invalid_annotations", f"{record}; skipped")
            continue
        images.append({"id": image_id, "file_name": record.file_name, "width": record.width,
                       "height": record.height})
        for k, obj in enumerate(record.objects, 1):
            where = f"{xml}: object {k}"
            if obj.box is None or obj.name is None:
                report.add("invalid_annotations", f"{where}: no <name> or no four-number <bndbox>; skipped")
                continue
            if obj.name not in cat_ids:
                report.add("unknown_category", f"{where}: label '{obj.name}' is not in {labels_file}; skipped")
                continue
            xmin, ymin, xmax, ymax = obj.box
            w, h = xmax - xmin + 1, ymax - ymin + 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[obj.name],
                                "bbox": [xmin - 1, ymin - 1, w, h], "area": max(w, 0) * max(h, 0),
                                "iscrowd": int(obj.difficult), SOURCE_KEY: f"{where} ('{obj.name}')"})
    categories = [{"id": i, "name": n, "supercategory": ""} for n, i in cat_ids.items()]
    return ({"info": {"description": f"converted from Pascal VOC annotations in {ann_dir}"}, "images": images,
             "annotations": annotations, "categories": categories}, img_dir, str(source))


def _read_record(path: Path) -> _VocRecord:
    root = parse_xml(path)
    size = root.find("size")
    width = number(child_text(size, "width")) if size is not None else None
    height = number(child_text(size, "height")) if size is not None else None
    objects = []
    for obj in root.findall("object"):
        box_el = obj.find("bndbox")
        coords = [number(child_text(box_el, t)) for t in ("xmin", "ymin", "xmax", "ymax")] if box_el is not None else []
        box = (coords[0], coords[1], coords[2], coords[3]) if len(coords) == 4 and None not in coords else None
        objects.append(_VocObject(child_text(obj, "name"), box,  # type: ignore[arg-type]
                                  child_text(obj, "difficult") in ("1", "true")))
    return _VocRecord(child_text(root, "filename") or f"{path.stem}.jpg",
                      int(width) if width else 0, int(height) if height else 0, objects)  # 0: read from the image
