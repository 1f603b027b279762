"""Bounding-box conversions, IoU / generalized IoU and ``inverse_sigmoid``.

Every function is numerically identical to the official DINO utilities (``util/box_ops.py`` and
``util/misc.py``), including the small epsilons, because the losses and the Hungarian matching depend on
the exact values.  All functions work on any leading batch shape unless a docstring says otherwise.
"""
from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (x0, y0, w, h), the COCO results format."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [...] area (negative for inverted boxes, like torchvision's box_area)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _box_iou_and_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union area: [N, 4], [M, 4] xyxy -> ([N, M], [N, M])."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])  # [N, M, 2] top-left of the intersection
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])  # [N, M, 2] bottom-right of the intersection
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2 - inter
    # The official code adds 1e-6 to the union, so zero-area boxes give IoU 0 instead of NaN.
    return inter / (union + 1e-6), union


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU: [N, 4], [M, 4] xyxy -> [N, M]  (inter / (union + 1e-6), as the official code)."""
    return _box_iou_and_union(boxes1, boxes2)[0]


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (https://giou.stanford.edu/): [N, 4], [M, 4] xyxy -> [N, M] in [-1, 1].

    GIoU = IoU - (enclosing area - union) / (enclosing area + 1e-6).  The 1e-6 terms are the official
    ones, so two identical zero-area boxes give 0 rather than NaN.  Boxes must satisfy x1 >= x0 and
    y1 >= y0 (the official code asserts this; it is not checked here to avoid a device sync).
    """
    iou, union = _box_iou_and_union(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])  # smallest enclosing box
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[:, :, 0] * wh[:, :, 1]
    return iou - (enclosing - union) / (enclosing + 1e-6)


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of each box with its counterpart: [N, 4], [N, 4] xyxy -> [N]; the diagonal of
    ``generalized_box_iou`` (the same float operations per pair) without the N x N matrix."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / (union + 1e-6)
    wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    enclosing = wh[:, 0] * wh[:, 1]
    return iou - (enclosing - union) / (enclosing + 1e-6)


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """Logit of x clamped to [0, 1]: log(max(x, eps) / max(1 - x, eps)); any shape.

    Both numerator and denominator are clamped separately (not x to [eps, 1 - eps]), exactly like the
    official helper (the two can differ in the last bits for x near 1).
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
