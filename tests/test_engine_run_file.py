"""Run files (``train --config``): options and ``set:`` keys from YAML, the command line winning;
every run writes RUN_DIR/config.yaml, and ``--config`` of it repeats the run's settings."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from dinodet.cli import main
from dinodet.config import ConfigError
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.run_config import merge_run_file, read_run_file
from dinodet.engine.run_dir import RESOLVED_CONFIG, RUN_FILE, resolved_run_file
from dinodet.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"data.train_scales": [64], "data.max_size": 64, "data.crop_resize_scales": [64], "data.crop_size": [32, 64],
         "data.eval_size": 64, "data.num_workers": 0, "model.num_queries": 10, "model.num_select": 10}


def test_read_run_file_options_and_set_forms(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data: shapes\npreset: tiny\nmax-steps: 3\nset:\n  train:\n    lr: 2.0e-4\n  data.eval_size: 96\n")
    assert read_run_file(path) == {"data": "shapes", "preset": "tiny", "max_steps": 3,
                                   "overrides": ["train.lr=0.0002", "data.eval_size=96"]}
    path.write_text("set: [train.lr=1e-3]\n")
    assert read_run_file(path) == {"overrides": ["train.lr=1e-3"]}
    for text, fragment in (("epochs: two\n", "'epochs' must be int"), ("nope: 1\n", "unknown option 'nope'"),
                           ("- a\n", "must be a YAML mapping"), ("a: [\n", "not a YAML run file"),
                           ("set: [lr]\n", "KEY=VALUE")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=fragment):
            read_run_file(path)
    with pytest.raises(ConfigError, match="cannot read"):
        read_run_file(tmp_path / "missing.yaml")


def test_merge_run_file_given_options_win_and_repeatable_ones_add_up(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data: shapes\nepochs: 3\nlog: [mlflow]\nset: [train.lr=1e-3]\n")
    merged = merge_run_file(path, {"epochs": 2, "out": "R", "overrides": ["train.lr=2e-3"], "log": ["wandb"]})
    assert merged == {"data": "shapes", "epochs": 2, "out": "R", "log": ["mlflow", "wandb"],
                      "overrides": ["train.lr=1e-3", "train.lr=2e-3"]}  # the later --set item wins
    assert merge_run_file(path, {}) == read_run_file(path)
    path.write_text("epochs: two\n")
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        merge_run_file(path, {"epochs": 2})


def test_an_option_given_with_its_default_value_still_wins(tmp_path: Path, capsys) -> None:
    """The command line's own value wins even where it equals the default (8 pictures, not the file's -1)."""
    (tmp_path / "run.yaml").write_text("preset: tiny\npictures: -1\n")
    args = ["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "dinodet: error: --pictures must be >= 0, got -1"
    assert main([*args, "--pictures", "8"]) == 2
    assert capsys.readouterr().err.strip() == ("dinodet: error: --data DIR is required (on the command line or in "
                                               "the --config file)")


def test_resolved_run_file_lists_what_differs_from_the_preset() -> None:
    cfg = get_preset("tiny")
    cfg.train.lr, cfg.model.num_classes = 1e-3, 7
    out = resolved_run_file(cfg, {"data": "/d", "patience": None, "preset": None})
    assert out == {"preset": "tiny", "data": "/d", "set": {"train.lr": 1e-3}}  # classes come from the data


def test_config_file_trains_cli_wins_and_the_run_file_repeats_it(tmp_path: Path, caplog) -> None:
    data = make_synthetic_coco(tmp_path / "shapes", num_train=2, num_val=1, image_size=(64, 64), seed=0)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({"data": str(data), "preset": "tiny", "epochs": 3, "max_steps": 1,
                                        "pictures": 0, "patience": 4, "set": {**SMALL, "train.lr": 5e-4}}))
    base = ["--no-progress"]
    with caplog.at_level(logging.INFO):
        assert main(["train", "--config", str(run_yaml), "--out", str(tmp_path / "r1"), "--epochs", "2",
                     "--set", "train.lr=3e-4", *base]) == 0
    written = yaml.safe_load((tmp_path / "r1" / RUN_FILE).read_text())
    cfg = json.loads((tmp_path / "r1" / RESOLVED_CONFIG).read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["train"]["lr"] == 3e-4  # the command line won
    assert cfg["data"]["eval_size"] == 64 and cfg["model"]["num_queries"] == 10  # the file's settings
    assert written["data"] == str(data) and written["patience"] == 4 and written["max_steps"] == 1
    assert written["set"]["train.epochs"] == 2 and written["set"]["train.lr"] == 3e-4

    assert main(["train", "--config", str(tmp_path / "r1" / RUN_FILE), "--out", str(tmp_path / "r2"), *base]) == 0
    assert json.loads((tmp_path / "r2" / RESOLVED_CONFIG).read_text()) == cfg
    assert yaml.safe_load((tmp_path / "r2" / RUN_FILE).read_text()) == written


def test_config_file_errors_are_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "run.yaml").write_text("preset: tiny\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == ("dinodet: error: --data DIR is required (on the command line or in the "
                                               "--config file)")
    (tmp_path / "run.yaml").write_text("preset: tiny\nlr: 1\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "unknown option 'lr'" in capsys.readouterr().err
