"""Detections in the formats other tools read: YOLO label files (``--save-txt``) and one CSV
(``--save-csv``), for images and video frames alike.

YOLO files go to ``OUT/labels/<stem>.txt`` (a video frame: ``<stem>_<frame>.txt``), one line per
detection ``class cx cy w h score``: the model's class index, the box centre and size normalised by
the image size, and the score (Ultralytics' ``save_conf`` layout; the class index is what a model
trained on a YOLO dataset calls the class).  An image without detections gets an empty file, as a
YOLO dataset lists a background image.  ``labels/`` has its own output manifest, so a later run
replaces these files and nothing else.  ``OUT/predictions.csv`` has one row per detection of the
run (``file, frame, x, y, width, height, score, category_id, class_name[, track_id]``: bbox in
pixels as in predictions.json; ``frame`` empty for an image); it is written once, at the end.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import check_not_foreign, record_outputs, write_atomic

LABELS_DIR = "labels"
PREDICTIONS_CSV = "predictions.csv"
CSV_COLUMNS = ("file", "frame", "x", "y", "width", "height", "score", "category_id", "class_name")
COMMAND = "predict"


def yolo_text(pred: Any) -> str:
    """``pred``'s detections as YOLO label lines ``class cx cy w h score`` (normalised, 6 decimals)."""
    h, w = pred.image_size
    lines = []
    for (x0, y0, x1, y1), label, score in zip(pred.boxes.tolist(), pred.labels.tolist(), pred.scores.tolist()):
        box = ((x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h)
        lines.append(f"{label} " + " ".join(f"{v:.6f}" for v in box) + f" {score:.5f}\n")
    return "".join(lines)


def frame_label_name(stem: str, frame: int) -> str:
    """The label file of one video frame."""
    return f"{stem}_{frame}.txt"


class DetectionExports:
    """Collects the ``--save-txt`` / ``--save-csv`` outputs of one prediction run into ``out_dir``.

    ``check`` before the run (no foreign file of an image's label name, nor predictions.csv, is
    replaced without ``overwrite``); ``add`` per image or frame; ``finish`` at the end writes the
    CSV and records the label files in ``labels/``'s manifest.  Every file is written atomically.
    """

    def __init__(self, out_dir: Path, save_txt: bool, save_csv: bool, track: bool = False):
        self.out_dir, self.save_txt, self.save_csv, self.track = Path(out_dir), save_txt, save_csv, track
        self.labels = self.out_dir / LABELS_DIR
        self.rows: list[list[Any]] = []
        self.written: list[str] = []

    @property
    def active(self) -> bool:
        return self.save_txt or self.save_csv

    def check(self, image_stems: Sequence[str], overwrite: bool) -> None:
        """Raises ConfigError: a label file of an image, or predictions.csv, exists and is not dinodet's."""
        if self.save_txt:
            check_not_foreign(self.labels, [f"{s}.txt" for s in image_stems], overwrite=overwrite,
                              name=f"--save-txt: {LABELS_DIR}/ in --out")
        if self.save_csv:
            check_not_foreign(self.out_dir, [PREDICTIONS_CSV], overwrite=overwrite)

    def add(self, pred: Any, file: str, label_name: str, frame: int | None = None) -> None:
        """One image's (or frame's, with ``frame``) detections: ``file`` names it in the CSV,
        ``label_name`` is its YOLO file in ``labels/``."""
        if self.save_txt:
            self.labels.mkdir(parents=True, exist_ok=True)
            text = yolo_text(pred)
            write_atomic(self.labels / label_name, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            self.written.append(label_name)
        if self.save_csv:
            tracks = pred.track_ids.tolist() if self.track and pred.track_ids is not None else [None] * len(pred)
            for (x0, y0, x1, y1), score, cat, name, tid in zip(pred.boxes.tolist(), pred.scores.tolist(),
                                                               pred.category_ids.tolist(), pred.class_names, tracks):
                row = [file, "" if frame is None else frame, round(x0, 2), round(y0, 2), round(x1 - x0, 2),
                       round(y1 - y0, 2), round(score, 5), int(cat), name]
                self.rows.append(row + ([tid if tid is not None and tid >= 0 else ""] if self.track else []))

    def finish(self) -> list[Path]:
        """Record the label files written and write the CSV; returns the files and folders written."""
        done: list[Path] = []
        if self.written:
            record_outputs(self.labels, self.written, COMMAND)
            self.written = []
            done.append(self.labels)
        if self.save_csv:
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow([*CSV_COLUMNS, *(["track_id"] if self.track else [])])
            writer.writerows(self.rows)
            path = self.out_dir / PREDICTIONS_CSV
            write_atomic(path, lambda tmp: tmp.write_text(buffer.getvalue(), encoding="utf-8"))
            record_outputs(self.out_dir, [PREDICTIONS_CSV], COMMAND)
            done.append(path)
        return done
