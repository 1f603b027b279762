"""dinodet: the DINO object detector (IDEA-Research), pip-installable.

    from dinodet import Detector
    detector = Detector.from_checkpoint("checkpoint0011_4scale.pth")
    predictions = detector.predict(["image.jpg"])

Public names are imported lazily (PEP 562), so ``import dinodet`` and ``dinodet --help`` do not pay
the several seconds torch + torchvision take to import until a model is actually needed.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Detector": ".inference.detector",
    "Prediction": ".inference.detector",
    "DINOConfig": ".config",
    "DinodetError": ".errors",
    "ConfigError": ".errors",
    "DatasetError": ".errors",
    "TrainingError": ".errors",
    "ExportError": ".errors",
    "get_preset": ".presets",
    "list_presets": ".presets",
    "load_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "CheckpointError": ".errors",
    "load_image": ".data.images",
    "ImageLoadError": ".errors",
    "draw_detections": ".visualize",
    "COCO_CLASSES": ".data.coco_classes",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # static analysers and IDEs see ordinary imports
    from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from .config import ConfigError, DINOConfig
    from .data.coco_classes import COCO_CLASSES
    from .data.images import ImageLoadError, load_image
    from .inference.detector import Detector, Prediction
    from .presets import get_preset, list_presets
    from .visualize import draw_detections


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dinodet' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
