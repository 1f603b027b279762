"""Image transforms shared by inference, evaluation and training."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch import Tensor

from ..config import MAX_IMAGE_SIDE
from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_resize(size: int | None, max_size: int | None, names: tuple[str, str] = ("size", "max_size")) -> None:
    """The one rule for an explicitly given resize: each side in 1..``MAX_IMAGE_SIDE`` (a bound on
    what one image may allocate: --size 100000 would ask for tens of GB) and ``size <= max_size``
    when both are given (a larger short side would be capped by the long side anyway: almost surely
    a mix-up).
    A checkpoint's own ``data.eval_size`` may exceed its ``max_size`` (the cap then wins, as in the
    official resize), so callers check only what a user gave.  ``names`` are the option names the
    message uses (e.g. ``("--size", "--max-size")``).

    Raises:
        ConfigError: the rule is broken.
    """
    for name, value in zip(names, (size, max_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
        if value is not None and value > MAX_IMAGE_SIDE:
            raise ConfigError(f"{name} must be <= {MAX_IMAGE_SIDE}, got {value}")
    if size is not None and max_size is not None and size > max_size:
        a, b = names
        raise ConfigError(f"need {a} <= {b}, got {a} {size} and {b} {max_size}")


def size_groups(sizes: Sequence[tuple[int, int]], multiple: int = 1) -> list[list[int]]:
    """Indices of images grouped by (height, width) rounded up to ``multiple`` (first-appearance
    order, input order within): the images that can run as one batch without padding any of them
    (beyond that rounding)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault((-(-h // multiple) * multiple, -(-w // multiple) * multiple), []).append(i)
    return list(groups.values())


def pad_batch(images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Batch differently sized images the way the official code does.

    Args:
        images: B tensors [C, Hi, Wi].
    Returns:
        batch [B, C, maxH, maxW] with each image in the top-left corner and zeros elsewhere, and
        mask [B, maxH, maxW] bool, True on padded pixels.
    """
    if not images:
        raise ValueError("pad_batch needs at least one image")
    c = images[0].shape[0]
    max_h = max(int(im.shape[1]) for im in images)
    max_w = max(int(im.shape[2]) for im in images)
    batch = images[0].new_zeros((len(images), c, max_h, max_w))
    mask = torch.ones((len(images), max_h, max_w), dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        h, w = im.shape[1:]
        batch[i, :, :h, :w] = im
        mask[i, :h, :w] = False
    return batch, mask


def eval_size(height: int, width: int, size: int = 800, max_size: int | None = 1333) -> tuple[int, int]:
    """Output (height, width) of the official eval resize ``RandomResize([size], max_size)``.

    Same integer arithmetic as the official ``get_size_with_aspect_ratio``: the short side becomes
    ``size`` unless that would push the long side past ``max_size``, in which case the short side
    is shrunk to ``round(max_size * short / long)``; the long side is then truncated (``int``).
    Because the short side is rounded, the long side can end up a little above ``max_size``
    (e.g. 265x1160 -> 305x1335); that is the official behaviour and kept for parity.  An image
    whose short side already equals the target keeps its size exactly.
    """
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = max(1, round(max_size * short / long))  # >= 1: a 1x2000 strip must not become 0 px
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def to_float_image(image: Image.Image | Tensor) -> Tensor:
    """PIL image or [3, H, W] tensor (uint8 0..255 or float 0..1) -> float32 [3, H, W] in 0..1."""
    if isinstance(image, Image.Image):
        image = F.to_image(image).as_subclass(Tensor)
    _check_image_tensor(image)
    if image.dtype == torch.uint8:
        # div(255) like the official ToTensor (v2's to_dtype multiplies by 1/255, 1 ulp apart).
        return image.to(torch.float32).div(255)
    return image.to(torch.float32)


def _check_image_tensor(image: Tensor) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image tensor [3, H, W], got shape {list(image.shape)}")
    if not (image.dtype == torch.uint8 or image.dtype.is_floating_point):
        raise ValueError(f"expected a uint8 (0..255) or float (0..1) image tensor, got {image.dtype}")
    if image.dtype.is_floating_point and image.numel():
        low, high = image.aminmax()
        if not (low >= -1e-3 and high <= 1 + 1e-3):  # e.g. 0..255 floats (or NaN): the model would see garbage
            raise ValueError(f"a float image tensor must hold values in 0..1, got {low.item():g}..{high.item():g} "
                             "(divide by 255, or pass a uint8 tensor)")


def eval_transform(image: Image.Image | Tensor, size: int = 800, max_size: int | None = 1333) -> Tensor:
    """The official evaluation preprocessing: resize (``eval_size``), scale to 0..1, normalise.

    Args:
        image: PIL RGB image, or tensor [3, H, W] uint8 (0..255) or float (0..1).
    Returns:
        float32 [3, h, w] normalised with ImageNet mean/std, (h, w) = ``eval_size(H, W, ...)``.
    """
    if isinstance(image, Tensor):
        _check_image_tensor(image)
        if image.dtype == torch.uint8:
            # Resizing a PIL image is what the official pipeline does; uint8 -> PIL is lossless, so
            # uint8 tensors give bit-identical inputs to the same image loaded from disk.
            image = F.to_pil_image(image.cpu())
    h, w = image_hw(image)
    resized = F.resize(image, list(eval_size(h, w, size, max_size)), antialias=True)
    return F.normalize(to_float_image(resized), list(IMAGENET_MEAN), list(IMAGENET_STD))


def image_hw(image: Image.Image | Tensor) -> tuple[int, int]:
    """(height, width) of a PIL image or a [..., H, W] tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])
