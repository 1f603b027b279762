"""Detection datasets in COCO format (YOLO datasets are converted to it), for training and evaluation.

``build_dataset`` finds the files, ``index_coco`` cleans the annotations once up front (counting
every problem in a ``DataReport``) and ``DetectionDataset`` serves transformed samples.

Cleaning rules (the same for both formats):

* images whose file is missing are dropped (from training *and* from the evaluation ground truth,
  so they cannot count as missed detections);
* boxes are clipped to the image (counted when they overshoot by more than ``CLIP_TOLERANCE``
  pixels; sub-pixel overshoot from rounding is common in real annotations and clipped silently);
  boxes with zero/negative area before or after clipping are dropped everywhere (they can never
  be matched);
* annotations whose category id is not in the label map are dropped everywhere (and counted);
* crowd annotations (``iscrowd=1``) are excluded from training targets but kept in the ground
  truth, where COCOeval ignores detections matched to them;
* images without (remaining) boxes are kept as negatives.

The evaluation ground truth (``DetectionDataset.coco``) keeps the dataset's own image and category
ids, its categories are the label map's, and ``segmentation`` is dropped (only bbox evaluation is
done; it saves a lot of memory on COCO train).

Coordinate frame: the annotation file's ``width``/``height`` define it.  ``load_image`` returns
images upright (EXIF orientation applied); when that does not match the annotated size but the
stored (un-rotated) orientation does, the image is used as stored, because the boxes were drawn on
it.  Any other size mismatch is reported and the image resized to the annotated size.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import first_line
from ..targets import Target
from .augment import DetectionTransform, eval_transforms, train_transforms
from .cvat import cvat_to_coco
from .images import EXIF_ORIENTATION, ImageLoadError, describe_unreadable, load_image, upright_size
from .labels import LabelMap
from .layouts import FORMATS, drop_roboflow_placeholder, looks_like_yolo, resolve_format, resolve_roboflow_paths
from .report import DataReport, DatasetError, SplitNotFoundError
from .voc import voc_to_coco
from .yolo import SOURCE_KEY, read_names, resolve_yolo_paths, yolo_to_coco

logger = logging.getLogger(__name__)

CLIP_TOLERANCE = 1.0  # pixels of overshoot clipped without being reported


# PIL transpose undoing ``ImageOps.exif_transpose`` for the orientations that swap width/height.
_UNDO_EXIF = {
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass
class DatasetIndex:
    """A cleaned dataset: ground truth for evaluation plus flat arrays for training targets.

    Arrays (N images, M training boxes): ``image_ids`` int64 [N], ``sizes`` int64 [N, 2] (h, w)
    of the annotation frame, ``boxes`` float32 [M, 4] absolute (x1, y1, x2, y2) clipped,
    ``labels`` int64 [M] contiguous class indices, ``offsets`` int64 [N + 1]: image i owns
    ``boxes[offsets[i]:offsets[i + 1]]``.  Flat arrays keep DataLoader workers from touching (and
    so copying) millions of small Python objects.
    """

    gt: dict[str, Any]
    label_map: LabelMap
    img_dir: Path
    files: list[str]
    image_ids: np.ndarray
    sizes: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    report: DataReport
    categories: dict[int, str] = field(default_factory=dict)  # id -> name, as the data declares them


def make_coco(gt: dict[str, Any]) -> COCO:
    """A pycocotools COCO object over an in-memory annotation dict (without its console chatter)."""
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"annotation file not found: '{path}'") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot parse annotation file '{path}': {e}") from None
    except (ValueError, RecursionError) as e:  # e.g. a 5000-digit number, brackets nested 100k deep
        raise DatasetError(f"cannot parse annotation file '{path}': {first_line(e)}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"'{path}' is not a COCO annotation file (top level is not an object)")
    return data


def resolve_coco_paths(root: str | Path, split: str = "train", ann_file: str | Path | None = None,
                       img_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(annotation file, image directory) of ``split`` under ``root``.

    Defaults: ``root/annotations/instances_{split}2017.json`` (or ``instances_{split}.json``,
    ``{split}.json``) and ``root/{split}2017`` (or ``root/images/{split}2017``, ``root/{split}``,
    ``root/images/{split}`` — coco128 uses ``images/train2017``).  Explicit paths are taken as
    given, or relative to ``root`` when they do not exist as given.
    """
    root = Path(root)
    if ann_file is not None:
        ann = _given(ann_file, root)
    else:
        ann = _first([root / "annotations" / n for n in (f"instances_{split}2017.json", f"instances_{split}.json",
                                                          f"{split}.json")], Path.is_file, f"annotations of split '{split}'")
    if img_dir is not None:
        images = _given(img_dir, root)
    else:
        images = _first([root / f"{split}2017", root / "images" / f"{split}2017", root / split, root / "images" / split],
                        Path.is_dir, f"images of split '{split}'")
    return ann, images


