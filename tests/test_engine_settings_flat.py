"""The one settings flattener (``engine.logging.flatten_settings``) and its two outputs: run-file
settings (tuples as lists, as YAML/JSON hold them) and MLflow parameters (the ``str`` of each value,
tuples as "(a, b)"); both pinned for a config with tuples, nested dataclasses and None."""
from __future__ import annotations

from pathlib import Path

import yaml

from dinodet.config import DINOConfig
from dinodet.engine.logging import _params, flatten_settings
from dinodet.engine.run_dir import RUN_FILE, write_run_file


def _config() -> DINOConfig:
    cfg = DINOConfig(name="custom")
    cfg.data.crop_size = (384, 600)  # tuple
    cfg.model.backbone.name = "resnet18"  # nested dataclass (model.backbone.*)
    cfg.model.dn_labelbook_size = None
    return cfg


def test_run_file_settings_turn_tuples_into_lists() -> None:
    flat = flatten_settings(_config().to_dict())
    assert flat["data.crop_size"] == [384, 600] and type(flat["data.crop_size"]) is list
    assert flat["data.train_scales"] == [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    assert flat["model.backbone.name"] == "resnet18"
    assert flat["model.dn_labelbook_size"] is None
    assert "model" not in flat and "model.backbone" not in flat  # only leaves
    assert flatten_settings({"a": {"b": (1, (2, 3))}, "c": {}}, "p.") == {"p.a.b": [1, (2, 3)]}  # top level only


def test_mlflow_params_keep_the_tuple_text() -> None:
    params = _params(_config().to_dict())
    assert params["data.crop_size"] == "(384, 600)"
    assert params["data.train_scales"] == "(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)"
    assert params["model.backbone.name"] == "resnet18"
    assert params["model.dn_labelbook_size"] == "None"
    assert params["train.lr"] == "0.0001" and params["loss.aux_loss"] == "True"
    assert list(params) == list(flatten_settings(_config().to_dict()))  # the same keys, in the same order


def test_run_file_text_writes_tuples_as_yaml_lists(tmp_path: Path) -> None:
    cfg = _config()
    cfg.data.crop_size = (320, 640)
    write_run_file(tmp_path, cfg, {"data": "/d"})
    text = (tmp_path / RUN_FILE).read_text(encoding="utf-8")
    assert "  data.crop_size:\n  - 320\n  - 640\n" in text  # a YAML list, no !!python/tuple tag
    assert "model.dn_labelbook_size" not in text  # data-derived, left out
    assert yaml.safe_load(text)["set"]["data.crop_size"] == [320, 640]
