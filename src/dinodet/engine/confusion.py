"""Confusion matrix of a detector (classes + background), as Ultralytics and supervision define it.

Per image, the detections scoring above ``score`` are matched to the ground truth greedily, the
pair of highest IoU first, class-agnostically, each box at most once and only at an IoU of at least
``iou``.  A matched pair counts in (GT class, predicted class): on the diagonal when the classes
agree, a confusion when not.  A detection left over (a duplicate, or nothing there) counts in the
background row, a GT box left over (missed) in the background column.  Crowd and ignored GT boxes
are left out, as they are of COCO's recall.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .plots import plot_confusion_matrix

log = logging.getLogger(__name__)

IOU = 0.5
SCORE = 0.25
BACKGROUND = "background"
CONFUSION_MATRIX = "confusion_matrix.png"


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), both xyxy: (N, M)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def confusion_matrix(gt_boxes: Any, gt_labels: Any, det_boxes: Any, det_labels: Any, det_scores: Any,
                     num_classes: int, iou: float = IOU, score: float = SCORE) -> np.ndarray:
    """Counts of one image, ``(num_classes + 1, num_classes + 1)`` ints: rows the GT class, columns
    the predicted class, the last row and column background.  Boxes xyxy, labels 0..num_classes-1."""
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    keep = np.asarray(det_scores, dtype=np.float64).reshape(-1) > score
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)[keep]
    det_labels = np.asarray(det_labels, dtype=np.int64).reshape(-1)[keep]
    counts = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    ious = box_iou(gt_boxes, det_boxes)
    gi, di = np.nonzero(ious >= iou)
    order = np.argsort(-ious[gi, di], kind="stable")
    gt_free = np.ones(len(gt_boxes), dtype=bool)
    det_free = np.ones(len(det_boxes), dtype=bool)
    for g, d in zip(gi[order], di[order]):
        if gt_free[g] and det_free[d]:
            gt_free[g] = det_free[d] = False
            counts[gt_labels[g], det_labels[d]] += 1
    np.add.at(counts, (gt_labels[gt_free], num_classes), 1)  # missed GT
    np.add.at(counts, (num_classes, det_labels[det_free]), 1)  # false positives
    return counts


def coco_confusion(coco_gt: Any, records: Sequence[dict[str, Any]], class_names: Sequence[str],
                   image_ids: Sequence[int] | None = None, iou: float = IOU, score: float = SCORE) -> dict[str, Any]:
    """The confusion matrix of COCO result ``records`` against ``coco_gt`` (a pycocotools COCO) over
    ``image_ids`` (default: every GT image), as metrics.json holds it: the thresholds, the class
    names (``class_names``, one per category in sorted id order, then background) and the counts."""
    cat_ids = sorted(coco_gt.getCatIds())
    index = {c: k for k, c in enumerate(cat_ids)}
    per_image: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        if r["category_id"] in index:
            per_image.setdefault(int(r["image_id"]), []).append(r)
    counts = np.zeros((len(cat_ids) + 1, len(cat_ids) + 1), dtype=np.int64)
    for image_id in coco_gt.getImgIds() if image_ids is None else image_ids:
        gts = [a for a in coco_gt.imgToAnns.get(int(image_id), [])
               if not a.get("iscrowd") and not a.get("ignore") and a["category_id"] in index]
        dets = per_image.get(int(image_id), [])
        counts += confusion_matrix(_xyxy([a["bbox"] for a in gts]), [index[a["category_id"]] for a in gts],
                                   _xyxy([r["bbox"] for r in dets]), [index[r["category_id"]] for r in dets],
                                   [r["score"] for r in dets], len(cat_ids), iou=iou, score=score)
    return {"iou": iou, "score": score, "classes": [*class_names, BACKGROUND], "counts": counts.tolist()}


def write_confusion_chart(confusion: dict[str, Any], out_dir: Path) -> list[Path]:
    """``out_dir/confusion_matrix.png`` of an evaluation, as a list (empty, with a debug note, when
    there is nothing to count) to add to what was written."""
    try:
        return [plot_confusion_matrix(confusion, out_dir / CONFUSION_MATRIX)]
    except ValueError as e:
        log.debug("no %s: %s", CONFUSION_MATRIX, e)
        return []


def _xyxy(xywh: list[list[float]]) -> np.ndarray:
    boxes = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
