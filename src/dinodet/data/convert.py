"""Rewrite a dataset in another layout (what ``dinodet convert`` runs).

Every split is read through the readers training uses (``coco.build_index``: any of
``layouts.FORMATS``), so the output holds what training would see: the same cleaning, and each
bad item reported in one line and left out (a missing image, a box outside the image, ...).
Targets:

* ``coco``: ``OUT/annotations/instances_SPLIT.json`` + ``OUT/images/SPLIT/``, the source's image
  and category ids kept;
* ``yolo``: ``OUT/images/SPLIT/`` + ``OUT/labels/SPLIT/*.txt`` + ``OUT/data.yaml`` (class index =
  position in the class list);
* ``voc``: ``OUT/Annotations/*.xml`` + ``OUT/JPEGImages/`` + ``OUT/ImageSets/Main/SPLIT.txt`` +
  ``OUT/labels.txt`` (the class order).

Boxes are written so that the readers read them back: VOC's 1-based ``xmin = x + 1``, ``xmax = x + w``,
YOLO's fractions of the annotated size, 12 significant digits, so a round trip changes a coordinate
by less than 1e-6 pixel.  Crowd boxes become VOC
``difficult`` objects (both are ignored by the evaluation); YOLO has no such flag, so they are left
out of a YOLO export with one note.  Image files are copied, each atomically.
"""
from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, SubElement, indent, tostring

import yaml

from ..errors import ConfigError
from ..files import json_text, write_atomic
from .coco import DatasetIndex, build_index, check_data_root
from .layouts import resolve_format
from .report import DataReport, DatasetError
from .splits import DataSpec, split_exists

logger = logging.getLogger(__name__)

TARGETS = ("coco", "yolo", "voc")
DEFAULT_SPLITS = ("train", "val", "test")


@dataclass
class ConvertResult:
    """What ``convert_dataset`` wrote: per split the images and boxes, and the data reports."""

    out: Path
    target: str
    source_format: str
    images: dict[str, int] = field(default_factory=dict)
    boxes: dict[str, int] = field(default_factory=dict)
    reports: dict[str, DataReport] = field(default_factory=dict)
    skipped: int = 0  # items left out by the conversion itself (besides the readers' reports)

    def summary(self) -> str:
        parts = [f"{s}: {self.images[s]} images, {self.boxes[s]} boxes" for s in self.images]
        return f"{self.source_format} -> {self.target} in {self.out} ({'; '.join(parts)})"


def convert_dataset(data: str | Path, to: str, out: str | Path, *, format: str = "auto",
                    splits: list[str] | None = None, progress: bool = True) -> ConvertResult:
    """Write the ``splits`` of ``data`` (default: those of train, val and test it has) in layout
    ``to`` (one of ``TARGETS``) into the new folder ``out``.

    Raises:
        ConfigError: unknown target, ``out`` not empty or inside ``data``.
        DatasetError: ``data`` unreadable, a named split missing, nothing to convert.
    """
    if to not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)}, got '{to}'")
    check_data_root(data)
    data, out = Path(data), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out '{out}' exists and is not an empty folder; choose a new one")
    if out.resolve().is_relative_to(data.resolve()):  # the output would be read as part of the data
        raise ConfigError(f"--out '{out}' is inside --data '{data}'; choose a folder outside it")
    source = resolve_format(data, format)
    spec = DataSpec(str(data), source)
    if splits:
        missing = [s for s in splits if not split_exists(spec, s)]
        if missing:
            raise DatasetError(f"'{data}' ({source}) has no split {', '.join(repr(s) for s in missing)}")
    else:
        splits = [s for s in DEFAULT_SPLITS if split_exists(spec, s)]
        if not splits:
            raise DatasetError(f"'{data}' ({source}) has none of the splits {', '.join(DEFAULT_SPLITS)}; "
                               "name them with --split")
    result = ConvertResult(out=out, target=to, source_format=source)
    indexes = {}
    for split in splits:
        index = build_index(data, split, source)
        result.reports[split] = index.report
        for message in index.report.messages:
            logger.warning("%s", message)
        indexes[split] = index
    names = _class_names(indexes)
    writer: _Writer = (_CocoWriter(out, names, [i.label_map for i in indexes.values()]) if to == "coco"
                       else _YoloWriter(out, names) if to == "yolo" else _VocWriter(out, names))
    for split, index in indexes.items():
        result.images[split], result.boxes[split] = writer.write_split(split, index, progress)
    writer.finish()
    result.skipped = writer.skipped
    return result


