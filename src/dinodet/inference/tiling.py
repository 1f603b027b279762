"""Tiled inference for small objects in large images (``--tile SIZE``), with ``supervision.InferenceSlicer``.

The model sees an image resized to its input size (short side 800 for the official models), so in a
4000-pixel photo a 20-pixel object shrinks to 4 pixels and is missed.  Tiling runs the detector on
overlapping SIZE x SIZE crops (each resized up to the input size), shifts their boxes to full-image
pixels and merges them with class-wise NMS (IoU ``iou``); the whole image is also predicted once
(``full_image``, as SAHI does) so that objects larger than a tile are still found whole.  An image
no larger than one tile is predicted as is: its detections are exactly the untiled ones.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .extras import require

DEFAULT_OVERLAP = 0.2
DEFAULT_IOU = 0.5


def check_tiling(tile: int | None, overlap: float) -> None:
    """Raises ConfigError: a tile under 32 pixels or an overlap outside [0, 0.9]."""
    if tile is not None and tile < 32:
        raise ConfigError(f"--tile must be >= 32 pixels, got {tile}")
    if not 0.0 <= overlap <= 0.9:
        raise ConfigError(f"--tile-overlap must be in [0, 0.9], got {overlap}")


class TilingDetector:
    """A detector (``Detector``, ``OnnxDetector``, ...) run on overlapping ``tile`` x ``tile`` crops
    (``overlap``: the fraction of a tile shared with its neighbour) of every image larger than one
    tile, plus the whole image when ``full_image``; boxes in full-image pixels, merged with class-wise
    NMS at IoU ``iou``.  ``predict`` takes and gives what the wrapped detector does.

    Raises:
        ConfigError: supervision is missing (``pip install 'dinodet[video]'``), or a bad tile/overlap.
    """

    def __init__(self, detector: Any, tile: int, overlap: float = DEFAULT_OVERLAP, iou: float = DEFAULT_IOU,
                 full_image: bool = True):
        check_tiling(tile, overlap)
        self.sv = require("supervision", "tiled inference (--tile)")
        self.detector, self.tile, self.overlap, self.iou, self.full_image = detector, tile, overlap, iou, full_image
        self.class_names = detector.class_names

    def predict(self, images: Sequence[Any], threshold: float = 0.3, batch_size: int = 1) -> list[Any]:
        """One Prediction per image; ``batch_size`` tiles per forward pass."""
        results = []
        for image in images:
            pixels = _as_rgb_array(image)
            h, w = pixels.shape[:2]
            if h <= self.tile and w <= self.tile:
                results.extend(self.detector.predict([pixels], threshold=threshold, batch_size=1))
                continue
            results.append(self._predict_tiled(pixels, threshold, batch_size))
        return results

    def _predict_tiled(self, pixels: np.ndarray, threshold: float, batch_size: int) -> Any:
        """pixels uint8 [H, W, 3] RGB -> the merged Prediction."""
        def detect(tiles: np.ndarray | list[np.ndarray]) -> Any:
            batch = tiles if isinstance(tiles, list) else [tiles]
            preds = self.detector.predict([np.ascontiguousarray(t) for t in batch], threshold=threshold,
                                          batch_size=len(batch))
            found = [p.to_supervision() for p in preds]
            return found if isinstance(tiles, list) else found[0]

        slicer = self.sv.InferenceSlicer(callback=detect, slice_wh=self.tile,
                                         overlap_wh=round(self.tile * self.overlap), iou_threshold=self.iou,
                                         overlap_filter="non_max_suppression", batch_size=batch_size)
        merged = slicer(pixels)
        if self.full_image:
            whole = detect(pixels)
            merged = self.sv.Detections.merge([merged, whole]).with_nms(threshold=self.iou)
        return self._to_prediction(merged, pixels.shape[:2])

    def _to_prediction(self, found: Any, image_size: tuple[int, int]) -> Any:
        """supervision Detections (as ``Prediction.to_supervision`` made them) -> a Prediction sorted by score."""
        import torch

        from .detector import Prediction

        order = np.argsort(-found.confidence, kind="stable") if len(found) else np.zeros(0, dtype=np.int64)
        found = found[order] if len(found) else found
        n = len(found)
        return Prediction(
            boxes=torch.as_tensor(np.asarray(found.xyxy, dtype=np.float32).reshape(n, 4)),
            scores=torch.as_tensor(np.asarray(found.confidence if n else [], dtype=np.float32)),
            labels=torch.as_tensor(np.asarray(found.class_id if n else [], dtype=np.int64)),
            category_ids=torch.as_tensor(np.asarray(found.data["category_id"] if n else [], dtype=np.int64)),
            class_names=[str(c) for c in (found.data["class_name"] if n else [])],
            image_size=(int(image_size[0]), int(image_size[1])),
        )


def _as_rgb_array(image: Any) -> np.ndarray:
    """A path, PIL image, uint8 [H, W, 3] array or [3, H, W] tensor as a uint8 [H, W, 3] RGB array."""
    import torch

    from ..data.images import load_image, to_rgb

    if isinstance(image, (str, Path)):
        return np.asarray(load_image(image))
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    if isinstance(image, torch.Tensor):
        data = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
        return data.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    if isinstance(image, np.ndarray):
        return np.asarray(to_rgb(Image.fromarray(image)))
    raise ValueError(f"unsupported image type {type(image).__name__}")
