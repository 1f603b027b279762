"""Named, fully resolved configurations.

``dino_r50_4scale`` / ``dino_r50_5scale`` reproduce the official ``DINO_4scale`` / ``DINO_5scale``
configs (values in the official ``*.args.json``), ``dino_swinl_4scale`` / ``dino_swinl_5scale`` the
official ``DINO_4scale_swin`` (and its 5-scale variant); ``dino_convnext_{t,s,b,l,xl}_4scale`` (and
``dino_convnext_xl_5scale``) put a ConvNeXt backbone under the same detector; ``tiny`` is a light
CPU-friendly model for demos and tests.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

from .config import BackboneConfig, ConfigError, DataConfig, DINOConfig, LossConfig, ModelConfig, TrainConfig


def _r50_4scale() -> DINOConfig:
    return DINOConfig(name="dino_r50_4scale", model=ModelConfig(), loss=LossConfig())


def _r50_5scale() -> DINOConfig:
    model = ModelConfig(backbone=BackboneConfig(return_layers=(0, 1, 2, 3)), num_feature_levels=5)
    cfg = DINOConfig(name="dino_r50_5scale", model=model, loss=LossConfig())
    cfg.train.batch_size = 1  # as the official DINO_5scale config
    return cfg


def _r101_4scale() -> DINOConfig:
    model = ModelConfig(backbone=BackboneConfig(name="resnet101"))
    return DINOConfig(name="dino_r101_4scale", model=model, loss=LossConfig())


def _swinl(levels: int) -> Callable[[], DINOConfig]:
    """Official DINO_4scale_swin / DINO_5scale_swin: Swin-L, window 12 (the 384-pretrained 22k release),
    stochastic depth 0.2, activation checkpointing on."""
    def make() -> DINOConfig:
        backbone = BackboneConfig(name="swin_l", return_layers=(1, 2, 3) if levels == 4 else (0, 1, 2, 3),
                                  window_size=12, drop_path_rate=0.2, use_checkpoint=True)
        cfg = DINOConfig(name=f"dino_swinl_{levels}scale", model=ModelConfig(backbone=backbone, num_feature_levels=levels),
                         loss=LossConfig())
        if levels == 5:
            cfg.train.batch_size = 1  # as the official 5-scale configs
        return cfg

    return make


_CONVNEXT_SIZES = {"t": "convnext_tiny", "s": "convnext_small", "b": "convnext_base", "l": "convnext_large",
                   "xl": "convnext_xlarge"}


def _convnext(size: str, levels: int) -> Callable[[], DINOConfig]:
    """DINO_4scale with a ConvNeXt backbone (the official code ships ConvNeXt-XL 22k), no stochastic depth."""
    def make() -> DINOConfig:
        backbone = BackboneConfig(name=_CONVNEXT_SIZES[size], return_layers=(1, 2, 3) if levels == 4 else (0, 1, 2, 3),
                                  drop_path_rate=0.0)
        return DINOConfig(name=f"dino_convnext_{size}_{levels}scale",
                          model=ModelConfig(backbone=backbone, num_feature_levels=levels), loss=LossConfig())

    return make


def _tiny() -> DINOConfig:
    model = ModelConfig(
        # trained from scratch (no ImageNet weights are downloaded): GroupNorm instead of frozen BN and
        # nothing frozen; a randomly initialised frozen stem and un-normalised stages learn far slower
        backbone=BackboneConfig(name="resnet18", return_layers=(1, 2, 3), freeze_at=-1, norm="gn"),
        hidden_dim=64,
        num_heads=4,
        num_feature_levels=4,
        enc_layers=2,
        dec_layers=3,
        dim_feedforward=256,
        num_queries=60,
        # the official rule from 50 on: about 2 x 50 denoising queries whatever the object count
        # (below 50 the value is a fixed number of groups, which grows with crowded images)
        dn_number=50,
        num_select=60,
    )
    data = DataConfig(train_scales=(224, 256, 288, 320), max_size=512, crop_resize_scales=(200, 250, 300),
                      crop_size=(192, 300), eval_size=320, num_workers=0)
    train = TrainConfig(epochs=12, batch_size=4, lr=2e-4, lr_backbone=2e-5, lr_drop=10)
    return DINOConfig(name="tiny", model=model, loss=LossConfig(), data=data, train=train)


def _schedule(base: Callable[[], DINOConfig], epochs: int, lr_drop: int, suffix: str) -> Callable[[], DINOConfig]:
    def make() -> DINOConfig:
        cfg = base()
        cfg.name = f"{cfg.name}_{suffix}"
        cfg.train.epochs, cfg.train.lr_drop = epochs, lr_drop
        return cfg

    return make


_PRESETS: dict[str, Callable[[], DINOConfig]] = {
    "dino_r50_4scale": _r50_4scale,
    "dino_r50_5scale": _r50_5scale,
    "dino_r101_4scale": _r101_4scale,
    "dino_swinl_4scale": _swinl(4),
    "dino_swinl_5scale": _swinl(5),
    **{f"dino_convnext_{s}_4scale": _convnext(s, 4) for s in _CONVNEXT_SIZES},
    "dino_convnext_xl_5scale": _convnext("xl", 5),
    "tiny": _tiny,
}
for _base in ("dino_r50_4scale", "dino_r50_5scale", "dino_swinl_4scale", "dino_swinl_5scale"):
    _PRESETS[f"{_base}_24ep"] = _schedule(_PRESETS[_base], 24, 20, "24ep")
    _PRESETS[f"{_base}_36ep"] = _schedule(_PRESETS[_base], 36, 30, "36ep")


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str, num_classes: int | None = None) -> DINOConfig:
    """Return a fresh copy of preset ``name`` (optionally with another class count)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset '{name}' (available: {', '.join(list_presets())})")
    cfg = copy.deepcopy(_PRESETS[name]())
    if num_classes is not None:
        cfg.model.num_classes = num_classes
        cfg.model.dn_labelbook_size = None
    return cfg
