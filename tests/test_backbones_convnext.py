"""ConvNeXt backbone: official numerics, shapes and masks, memory options, key names, checkpoints.

Unit tests use a micro ConvNeXt registered for this module only.
"""
import argparse
import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import OFFICIAL

from dinodet.checkpoint import CheckpointError, init_from_config, load_checkpoint
from dinodet.compat.official_args import config_from_official_args
from dinodet.compat.official_keys import original_backbone_name, to_official
from dinodet.config import BackboneConfig
from dinodet.data.transforms import pad_batch
from dinodet.models import build_model
from dinodet.models.backbones import build_backbone
from dinodet.models.backbones.convnext import CONVNEXT_VARIANTS, ConvNeXtBackbone
from dinodet.models.dino import DINO
from dinodet.models.masks import resample_mask
from dinodet.presets import get_preset

MICRO = "convnext_micro"


@pytest.fixture(scope="module", autouse=True)
def micro_variant():
    mp = pytest.MonkeyPatch()
    mp.setitem(CONVNEXT_VARIANTS, MICRO, ((1, 1, 2, 1), (16, 32, 64, 128)))
    mp.setitem(CONVNEXT_VARIANTS, MICRO + "_wide", ((1, 1, 2, 1), (32, 64, 128, 256)))
    yield
    mp.undo()


def _micro(**kw) -> ConvNeXtBackbone:
    kw.setdefault("return_layers", (0, 1, 2, 3))
    torch.manual_seed(0)
    bb = ConvNeXtBackbone(MICRO, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial values everywhere (layer scale 1e-6 would hide the blocks)
        for n, p in bb.named_parameters():
            offset = 1.0 if ("norm" in n or "stem.1" in n or "downsample.0" in n) and n.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + offset)
    return bb


def _batch(sizes, seed=2):
    g = torch.Generator().manual_seed(seed)
    return pad_batch([torch.randn(3, h, w, generator=g) for h, w in sizes])


def _official_forward(bb: ConvNeXtBackbone, x: torch.Tensor) -> list[torch.Tensor]:
    """DINO's ConvNeXt written out with plain ops: channels-first LayerNorm spelled out as in the
    official module, blocks as dwconv -> LN -> Linear -> GELU -> Linear -> gamma -> residual."""
    st = dict(bb.body.named_parameters())

    def ln_cf(x, prefix):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return st[prefix + ".weight"][:, None, None] * x + st[prefix + ".bias"][:, None, None]

    x = ln_cf(F.conv2d(x, st["stem.0.weight"], st["stem.0.bias"], stride=4), "stem.1")
    outs = []
    for i, stage in enumerate(bb.body.stages):
        if i > 0:
            x = ln_cf(x, f"stages.{i}.downsample.0")
            x = F.conv2d(x, st[f"stages.{i}.downsample.1.weight"], st[f"stages.{i}.downsample.1.bias"], stride=2)
        for j in range(len(stage.blocks)):
            p = f"stages.{i}.blocks.{j}."
            y = F.conv2d(x, st[p + "conv_dw.weight"], st[p + "conv_dw.bias"], padding=3, groups=x.shape[1])
            y = y.permute(0, 2, 3, 1)
            y = F.layer_norm(y, (y.shape[-1],), st[p + "norm.weight"], st[p + "norm.bias"], 1e-6)
            y = F.linear(F.gelu(F.linear(y, st[p + "mlp.fc1.weight"], st[p + "mlp.fc1.bias"])),
                         st[p + "mlp.fc2.weight"], st[p + "mlp.fc2.bias"])
            x = x + (st[p + "gamma"] * y).permute(0, 3, 1, 2)
        if i in bb.return_layers:
            outs.append(ln_cf(x, f"norm{i}"))
    return outs


def test_matches_the_official_formulation():
    bb = _micro().eval()  # float32: CPU float64 depthwise convolutions are very slow
    images, mask = _batch([(97, 131), (50, 37)])
    with torch.no_grad():
        ours = bb(images, mask)
        ref = _official_forward(bb, images)
    for (f, _), r in zip(ours, ref):
        assert torch.allclose(f, r, atol=2e-5, rtol=1e-5)  # equal up to float32 rounding


