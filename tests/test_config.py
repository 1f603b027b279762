"""Typed configs: every value read from data (--set, checkpoints, official args) is type- and
range-checked, so a bad one is one line naming the key instead of a traceback deep in training."""
from __future__ import annotations

import pytest

from dinodet.config import ConfigError, DINOConfig, apply_overrides
from dinodet.presets import get_preset, list_presets


@pytest.mark.parametrize("name", list_presets())
def test_presets_are_valid_and_round_trip(name: str):
    cfg = get_preset(name)
    assert DINOConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "train.lr must be a number, got 'abc'"),
    ("train.lr=-1", "train.lr must be >= 0"),
    ("train.weight_decay=-1", "train.weight_decay must be >= 0"),
    ("train.epochs=true", "train.epochs must be an integer, got True"),  # bool is not an int here
    ("train.lr_drop=2.5", "train.lr_drop must be an integer, got 2.5"),
    ("train.ema_decay=1.5", "train.ema_decay must be in [0, 1]"),
    ("train.seed=\"x\"", "train.seed must be an integer"),
    ("model.num_queries=-1", "model.num_queries must be in [1, 10000]"),
    ("model.hidden_dim=abc", "model.hidden_dim must be an integer"),
    ("model.dn_label_noise_ratio=2", "model.dn_label_noise_ratio must be in [0, 1]"),
    ("model.backbone.return_layers=[1,7]", "model.backbone.return_layers must be in [0, 3]"),
    ("model.backbone.name=5", "model.backbone.name must be a string"),
    ("data.train_scales=64", "data.train_scales must be a list of integers, got 64"),
    ("data.train_scales=[]", "data.train_scales must not be empty"),
    ("data.crop_size=[10]", "data.crop_size must be a list of 2 integers"),
    ("data.crop_size=[600,384]", "data.crop_size is (min, max)"),
    ("data.eval_size=-5", "data.eval_size must be in [1, 8192]"),
    # sizes have upper bounds: a config file or a checkpoint must not make dinodet allocate terabytes
    ("model.hidden_dim=524288", "model.hidden_dim must be in [1, 4096], got 524288"),
    ("model.dim_feedforward=1000000000", "model.dim_feedforward must be in [1, 65536]"),
    ("model.num_queries=1000000", "model.num_queries must be in [1, 10000]"),
    ("model.dec_layers=1000", "model.dec_layers must be in [1, 64]"),
    ("model.num_heads=4096", "model.num_heads must be in [1, 64]"),
    ("model.enc_n_points=1000", "model.enc_n_points must be in [1, 64]"),
    ("model.num_feature_levels=100", "model.num_feature_levels must be in [1, 8]"),
    ("model.backbone.window_size=1000", "model.backbone.window_size must be in [1, 64]"),
    ("data.eval_size=60000", "data.eval_size must be in [1, 8192], got 60000"),
    ("data.train_scales=[800,100000]", "data.train_scales must be in [1, 8192]"),
    ("train.batch_size=100000", "train.batch_size must be in [1, 1024]"),
    ("loss.aux_loss=1", "loss.aux_loss must be true or false"),
    ("train.epochs", "override 'train.epochs' is not of the form key.path=value"),
    ("=3", "override '=3' is not of the form key.path=value"),
])
def test_bad_values_name_their_key(override: str, message: str):
    with pytest.raises(ConfigError) as err:
        apply_overrides(get_preset("tiny"), [override])
    assert message in str(err.value)


def test_values_are_converted_to_the_field_type():
    cfg = apply_overrides(get_preset("tiny"), ["train.epochs=12.0", "train.lr=1", "data.train_scales=[64, 96]",
                                               "model.dn_labelbook_size=null", "model.backbone.checkpoint=null"])
    assert cfg.train.epochs == 12 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.train_scales == (64, 96) and cfg.model.dn_labelbook_size is None


def test_stored_configs_are_checked_too():
    d = get_preset("tiny").to_dict()
    d["model"]["num_queries"] = "abc"
    with pytest.raises(ConfigError, match="model.num_queries must be an integer"):
        DINOConfig.from_dict(d)


def test_unknown_names_in_the_model_are_config_errors():
    from dinodet.models import build_model

    for override, fragment in (("model.backbone.name=\"resnet9\"", "unknown ResNet 'resnet9'"),
                               ("model.msda_backend=\"bogus\"", "unknown model.msda_backend 'bogus'")):
        with pytest.raises(ConfigError, match=fragment):
            build_model(apply_overrides(get_preset("tiny"), [override]))


@pytest.mark.parametrize("override", ["demo.num_train", "demo.nope=3", "demo.num_train=0"])
def test_demo_overrides_are_config_errors(override: str):
    from dinodet.engine.demo import demo_config

    with pytest.raises(ConfigError, match=override.split("=")[0]):
        demo_config([override])
