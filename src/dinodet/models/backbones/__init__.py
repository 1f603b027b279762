"""Backbone factory: one module per architecture, all returning (features, mask) pairs."""
from __future__ import annotations

from torch import nn

from ...config import BackboneConfig
from .resnet import ResNetBackbone


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    if cfg.name.startswith("resnet"):
        return ResNetBackbone(cfg.name, cfg.return_layers, cfg.dilation, cfg.freeze_at)
    raise ValueError(f"unknown backbone '{cfg.name}'")