def _given(p: str | Path, root: Path) -> Path:
    p = Path(p)
    return p if p.exists() or p.is_absolute() else (root / p if (root / p).exists() else p)


def _first(candidates: list[Path], test: Callable[[Path], bool], what: str) -> Path:
    for c in candidates:
        if test(c):
            return c
    raise SplitNotFoundError(f"{what} not found; tried: " + ", ".join(str(c) for c in candidates))


def max_image_pixels() -> float:
    """The largest annotated image size accepted: PIL's decompression-bomb limit (it refuses larger
    files; ``Image.MAX_IMAGE_PIXELS = None`` lifts both).  A larger annotated size is a broken
    annotation, and resizing the image to it could take all memory."""
    limit = Image.MAX_IMAGE_PIXELS
    return math.inf if limit is None else 2 * limit


def check_data_root(root: str | Path) -> None:
    """DatasetError unless ``root`` is a folder (with a hint when it is a dataset's file)."""
    root = Path(root)
    if root.is_file():
        raise DatasetError(f"'{root}' is a file; --data takes the dataset folder{_folder_hint(root)}")
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: '{root}'")


def _folder_hint(path: Path) -> str:
    """What to pass instead of a dataset file, e.g. an Ultralytics data.yaml."""
    if path.suffix.lower() in (".yaml", ".yml"):
        return f" (for this YOLO data file: --data {path.parent} --format yolo)"
    if path.suffix.lower() == ".json":
        root = path.parent.parent if path.parent.name == "annotations" else path.parent
        return f" (for COCO data: --data {root}, the folder holding annotations/ and the image folders)"
    return ""


def _positive_int(v: Any) -> int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) and f.is_integer() and f > 0 else None


