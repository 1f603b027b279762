"""Pictures of an evaluation, written next to its metrics: detections drawn on the first images of
a split (with the ground truth as thin white boxes), precision-recall curves and AP per class; and
of a dataset (``dinodet check-data --out``): its boxes drawn on the first images, boxes per class."""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.images import ImageLoadError
from ..files import save_image_atomic
from ..visualize import draw_detections, draw_ground_truth
from .evaluate import EvalResult
from .plots import plot_class_counts, plot_per_class_ap, plot_precision_recall

logger = logging.getLogger(__name__)

PREDICTIONS_DIR = "val_predictions"
PR_CURVE = "pr_curve.png"
PER_CLASS_AP = "per_class_ap.png"


def write_prediction_pictures(dataset: Any, records: list[dict[str, Any]], out_dir: Path,
                              threshold: float, limit: int, ground_truth: bool = True) -> int:
    """Draw the detections (COCO records: xywh in original pixels, dataset category ids) scoring
    above ``threshold`` on the first ``limit`` readable images of ``dataset`` (a DetectionDataset),
    as ``out_dir/<image stem>.jpg``; returns how many pictures were written."""
    names = dict(zip(dataset.label_map.category_ids, dataset.label_map.class_names))
    per_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["score"] > threshold:
            per_image[int(r["image_id"])].append(r)

    def draw(i: int, image: Image.Image) -> Image.Image:
        if ground_truth:
            image = draw_ground_truth(image, dataset.raw_target(i)["boxes"])
        dets = sorted(per_image.get(int(dataset.image_ids[i]), []), key=lambda r: -r["score"])
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in dets)]
        labels = [names.get(r["category_id"], str(r["category_id"])) for r in dets]
        return draw_detections(image, boxes, labels, [r["score"] for r in dets])

    return _write_pictures(dataset, out_dir, limit, draw)


def write_eval_pictures(result: EvalResult, dataset: Any, out_dir: Path, *, pictures: int = 8,
                        threshold: float = 0.3, title: str = "", folder: str = PREDICTIONS_DIR) -> list[Path]:
    """PR curves, per-class AP and ``pictures`` annotated images (in ``out_dir/folder``) of one
    evaluation under ``out_dir``; returns what was written.  Nothing detected means no curves (a note is logged, not an error)."""
    written: list[Path] = []
    for plot, data, name in ((plot_precision_recall, result.pr_curves, PR_CURVE),
                             (plot_per_class_ap, result.per_class, PER_CLASS_AP)):
        try:
            written.append(plot(data, out_dir / name, title))
        except ValueError as e:
            logger.debug("no %s: %s", name, e)
    if write_prediction_pictures(dataset, result.records, out_dir / folder, threshold, pictures):
        written.append(out_dir / folder)
    return written


def write_label_pictures(dataset: Any, out_dir: Path, limit: int) -> int:
    """Draw the training boxes (class names, in class colours) on the first ``limit`` readable
    images of ``dataset`` (a DetectionDataset) as ``out_dir/<image stem>.jpg``, to check by eye that
    the labels sit where they should; returns how many pictures were written."""
    names = dataset.label_map.class_names

    def draw(i: int, image: Image.Image) -> Image.Image:
        target = dataset.raw_target(i)
        return draw_detections(image, target["boxes"], [names[k] for k in target["labels"].tolist()])

    return _write_pictures(dataset, out_dir, limit, draw)


def _write_pictures(dataset: Any, out_dir: Path, limit: int,
                    draw: Callable[[int, Image.Image], Image.Image]) -> int:
    """``draw(i, image)`` of the first ``limit`` readable images of ``dataset`` (in the annotation
    frame, EXIF orientation applied) as ``out_dir/<image stem>.jpg``; returns how many were written.

    Unreadable images are skipped (the dataset has reported them).  Two images with one stem (in
    different subfolders) get ``<stem>_<image id>.jpg``.  ``out_dir`` is the pictures' own folder:
    pictures an earlier run left there are removed once this run's are written, so that the folder
    shows one run, not a mix."""
    if limit <= 0:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    for i in range(len(dataset)):
        if len(names) >= limit:
            break
        try:
            image = dataset.load_image(i)
        except ImageLoadError:
            continue
        stem = dataset.image_path(i).stem
        name = f"{stem}.jpg" if f"{stem}.jpg" not in names else f"{stem}_{dataset.image_ids[i]}.jpg"
        save_image_atomic(draw(i, image), out_dir / name, quality=90)
        names.add(name)
    for old in out_dir.glob("*.jpg"):
        if old.name not in names:
            old.unlink(missing_ok=True)
    return len(names)


def write_class_counts(dataset: Any, path: Path, title: str = "") -> Path:
    """``path`` (PNG): how many training boxes each class of ``dataset`` has."""
    import numpy as np

    names = dataset.label_map.class_names
    counts = np.bincount(np.asarray(dataset.index.labels, dtype=np.int64), minlength=len(names))
    return plot_class_counts({n: int(c) for n, c in zip(names, counts)}, path, title)


@dataclass(frozen=True)
class DataPictures:
    """What ``write_data_pictures`` wrote: ``count`` images with their boxes in ``folder``, and the
    boxes-per-class ``chart``."""

    folder: Path
    count: int
    chart: Path


def write_data_pictures(data: str | Path, split: str, out_dir: str | Path, *, format: str = "coco",
                        pictures: int = 16) -> DataPictures:
    """``dinodet check-data --out``: the labels of ``split`` of ``data`` drawn on its first
    ``pictures`` images (``out_dir/SPLIT_labels/``) and its boxes per class
    (``out_dir/SPLIT_classes.png``), to check by eye what training will learn from.  The dataset's
    problems are not logged again here: ``data.checks.check_dataset`` reports them."""
    from ..data.coco import build_dataset

    out = Path(out_dir)
    package_log = logging.getLogger("dinodet")
    level = package_log.level
    package_log.setLevel(logging.ERROR)
    try:
        dataset = build_dataset(str(data), split, format, train=False)
        count = write_label_pictures(dataset, out / f"{split}_labels", pictures)
    finally:
        package_log.setLevel(level)
    chart = write_class_counts(dataset, out / f"{split}_classes.png", f"{split}: boxes per class")
    return DataPictures(out / f"{split}_labels", count, chart)