def test_shapes_and_masks_for_odd_image_sizes():
    bb = _micro().eval()
    images, mask = _batch([(97, 131), (61, 40)])
    with torch.no_grad():
        feats = bb(images, mask)
    # strided convs floor: 97x131 -> 24x32 -> 12x16 -> 6x8 -> 3x4
    assert [tuple(f.shape[-2:]) for f, _ in feats] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    assert [f.shape[1] for f, _ in feats] == bb.num_channels == [16, 32, 64, 128]
    assert bb.strides == [4, 8, 16, 32]
    for f, m in feats:
        assert torch.equal(m, resample_mask(mask, f.shape[-2:]))
        assert not m[0].any() and m[1].any() and torch.isfinite(f).all()
    four = _micro(return_layers=(1, 2, 3)).eval()
    with torch.no_grad():
        assert [f.shape[1] for f, _ in four(images, mask)] == [32, 64, 128]
    # every stage has its output norm (official layout); unused ones are frozen
    assert not four.body.norm0.weight.requires_grad and four.body.norm1.weight.requires_grad


def test_checkpointing_and_frozen_stages_do_not_change_outputs():
    base = _micro()
    other = _micro(use_checkpoint=True, frozen_stages=1)
    images, mask = _batch([(67, 45), (50, 37)])
    base.eval(), other.eval()
    with torch.no_grad():
        for (fa, _), (fb, _) in zip(base(images, mask), other(images, mask)):
            assert torch.equal(fa, fb)
    grads = []
    for m in (base, other):
        m.train()
        m.zero_grad(set_to_none=True)
        sum((f * torch.linspace(-1, 1, f.shape[1]).view(1, -1, 1, 1)).sum() for f, _ in m(images, mask)).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, p in other.named_parameters():
        frozen = n.startswith(("body.stem.", "body.stages.0."))
        assert p.requires_grad != frozen, n
        if not frozen:
            assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
    other.train()
    assert not other.body.stages[0].training and other.body.stages[1].training


def test_config_builds_convnext():
    bb = build_backbone(BackboneConfig(name=MICRO, return_layers=(1, 2, 3), drop_path_rate=0.1, use_checkpoint=True))
    assert bb.body.use_checkpoint and bb.num_channels == [32, 64, 128]
    rates = [m.drop_prob for m in bb.modules() if hasattr(m, "drop_prob")]
    assert len(rates) == 4 and abs(max(rates) - 0.1) < 1e-6  # first block has rate 0 (no DropPath)
    with pytest.raises(ValueError, match="dilation"):
        build_backbone(BackboneConfig(name=MICRO, dilation=True))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone(BackboneConfig(name="convnext_huge"))


# ----------------------------------------------------------------------------------- official layout

def _official_convnext_names(depths, levels) -> set[str]:
    """Backbone keys of the official DINO ConvNeXt module (read from its code: downsample_layers,
    stages.{i}.{j}.{dwconv,norm,pwconv1,pwconv2,gamma}, norm0..3 for every stage)."""
    names = set()
    for i in range(4):
        for part in ("0.weight", "0.bias", "1.weight", "1.bias"):
            names.add(f"backbone.0.downsample_layers.{i}.{part}")
        for j in range(depths[i]):
            for sub in ("dwconv.weight", "dwconv.bias", "norm.weight", "norm.bias", "pwconv1.weight", "pwconv1.bias",
                        "pwconv2.weight", "pwconv2.bias", "gamma"):
                names.add(f"backbone.0.stages.{i}.{j}.{sub}")
        names |= {f"backbone.0.norm{i}.weight", f"backbone.0.norm{i}.bias"}
    return names


@pytest.mark.parametrize("preset,levels", [("dino_convnext_xl_4scale", 4), ("dino_convnext_xl_5scale", 5)])
def test_official_key_names(preset, levels):
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = DINO(cfg.model)
    official = to_official(model.state_dict(), cfg.model.dec_layers, len(cfg.model.backbone.return_layers))
    backbone = {k for k in official if k.startswith("backbone.")}
    assert backbone == _official_convnext_names((3, 3, 27, 3), levels)
    assert official["backbone.0.downsample_layers.0.0.weight"].shape == (256, 3, 4, 4)
    assert official["backbone.0.stages.3.2.pwconv1.weight"].shape == (8192, 2048)
    assert official[f"input_proj.{levels - 1}.0.weight"].shape[1] == 2048


