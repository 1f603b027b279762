"""YOLO-format datasets, converted on load to an in-memory COCO-format annotation dict.

Layout (Ultralytics conventions)::

    ROOT/images/<split>/*.jpg   + ROOT/labels/<split>/*.txt     (e.g. coco128: images/train2017)
    ROOT/<split>/images/*.jpg   + ROOT/<split>/labels/*.txt     (Roboflow exports; val may be 'valid')
    ROOT/names.txt | classes.txt | obj.names | *.yaml with ``names:`` (list or {index: name})

A label file has one object per line, ``class cx cy w h`` normalised to 0..1 (a polygon
``class x1 y1 x2 y2 ...`` from segmentation exports is reduced to its bounding box, a pose label
``class cx cy w h`` + ``x y visibility`` per keypoint to its box; a 3-point polygon and a pose
label may be something else, so they are reported as ``ambiguous_label_lines``).  An image
without a label file is a negative.  The labels directory of an image directory is found like
Ultralytics does: the last ``images`` path component replaced by ``labels`` (or the image
directory itself when there is none).

The converted dict uses category id = YOLO class index and image id = the file name's number when
every stem is a distinct integer (coco128: the COCO image ids), else 1..N in file-name order.
Boxes are converted to pixels of the image as viewed (EXIF orientation applied, as Ultralytics
does); clipping, degenerate boxes and unknown classes are handled by the common COCO cleaning step.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from ..errors import first_line
from .images import IMAGE_EXTENSIONS, upright_size
from .report import DataReport, DatasetError, SplitNotFoundError

NAMES_FILES = ("names.txt", "classes.txt", "obj.names")


# A label value above this is not a fraction of the image size (rounding gives 1.0001, boxes reach
# a little outside; pixel coordinates give tens or hundreds): such a line is skipped, not clipped.
NOT_NORMALISED = 2.0


class YoloFormatError(DatasetError):
    """The YOLO dataset layout or names list cannot be found/parsed."""


def read_names(path: str | Path) -> list[str]:
    """Class names in index order from a text file (one per line) or a YAML ``names:`` entry."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        names = _read_yaml(path).get("names")
        if names is None:
            raise YoloFormatError(f"'{path}' has no 'names:' entry")
        return _names_from_yaml_value(names, path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise YoloFormatError(f"cannot read class names from '{path}': {e}") from e
    except UnicodeDecodeError:
        raise YoloFormatError(f"'{path}' is not UTF-8 text; save the class names as UTF-8") from None
    names = [ln.strip() for ln in lines]
    while names and not names[-1]:
        names.pop()
    if not names or any(not n for n in names):
        raise YoloFormatError(f"'{path}' must list one non-empty class name per line")
    return names


def _names_from_yaml_value(names: Any, path: Path) -> list[str]:
    if isinstance(names, (list, dict)) and not names:
        raise YoloFormatError(f"'{path}': 'names:' is empty; list the class names")
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            indexed = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise YoloFormatError(f"'{path}': 'names:' keys must be class indices") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise YoloFormatError(f"'{path}': 'names:' indices must be 0..{len(indexed) - 1} without gaps")
        return [indexed[i] for i in range(len(indexed))]
    raise YoloFormatError(f"'{path}': 'names:' must be a list or a mapping, got {type(names).__name__}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise YoloFormatError(f"cannot read '{path}': {e}") from e
    except UnicodeDecodeError:
        raise YoloFormatError(f"'{path}' is not UTF-8 text; save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise YoloFormatError(f"'{path}' is not valid YAML: {first_line(e)}") from e
    if not isinstance(data, dict):
        raise YoloFormatError(f"'{path}' must be a YAML mapping")
    return data


def find_names_file(root: Path) -> Path:
    """The names list of a YOLO dataset root (see module docstring for the search order)."""
    for name in NAMES_FILES:
        if (root / name).is_file():
            return root / name
    unreadable: YoloFormatError | None = None
    for yml in sorted([*root.glob("*.yaml"), *root.glob("*.yml")], key=lambda p: (p.stem != "data", p.name)):
        try:
            if "names" in _read_yaml(yml):
                return yml
        except YoloFormatError as e:
            unreadable = unreadable or e
    if unreadable is not None:  # e.g. a data.yaml with a syntax error: say that, not "no names found"
        raise unreadable
    raise YoloFormatError(
        f"no class names found in '{root}' (looked for {', '.join(NAMES_FILES)} and *.yaml with 'names:'); "
        + ("it looks like a COCO dataset: use --format coco" if (root / "annotations").is_dir()
           else "add a names.txt with one class name per line")
    )


def _split_candidates(split: str) -> list[str]:
    names = [split, f"{split}2017"]
    if split == "val":
        names += ["valid", "validation"]
    return names


def resolve_yolo_paths(root: str | Path, split: str = "train", names_file: str | Path | None = None,
                       img_dir: str | Path | None = None) -> tuple[Path, Path, Path]:
    """Find (image dir, label dir, names file) of ``split``.

    ``names_file`` (a .txt or .yaml) and ``img_dir`` override the search; a YAML names file's
    ``train:``/``val:``/``test:`` entry (relative to its ``path:``, itself relative to the YAML's
    folder) gives the image directory when ``img_dir`` is not given.
    """
    root = Path(root)
    names_path = _existing(names_file, root, "names file") if names_file else find_names_file(root)
    if img_dir is not None:
        images = _existing(img_dir, root, "image directory")
    else:
        # split folders come from a data YAML even when the names come from names.txt (coco128 has both)
        yaml_path = names_path if names_path.suffix.lower() in (".yaml", ".yml") else _data_yaml(root)
        images = (_images_from_yaml(yaml_path, split) if yaml_path else None) or _first_dir(
            [root / "images" / s for s in _split_candidates(split)] + [root / s / "images" for s in _split_candidates(split)],
            f"YOLO images of split '{split}'",
        )
    labels = label_dir_for(images)
    if not labels.is_dir():  # a misnamed folder would silently make every image a negative
        raise YoloFormatError(f"no label folder '{labels}' for the images in '{images}' (YOLO labels sit in the "
                              "image path with its last 'images' replaced by 'labels')")
    return images, labels, names_path


def _data_yaml(root: Path) -> Path | None:
    """The dataset YAML of ``root`` that names split folders (``data.yaml`` first), if any."""
    for yml in sorted([*root.glob("*.yaml"), *root.glob("*.yml")], key=lambda p: (p.stem != "data", p.name)):
        try:
            if any(k in _read_yaml(yml) for k in ("train", "val", "test")):
                return yml
        except YoloFormatError:
            continue
    return None


def _images_from_yaml(path: Path, split: str) -> Path | None:
    """The image folder a data YAML names for ``split``, found as Ultralytics finds it, plus the
    YAML's own folder as base when ``path:`` does not exist here (a YAML copied from another machine)."""
    if path.suffix.lower() not in (".yaml", ".yml"):
        return None
    data = _read_yaml(path)
    entry = data.get(split)
    if entry is None:
        return None
    if not isinstance(entry, str):
        raise YoloFormatError(f"'{path}': '{split}:' lists several sources; pass the image directory explicitly")
    if Path(entry).is_absolute():
        candidates = [Path(entry)]
    else:
        given = Path(str(data.get("path") or "."))
        bases = [given if given.is_absolute() else path.parent / given, path.parent]
        # Roboflow exports say '../train/images' for the folder beside data.yaml (Ultralytics' rule)
        rels = [entry, entry[3:]] if entry.startswith("../") else [entry]
        candidates = list(dict.fromkeys(b / r for b in bases for r in rels))
    for images in candidates:
        if images.is_dir():
            return images
    raise YoloFormatError(f"'{path}': '{split}: {entry}' is not a directory (tried "
                          + ", ".join(str(c) for c in candidates) + ")")


def label_dir_for(img_dir: Path) -> Path:
    """Ultralytics rule: replace the last ``images`` component with ``labels``."""
    parts = list(img_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return img_dir


def _existing(p: str | Path, root: Path, what: str) -> Path:
    p = Path(p)
    for cand in (p, root / p):
        if cand.exists():
            return cand
    raise YoloFormatError(f"{what} not found: '{p}'")


def _first_dir(candidates: list[Path], what: str) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    raise SplitNotFoundError(f"{what} not found; tried: " + ", ".join(str(c) for c in candidates))


# Where a converted annotation came from ("labels/train/x.txt: line 3"), for the data report's messages;
# not part of the evaluation ground truth.
SOURCE_KEY = "dinodet_source"


def file_image_ids(stems: list[str]) -> list[int]:
    """Image ids from file names: the names' numbers when every stem is a distinct integer (COCO
    file names give the COCO ids back), else 1..N in the given order."""
    numeric = all(re.fullmatch(r"\d+", s) for s in stems) and len({int(s) for s in stems}) == len(stems)
    return [int(s) for s in stems] if numeric else list(range(1, len(stems) + 1))


def yolo_to_coco(img_dir: Path, label_dir: Path, names: list[str], report: DataReport) -> dict[str, Any]:
    """Convert a YOLO split to a COCO-format dict (images, annotations, categories).

    Images whose header cannot be read are reported (``unreadable_images``) and left out: their
    normalised labels cannot be converted without a size.  Malformed label lines are reported
    (``invalid_annotations``); label files without an image are reported (``orphan_annotations``).
    """
    files = sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    rel = [p.relative_to(img_dir) for p in files]
    ids = file_image_ids([p.stem for p in files])

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    used_labels: set[Path] = set()
    for path, r, image_id in zip(files, rel, ids):
        label_path = label_dir / r.with_suffix(".txt")
        used_labels.add(label_path)
        try:
            width, height = upright_size(path)
        except Exception as e:  # noqa: BLE001 -- any PIL failure: the file is not a usable image
            report.add("unreadable_images", f"{path}: cannot read image header ({first_line(e)}); skipped")
            continue
        images.append({"id": image_id, "file_name": r.as_posix(), "width": width, "height": height})
        if label_path.is_dir():
            report.add("invalid_annotations", f"{label_path}: a folder where the label file should be; "
                                              "image treated as negative")
        elif label_path.is_file():
            for box, cls, line in _read_label_file(label_path, report):
                cx, cy, bw, bh = box
                x, y = (cx - bw / 2) * width, (cy - bh / 2) * height
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": cls,
                    "bbox": [x, y, bw * width, bh * height], "area": bw * width * bh * height, "iscrowd": 0,
                    SOURCE_KEY: f"{label_path}: line {line}",
                })

    if label_dir.is_dir() and label_dir != img_dir:
        orphans = sorted(p for p in label_dir.rglob("*.txt") if p not in used_labels)
        for p in orphans:
            report.add("orphan_annotations", f"{p}: label file without a matching image; ignored")
    categories = [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(names)]
    return {"info": {"description": f"converted from YOLO labels in {label_dir}"}, "images": images,
            "annotations": annotations, "categories": categories}


def _read_label_file(path: Path, report: DataReport) -> list[tuple[tuple[float, float, float, float], int, int]]:
    """Parse one label file into ((cx, cy, w, h) normalised, class, line number) triples; bad lines
    are reported."""
    try:
        lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()  # -sig: drop a BOM
    except OSError as e:
        report.add("invalid_annotations", f"{path}: cannot read label file ({e}); image treated as negative")
        return []
    out = []
    bad: Counter[str] = Counter()
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            bad[f"line {n}: not numbers"] += 1
            continue
        cls = values[0]
        if not cls.is_integer() or cls < 0 or not all(math.isfinite(v) for v in values):
            bad[f"line {n}: bad class or non-finite value"] += 1
            continue
        coords = values[1:]
        doubt = None  # why the line may be something else than what it is read as
        if len(coords) == 4:
            box = (coords[0], coords[1], coords[2], coords[3])
        elif _is_pose(coords):  # class cx cy w h, then x y visibility per keypoint: the box is given
            box = (coords[0], coords[1], coords[2], coords[3])
            doubt = (f"{len(fields)} values read as a pose label ('class cx cy w h' + {(len(coords) - 4) // 3} "
                     "keypoints 'x y visibility'): its box is used, the keypoints ignored")
        elif len(coords) >= 6 and len(coords) % 2 == 0:  # polygon: x1 y1 x2 y2 ...
            xs, ys = coords[0::2], coords[1::2]
            box = ((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys))
            if len(coords) == 6:  # as Ultralytics reads it, but more likely a box with two extra columns
                doubt = ("7 values read as a 3-point polygon (a triangle's bounding box); if it is "
                         "'class cx cy w h' with 2 extra values, remove them")
        elif len(coords) > 4:
            bad[f"line {n}: {len(fields)} values: neither 'class cx cy w h' nor a polygon 'class x1 y1 x2 y2 ...' "
                "(an odd number of coordinates)"] += 1
            continue
        else:
            bad[f"line {n}: expected 'class cx cy w h', got {len(fields)} fields"] += 1
            continue
        if max(coords) > NOT_NORMALISED:
            bad[f"line {n}: values above 1 (pixels?): YOLO boxes are fractions of the image size"] += 1
            continue
        if doubt is not None:
            report.add("ambiguous_label_lines", f"{path}: line {n}: {doubt}")
        out.append((box, int(cls), n))
    for msg in bad:
        report.add("invalid_annotations", f"{path}: {msg}; skipped")
    return out


def _is_pose(coords: list[float]) -> bool:
    """Whether label values after the class are an Ultralytics pose label: a box and then ``x y v``
    per keypoint with visibility ``v`` in {0, 1, 2} (a polygon's every third value is rarely so)."""
    return len(coords) >= 7 and (len(coords) - 4) % 3 == 0 and all(v in (0, 1, 2) for v in coords[6::3])
