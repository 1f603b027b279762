"""The one model builder: a ``DINOConfig`` in, an initialised ``DINO`` out.

Weights are somebody else's business: the checkpoint module loads files into the built model
(official or dinodet checkpoints, ImageNet backbone weights).
"""
from __future__ import annotations

from ..config import DINOConfig
from ..errors import ConfigError
from .dino import DINO


def build_model(cfg: DINOConfig) -> DINO:
    """Instantiate the architecture ``cfg.model`` describes (named after ``cfg.name``), randomly
    initialised.  A config whose settings do not fit together is a ConfigError."""
    try:
        return DINO(cfg.model, cfg.name)
    except ValueError as e:  # an unknown backbone, norm or kernel name, or settings that do not fit together
        raise ConfigError(f"model config: {e}") from None
