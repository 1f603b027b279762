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
    class_names: Sequence[str] | None = None,
    rounded: bool = False,
) -> list[dict[str, Any]]:
    """COCO result records of one image's detections: ``{"image_id" and/or "file_name", "category_id",
    ["class_name",] "bbox": [x, y, w, h], "score"}`` with boxes given xyxy in original pixels.

    ``category_ids[label]`` is the category id of each class index (None: the class is dropped, e.g.
    no counterpart in the evaluated dataset); without it ``labels`` already are category ids.  The
    image is named by ``image_id`` (what COCOeval matches), ``file_name`` (what a user reading
    predictions.json of arbitrary files needs) or both.  ``class_names`` (one per detection, as
    ``Prediction.class_names``) adds ``class_name`` for people and tools that read names.  ``rounded`` keeps 0.01 px and
    1e-5 of score, far below the model's precision, for files people read; COCOeval gets full floats.
    Detections with a NaN or infinite score or box are dropped (a warning, once per process): NaN is
    not JSON, and COCOeval would count a NaN box as a match.
    """
    if image_id is None and file_name is None:
        raise ValueError("give image_id, file_name or both")
    key: dict[str, Any] = {k: v for k, v in (("image_id", image_id), ("file_name", file_name)) if v is not None}
    xywh = box_xyxy_to_xywh(boxes.float()).tolist()
    names: Sequence[str | None] = class_names if class_names is not None else [None] * len(xywh)
    records = []
    for score, label, box, name in zip(scores.tolist(), labels.tolist(), xywh, names):
        cat = label if category_ids is None else category_ids[label]
        if cat is None:
            continue
        if not all(math.isfinite(v) for v in (score, *box)):
            _warn_non_finite()
            continue
        if rounded:
            box, score = [round(v, 2) for v in box], round(score, 5)
        named = {"class_name": name} if name is not None else {}
        records.append({**key, "category_id": int(cat), **named, "bbox": box, "score": float(score)})
    return records


@functools.cache
def _warn_non_finite() -> None:
    """Said once: a model that gives NaN boxes gives them for every image."""
    log.warning("the model gave detections with non-finite (NaN or inf) boxes or scores; they are left out")
