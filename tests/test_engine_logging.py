"""Run logs (metrics.jsonl, TensorBoard), curves, RNG-state round trips and distributed helpers."""
from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinodet.engine.distributed import (
    DistInfo,
    dist_info_from_env,
    get_rng_state,
    preserved_rng,
    seed_everything,
    set_rng_state,
)
from dinodet.engine.logging import METRICS_LOG, TB_DIR, RunLogger, read_metrics_log
from dinodet.engine.plots import plot_curves


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path):
    seed_everything(3)
    _draws()
    state = get_rng_state()
    expected = _draws()
    torch.save({"rng": state}, tmp_path / "s.pt")
    seed_everything(99)
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert _draws() == expected


def test_preserved_rng_leaves_the_streams_untouched():
    seed_everything(5)
    with preserved_rng():
        _draws()
    after = _draws()
    seed_everything(5)
    assert _draws() == after


def test_dist_info_from_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist_info_from_env() == DistInfo(0, 1, 0) and dist_info_from_env().is_main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = dist_info_from_env()
    assert info == DistInfo(3, 4, 1) and info.enabled and not info.is_main


def test_run_logger_writes_jsonl_and_tensorboard_and_truncates_on_resume(tmp_path: Path):
    log = RunLogger(tmp_path)
    for epoch in (1, 2, 3):
        log.log_record({"epoch": epoch, "step": 10 * epoch, "train_loss": 5.0 / epoch, "eval_AP": 0.1 * epoch,
                        "lr": 1e-4, "nan": float("nan")})
    log.log_scalars(30, {"loss": 1.0}, prefix="train_step/")
    log.close()
    records = read_metrics_log(tmp_path / METRICS_LOG)
    assert [r["step"] for r in records] == [10, 20, 30] and records[0]["nan"] is None  # strict JSON
    assert list((tmp_path / TB_DIR).glob("events.out.tfevents.*"))

    # a run resumed from its step-20 checkpoint drops what the killed run logged afterwards
    resumed = RunLogger(tmp_path, resume_step=20, tensorboard=False)
    resumed.log_record({"epoch": 3, "step": 30, "train_loss": 1.5})
    resumed.close()
    lines = (tmp_path / METRICS_LOG).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [10, 20, 30]
    assert json.loads(lines[-1])["train_loss"] == 1.5

    silent = RunLogger(tmp_path / "other", enabled=False)  # ranks > 0
    silent.log_record({"epoch": 1, "step": 1})
    assert not (tmp_path / "other").exists()


def test_without_tensorboard_the_jsonl_log_is_written_with_one_warning(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an import of it fails
    log = RunLogger(tmp_path)
    log.log_record({"epoch": 1, "step": 1, "train_loss": 1.0})
    log.close()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert caplog.messages[0].startswith("TensorBoard logging disabled (")
    assert [r["step"] for r in read_metrics_log(tmp_path / METRICS_LOG)] == [1]


def test_plot_curves_writes_a_png(tmp_path: Path):
    records = [{"epoch": e, "step": e, "train_loss": 10 / e, "train_loss_ce": 1 / e, "eval_AP": 0.1 * e,
                "eval_AP50": 0.2 * e} for e in (1, 2, 3)]
    path = plot_curves(records, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_curves([], tmp_path / "empty.png")  # nothing logged yet: still a (blank) figure
    assert (tmp_path / "empty.png").is_file()


# TensorBoard gets the scalars under their tags, and a resume purges what came after its step
def test_tensorboard_scalars_and_purge_on_resume(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dinodet.engine.logging import TB_DIR, RunLogger

    log = RunLogger(tmp_path)
    for epoch in (1, 2, 3):
        log.log_record({"epoch": epoch, "step": 10 * epoch, "train_loss": 5.0 / epoch, "eval_AP": 0.1 * epoch,
                        "nan": float("nan")})
    log.log_scalars(30, {"loss": 1.0}, prefix="train_step/")
    log.close()
    resumed = RunLogger(tmp_path, resume_step=20)
    resumed.log_record({"epoch": 3, "step": 30, "train_loss": 1.5})
    resumed.close()
    acc = EventAccumulator(str(tmp_path / TB_DIR))
    acc.Reload()
    assert {"train/loss", "eval/AP", "train_step/loss"} <= set(acc.Tags()["scalars"])
    assert "nan" not in acc.Tags()["scalars"]
    loss = [(e.step, round(e.value, 4)) for e in acc.Scalars("train/loss")]
    assert loss == [(10, 5.0), (20, 2.5), (30, 1.5)]  # the killed run's step-30 value (1.6667) is purged
    assert [e.step for e in acc.Scalars("eval/AP")] == [10, 20]


def _colour_pixels(path: Path, rgb: tuple[int, int, int]) -> int:
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb)).max(axis=2) < 10).sum())


# the curves are drawn (not only a PNG header)
def test_curves_draw_one_line_per_logged_series(tmp_path: Path):
    from dinodet.engine.plots import plot_curves

    records = [{"epoch": e, "step": e, "train_loss": 10 / e, "train_loss_ce": 1 / e, "eval_AP": 0.1 * e,
                "eval_AP50": 0.2 * e} for e in (1, 2, 3)]
    plot_curves(records, tmp_path / "c.png")
    plot_curves([], tmp_path / "empty.png")
    blue, orange = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (1000, 400)
    assert _colour_pixels(tmp_path / "c.png", blue) > 200 and _colour_pixels(tmp_path / "c.png", orange) > 200
    assert _colour_pixels(tmp_path / "empty.png", blue) == 0


def test_precision_recall_and_per_class_charts_are_drawn(tmp_path: Path):
    from dinodet.engine.plots import plot_per_class_ap, plot_precision_recall

    recall = [r / 100 for r in range(101)]
    plot_precision_recall({"recall": recall, "IoU=0.50": [1 - r / 2 for r in recall]}, tmp_path / "pr.png")
    assert _colour_pixels(tmp_path / "pr.png", (31, 119, 180)) > 200  # the one line
    plot_per_class_ap({"a": {"AP": 0.5, "AP50": 0.8}, "b": {"AP": -1.0, "AP50": -1.0}}, tmp_path / "ap.png")
    assert _colour_pixels(tmp_path / "ap.png", (31, 119, 180)) > 1000  # the AP bar
    with pytest.raises(ValueError, match="nothing was detected"):
        plot_precision_recall({}, tmp_path / "none.png")
