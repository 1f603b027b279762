"""COCO result records: the one writer behind ``predictions.json`` (predict, eval) and COCOeval."""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..boxes import box_xyxy_to_xywh

log = logging.getLogger(__name__)


def coco_records(
    scores: Tensor,
    labels: Tensor,
    boxes: Tensor,
    category_ids: Sequence[int | None] | None = None,
    *,
    image_id: int | None = None,
    file_name: str | None = None,
    rounded: bool = False,
) -> list[dict[str, Any]]:
    """COCO result records of one image's detections: ``{"image_id" or "file_name", "category_id",
    "bbox": [x, y, w, h], "score"}`` with boxes given xyxy in original pixels.

    ``category_ids[label]`` is the category id of each class index (None: the class is dropped, e.g.
    no counterpart in the evaluated dataset); without it ``labels`` already are category ids.  The
    image is named by ``image_id`` (what COCOeval matches) or ``file_name`` (what a user reading
    predictions.json of arbitrary files needs), exactly one of them.  ``rounded`` keeps 0.01 px and
    1e-5 of score, far below the model's precision, for files people read; COCOeval gets full floats.
    Detections with a NaN or infinite score or box are dropped (a warning, once per process): NaN is
    not JSON, and COCOeval would count a NaN box as a match.
    """
    if (image_id is None) == (file_name is None):
        raise ValueError("give exactly one of image_id and file_name")
    key: dict[str, Any] = {"image_id": image_id} if file_name is None else {"file_name": file_name}
    xywh = box_xyxy_to_xywh(boxes.float()).tolist()
    records = []
    for score, label, box in zip(scores.tolist(), labels.tolist(), xywh):
        cat = label if category_ids is None else category_ids[label]
        if cat is None:
            continue
        if not all(math.isfinite(v) for v in (score, *box)):
            _warn_non_finite()
            continue
        if rounded:
            box, score = [round(v, 2) for v in box], round(score, 5)
        records.append({**key, "category_id": int(cat), "bbox": box, "score": float(score)})
    return records


@functools.cache
def _warn_non_finite() -> None:
    """Said once: a model that gives NaN boxes gives them for every image."""
    log.warning("the model gave detections with non-finite (NaN or inf) boxes or scores; they are left out")
