"""Swin backbone: shapes and masks for odd sizes, window numerics, memory options, checkpoints.

Unit tests use a micro Swin (embed 16, two blocks per stage so shifted windows are exercised) that is
registered for this module only; the full Swin-L is only instantiated on the meta device here (its
numerics are covered by the parity test).
"""
import argparse
import json
import re

import pytest
import torch
from conftest import OFFICIAL

from dinodet.checkpoint import CheckpointError, init_from_config, load_checkpoint
from dinodet.compat.official_args import config_from_official_args
from dinodet.compat.official_keys import official_key_map, original_backbone_name, to_official
from dinodet.compat.reference_run import apply_train_overrides
from dinodet.config import BackboneConfig
from dinodet.data.transforms import pad_batch
from dinodet.models import build_model
from dinodet.models.backbones import build_backbone
from dinodet.models.backbones.swin import SWIN_VARIANTS, SwinBackbone, shifted_window_mask
from dinodet.models.dino import DINO
from dinodet.models.masks import resample_mask
from dinodet.presets import get_preset

MICRO = "swin_micro"


@pytest.fixture(scope="module", autouse=True)
def micro_variant():
    mp = pytest.MonkeyPatch()
    mp.setitem(SWIN_VARIANTS, MICRO, (16, (2, 2, 2, 2), (1, 2, 2, 4)))
    yield
    mp.undo()


def _micro(**kw) -> SwinBackbone:
    kw.setdefault("return_layers", (0, 1, 2, 3))
    kw.setdefault("window_size", 7)
    kw.setdefault("drop_path_rate", 0.0)
    torch.manual_seed(0)
    return SwinBackbone(MICRO, **kw)


def _randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial values for every parameter (unit LayerNorms and zero biases hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            offset = 1.0 if "norm" in n and n.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + offset)


def _batch(sizes, seed=2):
    g = torch.Generator().manual_seed(seed)
    return pad_batch([torch.randn(3, h, w, generator=g) for h, w in sizes])


def _tiny_swin_config(levels=4):
    cfg = get_preset("tiny")
    cfg.name = f"tiny_swin_{levels}"
    cfg.model.backbone = BackboneConfig(name=MICRO, return_layers=(1, 2, 3) if levels == 4 else (0, 1, 2, 3),
                                        window_size=7, drop_path_rate=0.1)
    cfg.model.num_feature_levels = levels
    return cfg


# ---------------------------------------------------------------------------------------- shapes/masks

@pytest.mark.parametrize("window", [7, 12])
def test_shapes_and_masks_for_odd_image_sizes(window):
    bb = _micro(window_size=window).eval()
    images, mask = _batch([(97, 131), (61, 40)])
    with torch.no_grad():
        feats = bb(images, mask)
    # patch embedding pads 97x131 to 100x132 -> 25x33, then patch merging rounds up
    expected = [(25, 33), (13, 17), (7, 9), (4, 5)]
    assert [tuple(f.shape[-2:]) for f, _ in feats] == expected
    assert [f.shape[1] for f, _ in feats] == bb.num_channels == [16, 32, 64, 128]
    assert bb.strides == [4, 8, 16, 32]
    for f, m in feats:
        assert m.dtype == torch.bool and m.shape == (2, *f.shape[-2:])
        assert torch.equal(m, resample_mask(mask, f.shape[-2:]))
        assert not m[0].any() and m[1].any()
        assert torch.isfinite(f).all()
    # second image covers rows < 61 of 97: nearest resize at stride 4 marks rows >= 16 as padding
    assert feats[0][1][1, 16:].all() and not feats[0][1][1, :15, :10].any()


