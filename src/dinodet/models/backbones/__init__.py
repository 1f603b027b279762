"""Backbone factory: one module per architecture, all returning (features, mask) pairs.

Every backbone takes ``forward(images [B, 3, H, W], mask [B, H, W])`` and returns one
``(features [B, C_i, h_i, w_i], mask [B, h_i, w_i])`` pair per entry of ``return_layers``, and exposes
``num_channels``, ``strides`` and ``return_layers``.  The ImageNet network itself lives under ``body``.
"""
from __future__ import annotations

from torch import nn

from ...config import BackboneConfig
from .convnext import CONVNEXT_VARIANTS, ConvNeXtBackbone
from .resnet import ResNetBackbone
from .swin import SWIN_VARIANTS, SwinBackbone

# official default stochastic depth when BackboneConfig.drop_path_rate is None
_DEFAULT_DROP_PATH = {"swin": 0.2, "convnext": 0.0}


def backbone_family(name: str) -> str:
    """'resnet', 'swin' or 'convnext' for a backbone name; ValueError for unknown names."""
    if name.startswith("resnet"):
        return "resnet"
    if name in SWIN_VARIANTS:
        return "swin"
    if name in CONVNEXT_VARIANTS:
        return "convnext"
    known = ["resnet18", "resnet34", "resnet50", "resnet101", *SWIN_VARIANTS, *CONVNEXT_VARIANTS]
    raise ValueError(f"unknown backbone '{name}' (available: {', '.join(known)})")


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    family = backbone_family(cfg.name)
    if family == "resnet":
        if cfg.frozen_stages != -1 or cfg.use_checkpoint:
            raise ValueError("frozen_stages / use_checkpoint apply to Swin and ConvNeXt; ResNet uses freeze_at")
        return ResNetBackbone(cfg.name, cfg.return_layers, cfg.dilation, cfg.freeze_at, cfg.norm)
    if cfg.norm != "frozen_bn":
        raise ValueError("backbone.norm applies to ResNet backbones only")
    rate = _DEFAULT_DROP_PATH[family] if cfg.drop_path_rate is None else cfg.drop_path_rate
    if family == "swin":
        return SwinBackbone(cfg.name, cfg.return_layers, cfg.window_size, rate, cfg.use_checkpoint,
                            cfg.frozen_stages, cfg.dilation)
    if cfg.dilation:
        raise ValueError("dilation is not available for ConvNeXt backbones")
    return ConvNeXtBackbone(cfg.name, cfg.return_layers, rate, cfg.use_checkpoint, cfg.frozen_stages)
