"""Turn raw DINO predictions into scored, labelled, absolute-pixel detections (official PostProcess)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..boxes import box_cxcywh_to_xyxy


class Detections(NamedTuple):
    """Top-S detections per image, sorted by descending score."""

    scores: Tensor  # [B, S] sigmoid class probabilities
    labels: Tensor  # [B, S] int64 class indices (0..C-1)
    boxes: Tensor  # [B, S, 4] (x0, y0, x1, y1) in pixels of the original image, not clamped


@torch.no_grad()
def postprocess(logits: Tensor, boxes: Tensor, orig_sizes: Tensor, num_select: int = 300, *,
                one_label_per_query: bool = False) -> Detections:
    """logits [B, Q, C], boxes [B, Q, 4] cxcywh in 0..1, orig_sizes int [B, 2] as (h, w).

    Like the official PostProcess (the default), every (query, class) pair competes: top-S over the
    flattened Q*C sigmoid scores, so one query can yield several detections with different labels.
    S = min(num_select, Q*C).  With ``one_label_per_query`` each query keeps only its best class and
    the top-S runs over the queries: S = min(num_select, Q), one box per query.
    """
    bs, _, num_classes = logits.shape
    prob = logits.sigmoid()
    if one_label_per_query:
        best, best_label = prob.max(dim=2)  # [B, Q]
        scores, query_idx = torch.topk(best, min(num_select, best.shape[1]), dim=1)
        labels = torch.gather(best_label, 1, query_idx)
    else:
        num_select = min(num_select, prob[0].numel())
        scores, flat_idx = torch.topk(prob.view(bs, -1), num_select, dim=1)
        query_idx = flat_idx // num_classes
        labels = flat_idx % num_classes
    xyxy = box_cxcywh_to_xyxy(boxes)
    xyxy = torch.gather(xyxy, 1, query_idx.unsqueeze(-1).repeat(1, 1, 4))
    img_h, img_w = orig_sizes.to(boxes.device).unbind(1)
    scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # [B, 4], kept integer like the official
    return Detections(scores, labels, xyxy * scale[:, None, :])