def test_return_layers_and_dilation():
    bb = _micro(return_layers=(1, 2, 3)).eval()
    assert bb.num_channels == [32, 64, 128] and bb.strides == [8, 16, 32]
    assert {n.split(".")[0] for n, _ in bb.body.named_parameters() if n.startswith("norm")} == {"norm1", "norm2", "norm3"}
    dil = _micro(return_layers=(1, 2, 3), dilation=True).eval()
    images, mask = _batch([(64, 96)])
    with torch.no_grad():
        feats = dil(images, mask)
    assert dil.strides == [8, 16, 16] and dil.num_channels == [32, 64, 64]
    assert [tuple(f.shape[1:]) for f, _ in feats] == [(32, 8, 12), (64, 4, 6), (64, 4, 6)]
    with pytest.raises(ValueError, match="return_layers"):
        _micro(return_layers=(4,))


def test_tiny_image_smaller_than_one_window():
    bb = _micro(window_size=12).eval()
    images, mask = _batch([(20, 9)])
    with torch.no_grad():
        feats = bb(images, mask)
    assert [tuple(f.shape[-2:]) for f, _ in feats] == [(5, 3), (3, 2), (2, 1), (1, 1)]
    assert all(torch.isfinite(f).all() for f, _ in feats)


# ------------------------------------------------------------------------------------------- numerics

def test_shifted_window_mask_regions():
    # 8x8 map, window 4, shift 2: 4 windows; the last window row/col mixes two regions per axis
    m = shifted_window_mask(8, 8, 4, 2, torch.float32, "cpu")
    assert m.shape == (4, 16, 16)
    assert (m[0] == 0).all()  # top-left window lies entirely in region (0, 0)
    assert set(m.unique().tolist()) == {0.0, -100.0}
    # window 1 (top-right): columns 0-1 of the window belong to one region, 2-3 to another
    tok = torch.arange(16).view(4, 4)
    a, b = tok[0, 0].item(), tok[0, 3].item()
    assert m[1, a, b] == -100 and m[1, a, tok[3, 1]] == 0
    # window 3 (bottom-right) has four regions
    assert (m[3] == 0).sum() == 4 * 4 * 4


