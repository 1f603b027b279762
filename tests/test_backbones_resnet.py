"""ResNet backbone: norms (official frozen BN, trainable GN/BN for training from scratch) and freezing."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from dinodet.config import BackboneConfig
from dinodet.models.backbones import build_backbone


def _norm_types(backbone: nn.Module) -> set[type]:
    return {type(m) for m in backbone.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm))}


def test_official_default_is_frozen_bn_with_stem_and_layer1_frozen():
    b = build_backbone(BackboneConfig(name="resnet18"))
    assert _norm_types(b) == {FrozenBatchNorm2d}
    frozen = {n.split(".")[0] for n, p in b.body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"}  # FrozenBatchNorm2d has buffers only


@pytest.mark.parametrize("norm, cls", [("gn", nn.GroupNorm), ("bn", nn.BatchNorm2d)])
def test_trainable_norms_and_nothing_frozen(norm, cls):
    b = build_backbone(BackboneConfig(name="resnet18", norm=norm, freeze_at=-1))
    assert _norm_types(b) == {cls}
    assert all(p.requires_grad for p in b.parameters())
    images, mask = torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    feats = b(images, mask)
    assert [f.shape[1:] for f, _ in feats] == [(128, 8, 12), (256, 4, 6), (512, 2, 3)]
    sum(f.sum() for f, _ in feats).backward()
    assert b.body.conv1.weight.grad is not None and b.body.conv1.weight.grad.abs().sum() > 0


def test_group_norm_output_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    b = build_backbone(BackboneConfig(name="resnet18", norm="gn", freeze_at=-1)).train()
    images, mask = torch.randn(3, 3, 64, 64), torch.zeros(3, 64, 64, dtype=torch.bool)
    together = b(images, mask)[-1][0]
    alone = b(images[:1], mask[:1])[-1][0]
    torch.testing.assert_close(alone, together[:1], rtol=1e-5, atol=1e-5)


def test_bad_norm_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown ResNet norm 'ln'"):
        build_backbone(BackboneConfig(name="resnet18", norm="ln"))
    with pytest.raises(ValueError, match="backbone.norm applies to ResNet"):
        build_backbone(BackboneConfig(name="swin_t", norm="gn"))