def index_coco(data: dict[str, Any], img_dir: str | Path, label_map: LabelMap | None = None,
               report: DataReport | None = None, check_files: bool = True, source: str = "",
               yolo: bool = False) -> DatasetIndex:
    """Validate and clean a COCO annotation dict (see module docstring for the rules).

    Args:
        data: parsed annotation JSON (``images``, ``annotations``, ``categories``).
        img_dir: folder the ``file_name`` entries are relative to.
        label_map: class mapping to use; ``None`` derives it from ``categories`` (sorted by id).
        report: report to add counts/messages to (a new one when ``None``).
        check_files: drop (and report) images whose file does not exist.
        source: name used in messages (the annotation file).
        yolo: the dict was converted from YOLO labels (messages then speak of class indices and
            label-file lines).
    Raises:
        DatasetError: the dict is not usable at all (no image list, no categories and no label map).
    """
    img_dir = Path(img_dir)
    report = report if report is not None else DataReport(source=source)
    src = source or "annotations"
    if not isinstance(data.get("images"), list):
        raise DatasetError(f"{src}: not a COCO annotation file (no 'images' list)")
    anns_in = data.get("annotations") or []  # image-info-only files (e.g. test-dev): all negatives
    if not isinstance(anns_in, list):
        raise DatasetError(f"{src}: 'annotations' must be a list")

    dataset_cats = _parse_categories(data.get("categories"), src)
    if label_map is None:
        if not dataset_cats:
            raise DatasetError(f"{src}: no 'categories' and no label map given")
        label_map = LabelMap.from_categories({"id": k, "name": v} for k, v in dataset_cats.items())
    else:
        for cid, name in dataset_cats.items():
            idx = label_map.get_index(cid)
            if idx is not None and label_map.class_names[idx] != name:
                report.note(f"{src}: category id {cid} is '{name}' here but '{label_map.class_names[idx]}' "
                            "in the label map; using the label map")

    images, dropped = _index_images(data["images"], img_dir, check_files, report, src)
    gt_anns, per_image = _index_annotations(anns_in, images, dropped, label_map, report, src, yolo)

    order = sorted(images)  # sorted image ids, like torchvision's CocoDetection
    counts = np.array([len(per_image[i]) for i in order], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    flat = [b for i in order for b in per_image[i]]
    arr = np.asarray(flat, dtype=np.float64).reshape(-1, 5)
    report.num_classes = label_map.num_classes
    report.images += len(order)
    report.boxes += len(flat)
    report.images_without_boxes += int((counts == 0).sum())

    gt_dict = {
        "info": data.get("info") or {"description": src},
        "licenses": data.get("licenses") or [],
        "images": [images[i] for i in order],
        "annotations": gt_anns,
        "categories": label_map.categories(),
    }
    return DatasetIndex(
        gt=gt_dict, label_map=label_map, img_dir=img_dir,
        files=[str(img_dir / images[i]["file_name"]) for i in order],
        image_ids=np.asarray(order, dtype=np.int64),
        sizes=np.asarray([[images[i]["height"], images[i]["width"]] for i in order], dtype=np.int64).reshape(-1, 2),
        boxes=arr[:, :4].astype(np.float32), labels=arr[:, 4].astype(np.int64), offsets=offsets, report=report,
        categories=dataset_cats,
    )


def _index_images(entries: list[Any], img_dir: Path, check_files: bool, report: DataReport, src: str
                  ) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """The usable image entries by id (with their width and height), and the ids dropped with a
    report (missing, unreadable, too large): their annotations then go without a second message."""
    images: dict[int, dict[str, Any]] = {}
    dropped: set[int] = set()  # images already reported (missing/unreadable): their boxes go silently
    for entry in entries:
        iid = entry.get("id") if isinstance(entry, dict) else None
        fname = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(iid, int) or isinstance(iid, bool) or not isinstance(fname, str) or not fname:
            report.add("invalid_annotations", f"{src}: image entry {str(entry)[:80]} lacks an integer 'id' or a "
                                              "'file_name'; skipped")
            continue
        if iid in images or iid in dropped:
            report.add("invalid_annotations", f"{src}: image id {iid} listed twice; keeping the first")
            continue
        path = img_dir / fname
        problem = describe_unreadable(path) if check_files else None
        if problem is not None:
            what = {"no such file": "not found", "a directory": "is a folder, not an image"}.get(problem, problem)
            report.add("missing_files", f"{path}: listed in {src} but {what}; skipped")
            dropped.add(iid)
            continue
        width, height = _positive_int(entry.get("width")), _positive_int(entry.get("height"))
        if width is None or height is None:
            try:  # no usable size in the annotations: take the image's own
                width, height = upright_size(path)
            except Exception as e:  # noqa: BLE001 -- any PIL failure: the file has no usable size
                report.add("unreadable_images", f"{path}: no width/height in {src} and the image header is "
                                                f"unreadable ({first_line(e)}); skipped")
                dropped.add(iid)
                continue
        if width * height > max_image_pixels():
            report.add("invalid_annotations", f"{path}: annotated size {width}x{height} exceeds PIL's "
                                              f"decompression-bomb limit ({max_image_pixels():,} pixels); skipped")
            dropped.add(iid)
            continue
        images[iid] = {**entry, "width": width, "height": height}

    return images, dropped


def _index_annotations(anns_in: list[Any], images: dict[int, dict[str, Any]], dropped: set[int],
                       label_map: LabelMap, report: DataReport, src: str, yolo: bool
                       ) -> tuple[list[dict[str, Any]], dict[int, list[tuple[float, float, float, float, int]]]]:
    """(COCO ground truth: the kept annotations with unique positive ids; per image id the training
    boxes (x1, y1, x2, y2 clipped to the image, class index), crowd boxes left out)."""
    per_image: dict[int, list[tuple[float, float, float, float, int]]] = {iid: [] for iid in images}
    gt_anns: list[dict[str, Any]] = []
    used_ann_ids: set[int] = set()
    unknown: Counter[int] = Counter()
    first_unknown: dict[int, str] = {}  # category id -> where it was first seen (YOLO: file and line)
    pending_id: list[dict[str, Any]] = []  # annotations needing a fresh id (missing/duplicate/zero)
    for a in anns_in:
        parsed = _parse_annotation(a)
        if parsed is None:
            report.add("invalid_annotations", f"{src}: annotation {str(a)[:100]} lacks a valid image_id, "
                                              "category_id or 4-number bbox; skipped")
            continue
        iid, cid, (x, y, w, h) = parsed
        if iid not in images:
            if iid not in dropped:
                report.add("orphan_annotations", f"{src}: annotation {a.get('id')} refers to unknown image id {iid}; "
                                                 "skipped")
            continue
        idx = label_map.get_index(cid)
        if idx is None:
            unknown[cid] += 1
            first_unknown.setdefault(cid, a.get(SOURCE_KEY, ""))
            continue
        info = images[iid]
        width, height = info["width"], info["height"]
        where = a.get(SOURCE_KEY) or f"{src}: {info['file_name']} (image {iid}) annotation {a.get('id')}"
        if w <= 0 or h <= 0:
            report.add("boxes_dropped_degenerate", f"{where}: box [x,y,w,h]={_fmt([x, y, w, h])} has no area; dropped")
            continue
        x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            report.add("boxes_outside", f"{where}: box [x,y,w,h]={_fmt([x, y, w, h])} lies outside "
                                        f"the {width}x{height} image; dropped")
            continue
        overshoot = max(-x, -y, x + w - width, y + h - height)
        crowd = _positive_int(a.get("iscrowd", 0)) is not None  # 0, 1, and the strings "0"/"1" some tools write
        gt = {k: v for k, v in a.items() if k not in ("segmentation", SOURCE_KEY)}
        gt.update(image_id=iid, category_id=cid, iscrowd=int(crowd))
        if overshoot > CLIP_TOLERANCE:
            report.add("boxes_clipped", f"{where}: box [x,y,w,h]={_fmt([x, y, w, h])} extends outside the "
                                        f"{width}x{height} image; clipped")
            gt["bbox"], gt["area"] = [x1, y1, x2 - x1, y2 - y1], (x2 - x1) * (y2 - y1)
        else:  # unchanged, so official evaluations are reproduced exactly
            gt["bbox"] = [x, y, w, h]
            # a negative area would drop the box from every COCOeval area range (AP would ignore it)
            gt["area"] = float(a["area"]) if _finite(a.get("area")) and float(a["area"]) >= 0 else w * h
        aid = _positive_int(a.get("id"))
        if aid is None or aid in used_ann_ids:
            pending_id.append(gt)  # COCOeval treats match id 0 as "unmatched": ids must be unique and > 0
        else:
            gt["id"] = aid
            used_ann_ids.add(aid)
        gt_anns.append(gt)
        if crowd:
            report.add("crowd_ignored")
        else:
            per_image[iid].append((x1, y1, x2, y2, idx))
    next_id = max(used_ann_ids, default=0) + 1
    for gt in pending_id:
        gt["id"], next_id = next_id, next_id + 1
    for cid, n in sorted(unknown.items()):
        what = (f"class {cid} ({n} boxes) is beyond the {len(label_map.class_names)} class names"
                if yolo else f"category id {cid} ({n} boxes) is not in the label map")
        report.add("unknown_category", f"{first_unknown[cid] or src}: {what}"
                   + ("; first here" if n > 1 and first_unknown[cid] else "") + "; skipped", n=n)

    return gt_anns, per_image


def _parse_categories(cats: Any, src: str) -> dict[int, str]:
    if cats is None:
        return {}
    if not isinstance(cats, list):
        raise DatasetError(f"{src}: 'categories' must be a list")
    out: dict[int, str] = {}
    for c in cats:
        cid = c.get("id") if isinstance(c, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise DatasetError(f"{src}: category entry {str(c)[:80]} has no integer 'id'")
        if cid in out:
            raise DatasetError(f"{src}: category id {cid} is listed twice")
        out[cid] = str(c.get("name", cid))
    return out


def _parse_annotation(a: Any) -> tuple[int, int, tuple[float, float, float, float]] | None:
    if not isinstance(a, dict):
        return None
    iid, cid, bbox = a.get("image_id"), a.get("category_id"), a.get("bbox")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (iid, cid)):  # true is not image 1
        return None
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    return iid, cid, (x, y, w, h)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"


def build_index(root: str | Path, split: str = "train", format: str = "coco", ann_file: str | Path | None = None,
                img_dir: str | Path | None = None, label_map: LabelMap | None = None,
                report: DataReport | None = None) -> DatasetIndex:
    """Locate and clean a split (shared by ``build_dataset`` and ``checks.check_dataset``).

    ``format`` is one of ``layouts.FORMATS`` (``auto``: detected).  For YOLO, ``ann_file`` is the
    names list (.txt or .yaml) and ``img_dir`` the image folder; the Roboflow, VOC and CVAT layouts
    are converted to the COCO dict (``voc.py``, ``cvat.py``) and cleaned by the same rules.
    """
    if format not in FORMATS:
        raise DatasetError(f"unknown dataset format '{format}' (choose from {', '.join(FORMATS)})")
    root = Path(root)
    if ann_file is None and img_dir is None:
        check_data_root(root)
    format = resolve_format(root, format)
    if format in ("roboflow", "voc", "cvat") and (ann_file is not None or img_dir is not None):
        raise DatasetError(f"ann_file / img_dir apply to the coco and yolo formats, not {format}")
    if format == "coco":
        try:
            ann, images = resolve_coco_paths(root, split, ann_file, img_dir)
        except SplitNotFoundError as e:
            if ann_file is None and looks_like_yolo(root):
                raise SplitNotFoundError(f"{e} (the folder looks like a YOLO dataset: add --format yolo)") from None
            raise
        report = report if report is not None else DataReport(source=str(ann))
        return index_coco(load_json(ann), images, label_map, report, source=str(ann))
    if format == "roboflow":
        ann, images = resolve_roboflow_paths(root, split)
        data = load_json(ann)
        drop_roboflow_placeholder(data)
        report = report if report is not None else DataReport(source=str(ann))
        return index_coco(data, images, label_map, report, source=str(ann))
    if format in ("voc", "cvat"):
        report = report if report is not None else DataReport()
        data, images, source = (voc_to_coco if format == "voc" else cvat_to_coco)(root, split, report)
        report.source = report.source or source
        return index_coco(data, images, label_map, report, source=source)
    images, labels, names_file = resolve_yolo_paths(root, split, ann_file, img_dir)
    names = read_names(names_file)
    report = report if report is not None else DataReport(source=str(labels))
    data = yolo_to_coco(images, labels, names, report)
    if label_map is None:
        label_map = LabelMap.from_names(names)
    return index_coco(data, images, label_map, report, check_files=False, source=str(labels), yolo=True)


class DetectionDataset(Dataset):
    """Images and training targets of one split (see ``dinodet.data.augment`` for the sample format).

    ``dataset[i]`` is ``(image [3, h, w] float normalised, target)`` with target keys ``labels``
    int64 [n] (contiguous class indices), ``boxes`` float32 [n, 4] normalised (cx, cy, w, h) of the
    transformed image, ``image_id`` int64 scalar (the dataset's id), ``orig_size`` int64 [2] (h, w)
    of the annotated image, ``size`` int64 [2] (h, w) after transforms — or ``None`` when the image
    cannot be read (reported once; ``loader.collate`` drops it).

    Attributes:
        label_map: class index <-> dataset category id/name.
        coco: pycocotools ground truth (dataset's own image/category ids) for COCOeval.
        report: problems found while indexing (and, in this process, while loading).
    """

    def __init__(self, index: DatasetIndex, transforms: Callable[[Image.Image, dict[str, Any]], tuple[Tensor, dict[str, Any]]] | None):
        self.index = index
        self.transforms = transforms
        self.label_map = index.label_map
        self.data_categories = index.categories  # may differ from label_map when one was given
        self.report = index.report
        self.coco = make_coco(index.gt)
        self._bad: set[int] = set()  # unreadable images of this process: not retried
        self._noted: set[int] = set()  # images whose frame fix was reported already
        self._image_ids: list[int] = index.image_ids.tolist()

    def __len__(self) -> int:
        return len(self.index.files)

    @property
    def num_classes(self) -> int:
        return self.label_map.num_classes

    @property
    def image_ids(self) -> list[int]:
        """Dataset image id of every index (sorted ascending; do not modify)."""
        return self._image_ids

    def image_path(self, i: int) -> Path:
        return Path(self.index.files[i])

    def image_size(self, i: int) -> tuple[int, int]:
        """(height, width) of image ``i`` in the annotation frame."""
        h, w = self.index.sizes[i]
        return int(h), int(w)

    def raw_target(self, i: int) -> dict[str, Tensor]:
        """Untransformed training target: ``boxes`` float32 [n, 4] absolute (x1, y1, x2, y2), ``labels`` int64 [n]."""
        a, b = self.index.offsets[i], self.index.offsets[i + 1]
        return {"boxes": torch.from_numpy(self.index.boxes[a:b].copy()),
                "labels": torch.from_numpy(self.index.labels[a:b].copy())}

    def load_image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB PIL in the annotation frame (see module docstring).

        Raises:
            ImageLoadError: the file cannot be read.
        """
        path = self.image_path(i)
        try:
            image = load_image(path)
        except ImageLoadError:
            raise
        except Exception as e:  # e.g. PIL's DecompressionBombError, MemoryError on absurd headers
            raise ImageLoadError(f"cannot read image '{path}': {first_line(e)}") from e
        h, w = self.image_size(i)
        if image.size == (w, h):
            return image
        if image.size == (h, w):
            with contextlib.suppress(Exception), Image.open(path) as im:
                undo = _UNDO_EXIF.get(im.getexif().get(EXIF_ORIENTATION, 1))
                if undo is not None:
                    self._note(i, "exif_reoriented", f"{path}: EXIF orientation swaps width/height but the annotations "
                                                     f"give {w}x{h}; using the image as stored")
                    return image.transpose(undo)
        self._note(i, "size_mismatch", f"{path}: image is {image.width}x{image.height} but annotated as {w}x{h}; "
                                       "resized to the annotated size")
        return image.resize((w, h), Image.Resampling.BILINEAR)

    def _note(self, i: int, counter: str, message: str) -> None:
        if i not in self._noted:
            self._noted.add(i)
            self.report.add(counter, message)
            logger.warning(message)

    def __getitem__(self, i: int) -> tuple[Tensor, Target] | None:
        if i < 0:
            i += len(self)
        if i in self._bad:
            return None
        try:
            image = self.load_image(i)
        except ImageLoadError as e:
            self._bad.add(i)
            msg = f"{e}; skipped"
            self.report.add("unreadable_images", msg)
            logger.warning(msg)
            return None
        h, w = self.image_size(i)
        target: dict[str, Any] = self.raw_target(i)
        target["image_id"] = torch.tensor(int(self.index.image_ids[i]), dtype=torch.int64)
        target["orig_size"] = torch.tensor([h, w], dtype=torch.int64)
        return (self.transforms or _NO_RESIZE)(image, target)


def _identity(image: Any, target: Any) -> tuple[Any, Any]:
    return image, target


# transforms=None: same output format at the annotated size (to tensor, normalise, cxcywh boxes)
_NO_RESIZE = DetectionTransform(_identity, "no-resize")


def build_dataset(root: str | Path, split: str = "train", format: str = "coco", train: bool = True,
                  data_cfg: DataConfig | None = None, ann_file: str | Path | None = None,
                  img_dir: str | Path | None = None, label_map: LabelMap | None = None) -> DetectionDataset:
    """Build the dataset of one split.

    Args:
        root: dataset folder (COCO: ``{split}2017/`` + ``annotations/instances_{split}2017.json``;
            YOLO: see ``dinodet.data.yolo``).
        split: split name (``train``, ``val``, ...).
        format: ``"coco"``, ``"yolo"``, ``"roboflow"``, ``"voc"``, ``"cvat"`` or ``"auto"`` (detected,
            see ``dinodet.data.layouts``).
        train: training augmentation (``True``) or the evaluation resize (``False``).
        data_cfg: resolutions (default: official values).
        ann_file: COCO annotation file / YOLO names list, overriding the default location.
        img_dir: image folder, overriding the default location.
        label_map: class mapping to use (validation split, fine-tuning); by default derived from
            the data (COCO categories sorted by id; YOLO names in order).
    Raises:
        DatasetError: layout not found, annotations unparsable, or no usable image left (per-item
        problems are only reported, see ``DetectionDataset.report``).
    """
    cfg = data_cfg or DataConfig()
    index = build_index(root, split, format, ann_file, img_dir, label_map)
    transforms = train_transforms(cfg) if train else eval_transforms(cfg)
    dataset = DetectionDataset(index, transforms)
    _log_report(dataset.report)
    if len(dataset) == 0:
        problems = dataset.report.num_problems
        raise DatasetError(f"no usable image in '{dataset.report.source}'"
                           + (f" ({problems} problems: see above, or `dinodet check-data`)" if problems else ""))
    if train and dataset.report.no_boxes:  # trains "fine" and detects nothing: say so before hours of it
        logger.warning("the training split has no boxes: '%s' has %d images, all negatives; the model will "
                       "learn to detect nothing (labels missing or misplaced? `dinodet check-data`)",
                       dataset.report.source, len(dataset))
    return dataset


def _log_report(report: DataReport, shown: int = 5) -> None:
    """Log the counts and the first ``shown`` per-file messages (``dinodet check-data`` lists all)."""
    if report.ok:
        logger.debug("%s: %d images, %d boxes", report.source, report.images, report.boxes)
        return
    first = "".join(f"\n  {m}" for m in report.messages[:shown])
    more = len(report.messages) + report.messages_suppressed - shown
    if more > 0:
        first += f"\n  ... and {more} more (`dinodet check-data` lists them all)"
    logger.warning("%s: data problems:\n%s%s", report.source, report.summary(), first)