@pytest.mark.parametrize("size,name", [("t", "convnext_tiny"), ("s", "convnext_small"), ("b", "convnext_base"),
                                       ("l", "convnext_large"), ("xl", "convnext_xlarge")])
def test_presets(size, name):
    from dinodet.config import DINOConfig

    cfg = get_preset(f"dino_convnext_{size}_4scale")
    assert cfg.model.backbone.name == name and cfg.model.backbone.return_layers == (1, 2, 3)
    assert DINOConfig.from_json(cfg.to_json()) == cfg


def test_official_args_give_the_preset():
    path = OFFICIAL / "DINO_4scale.args.json"
    args = dict(json.loads(path.read_text()), backbone="convnext_xlarge_22k")
    cfg = config_from_official_args(args)
    want = get_preset("dino_convnext_xl_4scale")
    assert cfg.model == want.model and cfg.loss == want.loss


def test_official_round_trip_tiny_convnext(tmp_path):
    cfg = get_preset("tiny")
    cfg.name = "tiny_convnext"
    cfg.model.backbone = BackboneConfig(name=MICRO, return_layers=(1, 2, 3), drop_path_rate=0.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    state = to_official(model.state_dict(), cfg.model.dec_layers, 3)
    path = tmp_path / "official.pth"
    torch.save({"model": state, "args": argparse.Namespace(), "epoch": 1}, path)
    import dinodet.presets as presets

    mp = pytest.MonkeyPatch()
    mp.setitem(presets._PRESETS, cfg.name, lambda: cfg)
    try:
        loaded = load_checkpoint(path, preset=cfg.name)
    finally:
        mp.undo()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k


def test_original_layout_names_agree_with_timms_converter():
    """The official DINO checkpoints use the facebookresearch/ConvNeXt names; our mapping to them must be
    the inverse of timm's own converter from that layout (``checkpoint_filter_fn``): an independent
    statement of the same naming."""
    from timm.models.convnext import checkpoint_filter_fn

    bb = _micro()
    body = {k: v for k, v in bb.body.state_dict().items() if not re.match(r"norm\d", k)}
    original = {original_backbone_name(k): v for k, v in body.items()}
    assert len(original) == len(body)
    back = checkpoint_filter_fn(original, bb.body)
    assert set(back) == set(body)
    for k, v in body.items():
        assert torch.equal(back[k], v), k


# ------------------------------------------------------------------------------ ImageNet checkpoints

@pytest.mark.parametrize("layout", ["original", "timm"])
def test_imagenet_checkpoint_loads_as_backbone(tmp_path, layout):
    ref = _micro(return_layers=(1, 2, 3))
    body = {k: v.clone() for k, v in ref.body.state_dict().items() if not re.match(r"norm\d", k)}
    if layout == "original":  # facebookresearch/ConvNeXt release: {'model': ...} with a final norm and head
        state = {original_backbone_name(k): v for k, v in body.items()}
        assert "downsample_layers.0.0.weight" in state and "stages.2.1.pwconv2.weight" in state
        state.update({"norm.weight": torch.ones(128), "norm.bias": torch.zeros(128),
                      "head.weight": torch.zeros(5, 128), "head.bias": torch.zeros(5)})
        obj = {"model": state}
    else:
        obj = dict(body, **{"head.norm.weight": torch.ones(128), "head.fc.weight": torch.zeros(5, 128)})
    path = tmp_path / "convnext.pth"
    torch.save(obj, path)
    cfg = get_preset("tiny")
    cfg.model.backbone = BackboneConfig(name=MICRO, return_layers=(1, 2, 3), checkpoint=str(path))
    model = init_from_config(cfg)
    ours = model.backbone.body.state_dict()
    for k, v in body.items():
        assert torch.equal(ours[k], v), k

    cfg.model.backbone.name = MICRO + "_wide"
    with pytest.raises(CheckpointError) as e:
        init_from_config(cfg)
    assert "has shape (16, 3, 4, 4) but backbone 'convnext_micro_wide' expects (32, 3, 4, 4)" in str(e.value)
    assert ("downsample_layers.0.0.weight" if layout == "original" else "stem.0.weight") in str(e.value)
