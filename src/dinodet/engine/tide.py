"""COCO error breakdown with the definitions of TIDE (Bolya et al., "TIDE: A General Toolbox for
Identifying Object Detection Errors", ECCV 2020), computed here on the COCO matches.

Implemented here rather than through the ``tidecv`` package: tidecv 1.0.1 (unmaintained since 2020)
pulls opencv-python, pandas and seaborn for what is a few dozen lines over the matches.

The ``MAX_DETS`` = 100 best detections of each image are matched to the ground truth per image and
class as COCO does at IoU ``FG`` = 0.5
(highest score first, each to the unmatched GT box of best IoU; a detection on a crowd box is
ignored).  Each unmatched detection is then, in TIDE's order:

* ``localisation``: IoU in [``BG``, ``FG``] with a GT box of its class (the best such one);
* ``classification``: IoU >= ``FG`` with a GT box of another class;
* ``duplicate``: IoU >= ``FG`` with a GT box of its class that a higher-scoring detection took;
* ``background``: IoU <= ``BG`` (0.1) with every GT box (and every detection on an image without any);
* ``both``: anything else (IoU in (``BG``, ``FG``) with a box of another class).

A GT box that no detection matched and no localisation or classification error aims at is ``missed``.

The weight of an error type is TIDE's dAP: AP50 with only those errors fixed by an oracle, minus
AP50.  Fixing a localisation or classification error turns the detection into a match of its GT
box (with that box's class) if that box is still free (highest score first), else removes it;
fixing a duplicate, background or both error removes the detection; fixing a missed box removes it
from the ground truth.  AP50 is the mean over the classes with GT boxes of COCO's 101-point
interpolated AP at IoU 0.5 (TIDE's AP: a class left without GT boxes scores 0).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .confusion import box_iou

log = logging.getLogger(__name__)

FG = 0.5
BG = 0.1
MAX_DETS = 100  # per image, highest scores first (TIDE's and COCO's AP setting)
ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
ERROR_BREAKDOWN = "error_breakdown.png"


@dataclass
class _Det:
    score: float
    cls: int  # category id
    kind: str  # "tp", "ignored", or one of ERROR_TYPES
    target: tuple[int, int] | None = None  # (image id, GT index) a localisation/classification fix aims at


def error_breakdown(coco_gt: Any, records: Sequence[dict[str, Any]], image_ids: Sequence[int] | None = None,
                    fg: float = FG, bg: float = BG, max_dets: int = MAX_DETS) -> dict[str, Any]:
    """The error breakdown of COCO result ``records`` against ``coco_gt`` (a pycocotools COCO) over
    ``image_ids`` (default every GT image), as metrics.json holds it: ``AP50`` (percent), per error
    type its ``count`` and ``dAP`` (AP50 points gained by fixing only that type), and the thresholds."""
    cat_ids = set(coco_gt.getCatIds())
    per_image: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        if r["category_id"] in cat_ids:
            per_image.setdefault(int(r["image_id"]), []).append(r)
    dets: list[_Det] = []
    num_gt: dict[int, int] = dict.fromkeys(cat_ids, 0)
    missed: dict[int, int] = dict.fromkeys(cat_ids, 0)  # per class
    gt_class: dict[tuple[int, int], int] = {}
    for image_id in coco_gt.getImgIds() if image_ids is None else image_ids:
        anns = [a for a in coco_gt.imgToAnns.get(int(image_id), []) if a["category_id"] in cat_ids]
        gts = [a for a in anns if not a.get("iscrowd") and not a.get("ignore")]
        crowd = [a for a in anns if a.get("iscrowd") or a.get("ignore")]
        for k, a in enumerate(gts):
            num_gt[a["category_id"]] += 1
            gt_class[(int(image_id), k)] = a["category_id"]
        best = sorted(per_image.get(int(image_id), []), key=lambda r: -float(r["score"]))[:max_dets]
        image_dets, targeted, used = _classify_image(int(image_id), gts, crowd, best, fg, bg)
        dets += image_dets
        for k, a in enumerate(gts):
            if not used[k] and k not in targeted:
                missed[a["category_id"]] += 1
    base = _map50(dets, num_gt)
    counts = {t: sum(d.kind == t for d in dets) for t in ERROR_TYPES}
    counts["missed"] = sum(missed.values())
    delta = {t: _fixed_map50(dets, num_gt, missed, t, gt_class) - base for t in ERROR_TYPES}
    return {"fg_iou": fg, "bg_iou": bg, "AP50": 100 * base,
            "errors": {t: {"count": counts[t], "dAP": 100 * delta[t]} for t in ERROR_TYPES}}


def evaluation_breakdown(result: Any, dataset: Any) -> dict[str, Any]:
    """``error_breakdown`` of an ``EvalResult``'s records on the images of ``dataset`` it scored
    (the unreadable ones left out, as the COCO scores leave them out)."""
    unreadable = set(result.unreadable_ids)
    return error_breakdown(dataset.coco, result.records, [i for i in dataset.image_ids if i not in unreadable])


def _classify_image(image_id: int, gts: list[dict[str, Any]], crowd: list[dict[str, Any]],
                    records: list[dict[str, Any]], fg: float, bg: float) -> tuple[list[_Det], set[int], np.ndarray]:
    """(the image's detections (``records``, by descending score), each a match or an error; the GT
    indices an error aims at; which GT boxes were matched)."""
    det_boxes = _xyxy([r["bbox"] for r in records])
    gt_boxes = _xyxy([a["bbox"] for a in gts])
    ious = box_iou(det_boxes, gt_boxes)  # [D, G]
    crowd_cover = _crowd_iou(det_boxes, _xyxy([a["bbox"] for a in crowd]))  # [D, C]
    gt_cls = np.asarray([a["category_id"] for a in gts], dtype=np.int64)
    crowd_cls = np.asarray([a["category_id"] for a in crowd], dtype=np.int64)
    used = np.zeros(len(gts), dtype=bool)
    out: list[_Det] = []
    targeted: set[int] = set()
    pending: list[int] = []
    for d, r in enumerate(records):  # COCO's greedy matching, per class
        same = gt_cls == r["category_id"]
        free = np.where(same & ~used, ious[d], -1.0)
        if len(free) and free.max() >= fg:
            used[int(free.argmax())] = True
            out.append(_Det(float(r["score"]), r["category_id"], "tp"))
        elif len(crowd) and (crowd_cover[d][crowd_cls == r["category_id"]] >= fg).any():
            out.append(_Det(float(r["score"]), r["category_id"], "ignored"))
        else:
            out.append(_Det(float(r["score"]), r["category_id"], ""))
            pending.append(d)
    for d in pending:  # TIDE's order of tests, against the final matches
        det, cls = out[d], records[d]["category_id"]
        same = gt_cls == cls
        if not len(gts):
            det.kind = "background"
            continue
        same_iou = np.where(same, ious[d], -1.0)
        other_iou = np.where(~same, ious[d], -1.0)
        used_iou = np.where(same & used, ious[d], -1.0)
        if bg <= same_iou.max() <= fg:
            det.kind, k = "localisation", int(same_iou.argmax())
        elif other_iou.max() >= fg:
            det.kind, k = "classification", int(other_iou.argmax())
        elif used_iou.max() >= fg:
            det.kind, k = "duplicate", -1
        elif ious[d].max() <= bg:
            det.kind, k = "background", -1
        else:
            det.kind, k = "both", -1
        if k >= 0 and not used[k]:  # TIDE: only an error on a free GT box can be fixed into a match
            det.target = (image_id, k)
            targeted.add(k)
    return out, targeted, used


def _fixed_map50(dets: list[_Det], num_gt: dict[int, int], missed: dict[int, int], kind: str,
                 gt_class: dict[tuple[int, int], int]) -> float:
    """AP50 with the errors of ``kind`` fixed by the oracle (see the module docstring)."""
    if kind == "missed":
        return _map50(dets, {c: n - missed[c] for c, n in num_gt.items()}, num_gt)
    fixed: list[_Det] = []
    taken: set[tuple[int, int]] = set()
    for det in sorted(dets, key=lambda d: -d.score):
        if det.kind != kind:
            fixed.append(det)
        elif det.target is not None and det.target not in taken:
            taken.add(det.target)
            fixed.append(_Det(det.score, gt_class[det.target], "tp"))
    return _map50(fixed, num_gt)


def _map50(dets: list[_Det], num_gt: dict[int, int], counted: dict[int, int] | None = None) -> float:
    """Mean over the classes with GT boxes (in ``counted``, default ``num_gt``) of the 101-point AP."""
    classes = [c for c, n in (counted or num_gt).items() if n > 0]
    if not classes:
        return 0.0
    by_class: dict[int, list[_Det]] = {}
    for d in dets:
        if d.kind != "ignored":
            by_class.setdefault(d.cls, []).append(d)
    return float(np.mean([_ap(by_class.get(c, []), num_gt[c]) for c in classes]))


def _ap(dets: list[_Det], num_gt: int) -> float:
    """COCO's 101-point interpolated AP of one class (0 without GT boxes)."""
    if num_gt <= 0 or not dets:
        return 0.0
    tp = np.asarray([d.kind == "tp" for d in sorted(dets, key=lambda d: -d.score)], dtype=np.float64)
    tps = np.cumsum(tp)
    precision = tps / np.arange(1, len(tp) + 1)
    recall = tps / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope
    idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return float(np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0).mean())


def _crowd_iou(dets: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """COCO's IoU with a crowd box: the intersection over the detection's area."""
    lt = np.maximum(dets[:, None, :2], crowd[None, :, :2])
    rb = np.minimum(dets[:, None, 2:], crowd[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area = (dets[:, 2:] - dets[:, :2]).clip(0).prod(axis=1)[:, None]
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def _xyxy(xywh: list[list[float]]) -> np.ndarray:
    boxes = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def write_error_chart(breakdown: dict[str, Any] | None, out_dir: Path) -> list[Path]:
    """``out_dir/error_breakdown.png``, as a list (empty, with a debug note, when there is no
    breakdown or nothing to show) to add to what was written."""
    from .plots import plot_error_breakdown

    if not breakdown:
        return []
    try:
        return [plot_error_breakdown(breakdown, out_dir / ERROR_BREAKDOWN)]
    except ValueError as e:
        log.debug("no %s: %s", ERROR_BREAKDOWN, e)
        return []
