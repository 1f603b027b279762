"""Training and evaluation transforms (the official DINO/DETR augmentation policy).

Official policy (``make_coco_transforms`` in DINO's ``datasets/coco.py``)::

    train: RandomHorizontalFlip(0.5)
           RandomSelect(RandomResize(scales, max_size),
                        Compose(RandomResize([400, 500, 600]), RandomSizeCrop(384, 600),
                                RandomResize(scales, max_size)))
           ToTensor, Normalize (ImageNet), boxes -> normalised (cx, cy, w, h)
    eval:  RandomResize([800], max_size=1333), ToTensor, Normalize

Built here on ``torchvision.transforms.v2`` with ``tv_tensors.BoundingBoxes`` so the geometric
kernels move boxes with the pixels.  All randomness comes from torch's global RNG (so
``torch.manual_seed`` and DataLoader worker seeding make it reproducible).

The sample format in and out of ``DetectionTransform``:

* in:  PIL RGB image (H, W) and a target dict with ``'boxes'`` float32 [n, 4] absolute
  (x1, y1, x2, y2) pixels of that image and ``'labels'`` int64 [n]; any other keys pass through.
* out: float32 [3, h, w] normalised with ImageNet mean/std, and the target with ``'boxes'``
  float32 [n', 4] (cx, cy, w, h) divided by (w, h, w, h) of the *transformed* image, ``'labels'``
  int64 [n'] (n' <= n: boxes cropped away are dropped), and ``'size'`` int64 [2] = (h, w).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from ..boxes import box_xyxy_to_cxcywh
from ..config import DataConfig
from ..targets import Target
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_size, image_hw, to_float_image

RawTarget = dict[str, Any]  # before _finalize: tv_tensors BoundingBoxes (xyxy pixels), labels


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive, like ``random.randint``) from torch's RNG."""
    return int(torch.randint(low, high + 1, ()).item())


class RandomResize(v2.Transform):
    """Resize so the short side is one of ``sizes`` (picked uniformly), long side capped at ``max_size``.

    The output size follows the official ``get_size_with_aspect_ratio`` exactly (``eval_size``),
    which differs from ``v2.RandomShortestSize`` in its rounding.  With a single size this is the
    deterministic evaluation resize.
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = [int(s) for s in sizes]
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        size = self.sizes[_randint(0, len(self.sizes) - 1)] if len(self.sizes) > 1 else self.sizes[0]
        return {"size": list(eval_size(h, w, size, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crop a random region with width in [min_size, min(W, max_size)] and likewise height.

    As the official ``RandomSizeCrop``; boxes are shifted and clamped to the crop by the v2 kernel
    (``DropEmptyBoxes`` afterwards removes the ones left with zero area).  An image smaller than
    ``min_size`` is cropped to at most its own size instead of failing.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if min_size > max_size:
            raise ValueError(f"RandomSizeCrop: min_size {min_size} > max_size {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        hi_w, hi_h = min(w, self.max_size), min(h, self.max_size)
        cw = _randint(min(self.min_size, hi_w), hi_w)
        ch = _randint(min(self.min_size, hi_h), hi_h)
        top, left = _randint(0, h - ch), _randint(0, w - cw)
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class DropEmptyBoxes:
    """Remove boxes with zero width or height (and the matching entries of other per-box tensors).

    The official crop keeps boxes with x2 > x1 and y2 > y1 after clamping; ``v2.SanitizeBoundingBoxes``
    cannot express that (its minimum size is 1 pixel), hence this small transform.
    """

    def __call__(self, image: Any, target: RawTarget) -> tuple[Any, RawTarget]:
        boxes = target["boxes"]
        n = boxes.shape[0]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if bool(keep.all()):
            return image, target
        out = dict(target)
        for key, value in target.items():
            if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == n:
                kept = value[keep]
                out[key] = tv_tensors.wrap(kept, like=value) if isinstance(value, tv_tensors.BoundingBoxes) else kept
        return image, out


def _finalize(image: Image.Image | Tensor, target: RawTarget) -> tuple[Tensor, Target]:
    """To float tensor + ImageNet normalisation; boxes xyxy pixels -> normalised (cx, cy, w, h)."""
    h, w = image_hw(image)
    tensor = F.normalize(to_float_image(image), list(IMAGENET_MEAN), list(IMAGENET_STD))
    out = dict(target)
    boxes = target["boxes"].as_subclass(Tensor).to(torch.float32)
    out["boxes"] = box_xyxy_to_cxcywh(boxes) / torch.tensor([w, h, w, h], dtype=torch.float32)
    out["labels"] = target["labels"].as_subclass(Tensor).to(torch.int64)
    out["size"] = torch.tensor([h, w], dtype=torch.int64)
    return tensor, out


class DetectionTransform:
    """A v2 geometric pipeline followed by tensor conversion/normalisation (see module docstring)."""

    def __init__(self, geometric: Callable[..., Any], name: str = "") -> None:
        self.geometric = geometric
        self.name = name

    def __call__(self, image: Image.Image | Tensor, target: RawTarget) -> tuple[Tensor, Target]:
        h, w = image_hw(image)
        if isinstance(image, Tensor) and not isinstance(image, tv_tensors.Image):
            # A plain tensor would be treated as "the image" only if no other tensor came first;
            # wrapping makes the dispatch unambiguous.
            image = tv_tensors.Image(image)
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        sample = dict(target)
        sample["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
        sample["labels"] = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)
        image, sample = self.geometric(image, sample)
        if isinstance(image, tv_tensors.Image):
            image = image.as_subclass(Tensor)
        return _finalize(image, sample)

    def __repr__(self) -> str:
        return f"DetectionTransform({self.name}: {self.geometric!r})"


def train_transforms(data_cfg: DataConfig | None = None) -> DetectionTransform:
    """The official training augmentation, with sizes from ``data_cfg`` (default: official values)."""
    cfg = data_cfg or DataConfig()
    scales, max_size = tuple(cfg.train_scales), cfg.max_size
    geometric = v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomChoice([
            RandomResize(scales, max_size),
            v2.Compose([
                RandomResize(tuple(cfg.crop_resize_scales)),  # official: no max_size here
                RandomSizeCrop(int(cfg.crop_size[0]), int(cfg.crop_size[1])),
                DropEmptyBoxes(),
                RandomResize(scales, max_size),
            ]),
        ]),
    ])
    return DetectionTransform(geometric, "train")


def eval_transforms(data_cfg: DataConfig | None = None) -> DetectionTransform:
    """Evaluation preprocessing: short side ``eval_size`` (long side <= ``max_size``), as ``eval_transform``."""
    cfg = data_cfg or DataConfig()
    return DetectionTransform(v2.Compose([RandomResize([cfg.eval_size], cfg.max_size)]), "eval")
