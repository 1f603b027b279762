"""``Target``: one image's annotations as the model, the matcher and the criterion see them.

A plain dict at run time (what the data loader collates and users build by hand); the TypedDict
only names its keys and their shapes, in one place.
"""
from __future__ import annotations

from typing import Required, TypedDict

from torch import Tensor


class Target(TypedDict, total=False):
    """One image's annotations, after the data transforms.

    labels: int64 [n], class indices 0..num_classes-1 (not dataset category ids).
    boxes: float32 [n, 4], (cx, cy, w, h) in 0..1 of the image as fed (before batch padding).
    image_id: int64 [], the dataset's image id.  orig_size, size: int64 [2], (height, width) of
    the image as stored and as fed.  Only labels and boxes are needed for the losses.
    """

    labels: Required[Tensor]
    boxes: Required[Tensor]
    image_id: Tensor
    orig_size: Tensor
    size: Tensor
