"""Pictures of an evaluation, written next to its metrics: detections drawn on the first images of
a split (with the ground truth as thin white boxes), precision-recall curves and AP per class; and
of a dataset (``dinodet check-data --out``): its boxes drawn on the first images, boxes per class.

A picture never replaces a file dinodet did not write (``files.dinodet_outputs``): without
``overwrite`` it takes another name, and only an earlier run's pictures are cleared away."""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.images import ImageLoadError
from ..files import (
    check_not_foreign,
    check_out_folder,
    dinodet_outputs,
    record_outputs,
    remove_outputs,
    save_image_atomic,
)
from ..visualize import draw_detections, draw_ground_truth
from .evaluate import EvalResult
from .plots import plot_class_counts, plot_per_class_ap, plot_precision_recall

logger = logging.getLogger(__name__)

PREDICTIONS_DIR = "val_predictions"
PR_CURVE = "pr_curve.png"
PER_CLASS_AP = "per_class_ap.png"
COMMAND_CHECK_DATA = "check-data"  # what the folders' manifests say wrote the files


def write_prediction_pictures(dataset: Any, records: list[dict[str, Any]], out_dir: Path,
                              threshold: float, limit: int, ground_truth: bool = True, *, command: str = "train",
                              overwrite: bool = False) -> int:
    """Draw the detections (COCO records: xywh in original pixels, dataset category ids) scoring
    above ``threshold`` on the first ``limit`` readable images of ``dataset`` (a DetectionDataset),
    as ``out_dir/<image stem>.jpg``; returns how many pictures were written (``_write_pictures``)."""
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

    return _write_pictures(dataset, out_dir, limit, draw, command, overwrite)


def write_eval_pictures(result: EvalResult, dataset: Any, out_dir: Path, *, pictures: int = 8,
                        threshold: float = 0.3, title: str = "", folder: str = PREDICTIONS_DIR,
                        command: str = "train", overwrite: bool = False) -> list[Path]:
    """PR curves, per-class AP and ``pictures`` annotated images (in ``out_dir/folder``, written as
    ``command``'s) of one evaluation under ``out_dir``; returns what was written.  Nothing detected
    means no curves (a note is logged, not an error)."""
    written: list[Path] = []
    for plot, data, name in ((plot_precision_recall, result.pr_curves, PR_CURVE),
                             (plot_per_class_ap, result.per_class, PER_CLASS_AP)):
        try:
            written.append(plot(data, out_dir / name, title))
        except ValueError as e:
            logger.debug("no %s: %s", name, e)
    if write_prediction_pictures(dataset, result.records, out_dir / folder, threshold, pictures, command=command,
                                 overwrite=overwrite):
        written.append(out_dir / folder)
    return written


def write_label_pictures(dataset: Any, out_dir: Path, limit: int, *, command: str = COMMAND_CHECK_DATA,
                         overwrite: bool = False) -> int:
    """Draw the training boxes (class names, in class colours) on the first ``limit`` readable
    images of ``dataset`` (a DetectionDataset) as ``out_dir/<image stem>.jpg``, to check by eye that
    the labels sit where they should; returns how many pictures were written."""
    names = dataset.label_map.class_names

    def draw(i: int, image: Image.Image) -> Image.Image:
        target = dataset.raw_target(i)
        return draw_detections(image, target["boxes"], [names[k] for k in target["labels"].tolist()])

    return _write_pictures(dataset, out_dir, limit, draw, command, overwrite)


def _write_pictures(dataset: Any, out_dir: Path, limit: int, draw: Callable[[int, Image.Image], Image.Image],
                    command: str, overwrite: bool) -> int:
    """``draw(i, image)`` of the first ``limit`` readable images of ``dataset`` (in the annotation
    frame, EXIF orientation applied) as ``out_dir/<image stem>.jpg``; returns how many were written.

    Unreadable images are skipped (the dataset has reported them).  A name already taken (two
    images with one stem in different subfolders, or a file dinodet did not write and may not
    replace without ``overwrite``) gets ``<stem>_<image id>[_N].jpg``.  ``out_dir`` is the pictures'
    own folder: the pictures an earlier run left there (its manifest lists them) are removed once
    this run's are written, so that the folder shows one run, not a mix; other files stay."""
    if limit <= 0:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = dinodet_outputs(out_dir)
    names: list[str] = []

    def free(name: str) -> bool:
        return name not in names and (overwrite or name in ours or not os.path.lexists(out_dir / name))

    try:
        for i in range(len(dataset)):
            if len(names) >= limit:
                break
            try:
                image = dataset.load_image(i)
            except ImageLoadError:
                continue
            stem, n = dataset.image_path(i).stem, 2
            name = f"{stem}.jpg" if free(f"{stem}.jpg") else f"{stem}_{dataset.image_ids[i]}.jpg"
            while not free(name):
                name, n = f"{stem}_{dataset.image_ids[i]}_{n}.jpg", n + 1
            save_image_atomic(draw(i, image), out_dir / name, quality=90)
            names.append(name)
    finally:
        record_outputs(out_dir, names, command)
    remove_outputs(out_dir, names)
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


def check_data_out(out_dir: str | Path, splits: Sequence[str], *, overwrite: bool = False) -> None:
    """Before the checks: ``out_dir`` must be writable and (without ``overwrite``) hold no
    ``SPLIT_classes.png`` of ``splits`` that dinodet did not write.

    Raises:
        ConfigError: it does.
    """
    check_out_folder(Path(out_dir))
    check_not_foreign(Path(out_dir), [_classes_chart(s) for s in splits], overwrite=overwrite)


def _classes_chart(split: str) -> str:
    return f"{split}_classes.png"


def write_data_pictures(data: str | Path, split: str, out_dir: str | Path, *, format: str = "coco",
                        pictures: int = 16, overwrite: bool = False) -> DataPictures:
    """``dinodet check-data --out``: the labels of ``split`` of ``data`` drawn on its first
    ``pictures`` images (``out_dir/SPLIT_labels/``) and its boxes per class
    (``out_dir/SPLIT_classes.png``), to check by eye what training will learn from.  The dataset's
    problems are not logged again here: ``data.checks.check_dataset`` reports them.  Files dinodet
    did not write are replaced only with ``overwrite``.

    Raises:
        ConfigError: see ``check_data_out``.
    """
    from ..data.coco import build_dataset

    out = Path(out_dir)
    check_data_out(out, [split], overwrite=overwrite)
    package_log = logging.getLogger("dinodet")
    level = package_log.level
    package_log.setLevel(logging.ERROR)
    try:
        dataset = build_dataset(str(data), split, format, train=False)
        count = write_label_pictures(dataset, out / f"{split}_labels", pictures, command=COMMAND_CHECK_DATA,
                                     overwrite=overwrite)
    finally:
        package_log.setLevel(level)
    chart = write_class_counts(dataset, out / _classes_chart(split), f"{split}: boxes per class")
    record_outputs(out, [chart.name], COMMAND_CHECK_DATA)
    return DataPictures(out / f"{split}_labels", count, chart)