def _class_names(indexes: dict[str, DatasetIndex]) -> list[str]:
    """One class list for every split: the first split's, then any class another split adds
    (each split's own label map comes from its own annotations)."""
    names: list[str] = []
    for index in indexes.values():
        names += [n for n in index.label_map.class_names if n not in names]
    return names


def _num(v: float) -> str:
    """A coordinate as short text (``12`` for 12.0)."""
    v = float(v)
    # 12 significant digits: 612.67, not 612.6700000000001; the change is < 1e-6 pixel for any image
    # up to 8192 pixels (YOLO fractions included)
    return str(int(v)) if v.is_integer() else f"{v:.12g}"


def _write(path: Path, content: str | bytes) -> None:
    """``content`` into ``path`` (its folders made) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode("utf-8") if isinstance(content, str) else content
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def _copy_image(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def _images_and_boxes(index: DatasetIndex) -> list[tuple[dict[str, Any], Path, list[dict[str, Any]]]]:
    """(image entry, its file, its annotations) of every kept image, in the index's order."""
    per_image: dict[int, list[dict[str, Any]]] = {}
    for a in index.gt["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    return [(im, Path(f), per_image.get(im["id"], [])) for im, f in zip(index.gt["images"], index.files)]


def _bar(items: list[Any], split: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=f"converting {split}", unit="image", disable=not progress)


class _Writer:
    def __init__(self, out: Path, names: list[str]):
        self.out, self.names = out, names
        self.index_of = {n: i for i, n in enumerate(names)}
        self.skipped = 0
        self.notes: Counter[str] = Counter()

    def class_of(self, index: DatasetIndex, category_id: int) -> int:
        lm = index.label_map
        return self.index_of[lm.class_names[lm.index_of(category_id)]]

    def write_split(self, split: str, index: DatasetIndex, progress: bool) -> tuple[int, int]:
        raise NotImplementedError

    def finish(self) -> None:
        for note, n in self.notes.items():
            logger.warning("%s (%d)", note, n)


class _CocoWriter(_Writer):
    def __init__(self, out: Path, names: list[str], label_maps: list[Any]):
        super().__init__(out, names)
        # the source's category ids (COCO's 1..90 with gaps) are kept when every split has the same
        # classes; otherwise the classes are numbered 1..C in the merged order
        self.keep_ids = all(lm == label_maps[0] for lm in label_maps)
        self.categories = (label_maps[0].categories() if self.keep_ids
                           else [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(names)])

    def write_split(self, split: str, index: DatasetIndex, progress: bool) -> tuple[int, int]:
        images, annotations = [], []
        for image, path, anns in _bar(_images_and_boxes(index), split, progress):
            _copy_image(path, self.out / "images" / split / image["file_name"])
            images.append({k: image[k] for k in ("id", "file_name", "width", "height")})
            for a in anns:
                cid = a["category_id"] if self.keep_ids else self.class_of(index, a["category_id"]) + 1
                annotations.append({"id": a["id"], "image_id": a["image_id"], "category_id": cid,
                                    "bbox": [float(v) for v in a["bbox"]], "area": float(a["area"]),
                                    "iscrowd": int(a.get("iscrowd", 0))})
        doc = {"info": {"description": f"converted by dinodet from {index.report.source}"}, "images": images,
               "annotations": annotations, "categories": self.categories}
        _write(self.out / "annotations" / f"instances_{split}.json", json_text(doc))
        return len(images), len(annotations)


class _YoloWriter(_Writer):
    def __init__(self, out: Path, names: list[str]):
        super().__init__(out, names)
        self.splits: list[str] = []

    def write_split(self, split: str, index: DatasetIndex, progress: bool) -> tuple[int, int]:
        self.splits.append(split)
        n_images = n_boxes = 0
        for image, path, anns in _bar(_images_and_boxes(index), split, progress):
            rel = Path(image["file_name"])
            _copy_image(path, self.out / "images" / split / rel)
            w, h = float(image["width"]), float(image["height"])
            lines = []
            for a in anns:
                if a.get("iscrowd"):
                    self.notes["crowd boxes left out: YOLO labels have no crowd flag"] += 1
                    continue
                x, y, bw, bh = (float(v) for v in a["bbox"])
                cx, cy = (x + bw / 2) / w, (y + bh / 2) / h
                lines.append(" ".join([str(self.class_of(index, a["category_id"])),
                                       *(_num(v) for v in (cx, cy, bw / w, bh / h))]))
            _write((self.out / "labels" / split / rel).with_suffix(".txt"), "".join(ln + "\n" for ln in lines))
            n_images, n_boxes = n_images + 1, n_boxes + len(lines)
        return n_images, n_boxes

    def finish(self) -> None:
        super().finish()
        doc = {"path": ".", **{s: f"images/{s}" for s in self.splits}, "names": dict(enumerate(self.names))}
        _write(self.out / "data.yaml", yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


class _VocWriter(_Writer):
    def __init__(self, out: Path, names: list[str]):
        super().__init__(out, names)
        self.written: dict[str, Path] = {}  # annotation stem -> the image it describes

    def write_split(self, split: str, index: DatasetIndex, progress: bool) -> tuple[int, int]:
        ids: list[str] = []
        n_boxes = 0
        for image, path, anns in _bar(_images_and_boxes(index), split, progress):
            stem = Path(image["file_name"]).stem
            if stem in self.written:
                if self.written[stem] != path:  # VOC names an image by its stem alone
                    logger.warning("%s: another image named '%s' was converted already (VOC ids are file stems); "
                                   "skipped", path, stem)
                    self.skipped += 1
                    continue
                ids.append(stem)  # the same image in two splits: one annotation file serves both
                continue
            _copy_image(path, self.out / "JPEGImages" / image["file_name"])
            _write(self.out / "Annotations" / f"{stem}.xml", self._xml(image, anns, index))
            self.written[stem] = path
            ids.append(stem)
            n_boxes += len(anns)
        _write(self.out / "ImageSets" / "Main" / f"{split}.txt", "".join(i + "\n" for i in ids))
        return len(ids), n_boxes

    def _xml(self, image: dict[str, Any], anns: list[dict[str, Any]], index: DatasetIndex) -> bytes:
        root = Element("annotation")
        SubElement(root, "filename").text = image["file_name"]
        size = SubElement(root, "size")
        for tag, value in (("width", image["width"]), ("height", image["height"]), ("depth", 3)):
            SubElement(size, tag).text = str(value)
        for a in anns:
            obj = SubElement(root, "object")
            SubElement(obj, "name").text = self.names[self.class_of(index, a["category_id"])]
            SubElement(obj, "difficult").text = "1" if a.get("iscrowd") else "0"
            x, y, w, h = (float(v) for v in a["bbox"])
            box = SubElement(obj, "bndbox")
            # the reader's 1-based inclusive rule (xmin - 1, xmax - xmin + 1) inverted
            for tag, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
                SubElement(box, tag).text = _num(value)
        indent(root)
        return tostring(root, encoding="utf-8", xml_declaration=True)

    def finish(self) -> None:
        super().finish()
        _write(self.out / "labels.txt", "".join(n + "\n" for n in self.names))
