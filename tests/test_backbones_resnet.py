"""ResNet backbone: norms (official frozen BN, trainable GN/BN for training from scratch) and freezing."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d as TorchvisionFrozenBN

from dinodet.config import BackboneConfig
from dinodet.models.backbones import build_backbone
from dinodet.models.backbones.resnet import FrozenBatchNorm2d


def _norm_types(backbone: nn.Module) -> set[type]:
    return {type(m) for m in backbone.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm))}


def test_official_default_is_frozen_bn_with_stem_and_layer1_frozen():
    b = build_backbone(BackboneConfig(name="resnet18"))
    assert _norm_types(b) == {FrozenBatchNorm2d}
    frozen = {n.split(".")[0] for n, p in b.body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"}  # FrozenBatchNorm2d has buffers only


def test_cached_frozen_bn_equals_torchvision_and_follows_its_buffers():
    ours, ref = FrozenBatchNorm2d(8), TorchvisionFrozenBN(8)
    x = torch.randn(2, 8, 5, 7)
    for shift in (0.0, 1.0):  # the second load changes the buffers in place: the cached affine must follow
        sd = {k: torch.rand(8, generator=torch.Generator().manual_seed(i)) + 0.5 + shift
              for i, k in enumerate(("weight", "bias", "running_mean", "running_var"))}
        ours.load_state_dict(sd)
        ref.load_state_dict(sd)
        assert torch.equal(ours(x), ref(x))
        with torch.inference_mode():
            assert torch.equal(ours(x), ref(x))
    with torch.no_grad():
        ours.running_var.mul_(2)
        ref.running_var.mul_(2)
    assert torch.equal(ours(x), ref(x))
    assert torch.equal(ours.double()(x.double()), ref.double()(x.double()))  # .to() drops the cache
    x.requires_grad_()
    ours.float()(x).sum().backward()  # the cached affine is a constant for autograd
    assert x.grad is not None and torch.equal(x.grad, ours._affine[1].expand_as(x))


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