def test_matches_timm_where_both_agree():
    """On maps that are multiples of the window (no padding) timm's Swin computes the same stages."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    bb = _micro(window_size=7).eval()
    _randomise(bb.body)
    ref = timm_swin.SwinTransformer(img_size=224, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                    window_size=7, num_classes=0, always_partition=True).eval()
    state = {}
    for k, v in bb.body.state_dict().items():
        m = re.match(r"^layers\.(\d+)\.downsample\.(.+)$", k)
        if m:  # timm opens stage i+1 with the patch merging that closes our stage i
            k = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        state[k] = v
    result = ref.load_state_dict(state, strict=False)
    assert not [k for k in result.missing_keys if "relative_position_index" not in k and not k.startswith("norm.")]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = bb(x, torch.zeros(2, 224, 224, dtype=torch.bool))
        theirs = ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=False, output_fmt="NCHW", intermediates_only=True)
    for i, ((f, _), t) in enumerate(zip(ours, theirs)):
        t = getattr(bb.body, f"norm{i}")(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        assert torch.allclose(f, t, atol=1e-5, rtol=1e-4), i


# ------------------------------------------------------------------------------------- memory options

def test_checkpointing_and_frozen_stages_do_not_change_outputs():
    base = _micro(drop_path_rate=0.2)
    _randomise(base.body)
    other = _micro(drop_path_rate=0.2, use_checkpoint=True, frozen_stages=2)
    other.load_state_dict(base.state_dict())
    images, mask = _batch([(97, 131), (61, 40)])
    for m in (base, other):
        m.eval()
    with torch.no_grad():
        for (fa, ma), (fb, mb) in zip(base(images, mask), other(images, mask)):
            assert torch.equal(fa, fb) and torch.equal(ma, mb)
    # train mode without stochastic depth: same outputs and the same gradients for trainable params
    grads = []
    for m in (base, other):
        m.train()
        apply_train_overrides(m, {"drop_path_rate": 0.0})
        m.zero_grad(set_to_none=True)
        loss = sum((f * torch.linspace(-1, 1, f.shape[1]).view(1, -1, 1, 1)).sum() for f, _ in m(images, mask))
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, p in other.named_parameters():
        frozen = n.startswith(("body.patch_embed.", "body.layers.0.", "body.layers.1."))
        assert p.requires_grad != frozen, n
        if frozen:
            assert grads[1][n] is None
        else:
            assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
    # frozen stages stay in eval mode (no stochastic depth there), the rest trains
    other.train()
    assert not other.body.layers[1].training and not other.body.patch_embed.training
    assert other.body.layers[2].training and other.training


def test_stochastic_depth_is_switchable():
    bb = _micro(drop_path_rate=0.3).train()
    drops = [m for m in bb.modules() if hasattr(m, "drop_prob")]
    assert len(drops) == 8 and drops[0].drop_prob == 0.0 and abs(drops[-1].drop_prob - 0.3) < 1e-6
    images, mask = _batch([(64, 64)])
    apply_train_overrides(bb, {"drop_path_rate": 0.0})
    a = bb(images, mask)[-1][0]
    b = bb.eval()(images, mask)[-1][0]
    assert torch.allclose(a, b)


def test_config_knobs_reach_the_backbone():
    cfg = BackboneConfig(name=MICRO, return_layers=(1, 2, 3), window_size=12, use_checkpoint=True, frozen_stages=0)
    bb = build_backbone(cfg)
    assert bb.body.layers[0].blocks[0].window_size == 12
    assert all(s.use_checkpoint for s in bb.body.layers)
    assert not any(p.requires_grad for p in bb.body.patch_embed.parameters())
    assert all(p.requires_grad for p in bb.body.layers[0].parameters())
    # None = the official default rate 0.2 at the last block
    assert abs(max(m.drop_prob for m in bb.modules() if hasattr(m, "drop_prob")) - 0.2) < 1e-6
    with pytest.raises(ValueError, match="freeze_at"):
        build_backbone(BackboneConfig(name="resnet50", frozen_stages=1))


# ---------------------------------------------------------------------------------- official key names

@pytest.mark.parametrize("name,preset", [("DINO_4scale_swin", "dino_swinl_4scale"), ("DINO_5scale_swin", "dino_swinl_5scale")])
def test_official_key_names_match_reference_listing(name, preset):
    listing = OFFICIAL / f"{name}.keys.tsv"
    rows = [line.split("\t") for line in listing.read_text().splitlines()[1:]]
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = DINO(cfg.model)
    state = model.state_dict()
    key_map = official_key_map(list(state), cfg.model.dec_layers, len(cfg.model.backbone.return_layers))
    assert set(key_map) == {r[0] for r in rows}
    assert set(key_map.values()) == set(state)
    for key, shape, dtype, _alias in rows:
        assert "x".join(map(str, state[key_map[key]].shape)) == shape, key
        assert str(state[key_map[key]].dtype).removeprefix("torch.") == dtype, key


@pytest.mark.parametrize("name,preset", [("DINO_4scale_swin", "dino_swinl_4scale"), ("DINO_5scale_swin", "dino_swinl_5scale")])
def test_official_args_give_the_preset(name, preset):
    path = OFFICIAL / f"{name}.args.json"
    cfg = config_from_official_args(json.loads(path.read_text()))
    want = get_preset(preset)
    assert cfg.model == want.model and cfg.loss == want.loss
    assert want.model.backbone.window_size == 12 and want.model.backbone.use_checkpoint


@pytest.mark.parametrize("preset", ["dino_swinl_4scale", "dino_swinl_5scale", "dino_swinl_4scale_36ep"])
def test_presets_round_trip_through_json(preset):
    from dinodet.config import DINOConfig

    cfg = get_preset(preset)
    assert DINOConfig.from_json(cfg.to_json()) == cfg
    assert cfg.model.backbone.name == "swin_l" and cfg.model.backbone.drop_path_rate == 0.2
    assert cfg.model.num_feature_levels == len(cfg.model.backbone.return_layers) + 1


def test_unknown_official_backbone_is_rejected():
    from dinodet.config import ConfigError

    with pytest.raises(ConfigError, match="swin_X"):
        config_from_official_args({"backbone": "swin_X_224_1k"})


@pytest.mark.parametrize("levels", [4, 5])
def test_official_round_trip_tiny_swin(tmp_path, levels):
    cfg = _tiny_swin_config(levels)
    torch.manual_seed(0)
    model = build_model(cfg)
    state = to_official(model.state_dict(), cfg.model.dec_layers, len(cfg.model.backbone.return_layers))
    assert any(k.startswith("backbone.0.layers.0.blocks.1.attn.relative_position_index") for k in state)
    assert not any(k.startswith("backbone.0.body.") for k in state)
    assert ("backbone.0.norm0.weight" in state) == (levels == 5)
    path = tmp_path / "official.pth"
    torch.save({"model": state, "args": argparse.Namespace(backbone="swin_T_224_1k"), "epoch": 1}, path)
    import dinodet.presets as presets

    mp = pytest.MonkeyPatch()
    mp.setitem(presets._PRESETS, cfg.name, lambda: cfg)
    try:
        loaded = load_checkpoint(path, preset=cfg.name)
    finally:
        mp.undo()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k


# ------------------------------------------------------------------------------ ImageNet checkpoints

def _imagenet_swin(layout: str = "original", seed: int = 5) -> tuple[dict, SwinBackbone]:
    """An ImageNet-classification-style checkpoint of the micro Swin, as the original release or timm save it."""
    ref = _micro(return_layers=(1, 2, 3))
    _randomise(ref.body, seed)
    state = {original_backbone_name(k): v.clone() for k, v in ref.body.state_dict().items() if not k.startswith("norm")}
    state["norm.weight"], state["norm.bias"] = torch.ones(128), torch.zeros(128)
    if layout == "original":
        state["head.weight"], state["head.bias"] = torch.zeros(10, 128), torch.zeros(10)
        state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    else:
        state = {re.sub(r"^layers\.(\d)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k): v
                 for k, v in state.items() if "relative_position_index" not in k}
        state["head.fc.weight"], state["head.fc.bias"] = torch.zeros(10, 128), torch.zeros(10)
    return state, ref


@pytest.mark.parametrize("layout", ["original", "timm"])
def test_imagenet_checkpoint_loads_as_backbone(tmp_path, layout):
    state, ref = _imagenet_swin(layout)
    path = tmp_path / "swin_imagenet.pth"
    torch.save({"model": state, "epoch": 300} if layout == "original" else state, path)
    cfg = _tiny_swin_config()
    cfg.model.backbone.checkpoint = str(path)
    torch.manual_seed(0)
    model = init_from_config(cfg)
    ours = model.backbone.body.state_dict()
    for k, v in ref.body.state_dict().items():
        if not k.startswith("norm"):
            assert torch.equal(ours[k], v), k
    assert torch.equal(ours["norm1.weight"], torch.ones(32))  # DINO's output norms keep their init


def test_imagenet_checkpoint_mismatches_are_named(tmp_path):
    state, _ = _imagenet_swin()
    cfg = _tiny_swin_config()

    def attempt(st, name):
        path = tmp_path / name
        torch.save({"model": st}, path)
        cfg.model.backbone.checkpoint = str(path)
        with pytest.raises(CheckpointError) as e:
            init_from_config(cfg)
        return str(e.value)

    missing = dict(state)
    del missing["layers.2.blocks.0.mlp.fc1.weight"]
    msg = attempt(missing, "missing.pth")
    assert "missing keys: layers.2.blocks.0.mlp.fc1.weight" in msg and MICRO in msg
    extra = dict(state, **{"layers.9.blocks.0.norm1.weight": torch.ones(3)})
    assert "unexpected keys: layers.9.blocks.0.norm1.weight" in attempt(extra, "extra.pth")
    cfg.model.backbone.window_size = 12  # checkpoint is window 7
    msg = attempt(state, "window.pth")
    assert "relative_position" in msg and "(169, 1)" in msg and "(529, 1)" in msg and "window" in msg
