"""The run folder: stale temporary files, the saved train state (classes stored once, older files
still read) and the resume steps, without training."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dinodet.checkpoint import read_train_state, save_checkpoint
from dinodet.config import apply_overrides
from dinodet.engine.distributed import DistInfo
from dinodet.engine.ema import ModelEMA
from dinodet.engine.run_dir import (
    CHECKPOINT,
    Counters,
    TrainState,
    apply_changed_settings,
    capture_train_state,
    open_run_dir,
    rescale_epoch_position,
    resume_run,
    save_run_checkpoints,
)
from dinodet.engine.train import build_optimizer, build_scheduler, resolve_config
from dinodet.models import build_model
from dinodet.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES, IDS = ["a", "b"], [3, 7]
ONE = DistInfo()


def _parts(*overrides: str):
    cfg = resolve_config(apply_overrides(get_preset("tiny"), ["train.ema=true", *overrides]), len(NAMES))
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.train)
    return cfg, model, optimizer, build_scheduler(optimizer, cfg.train), ModelEMA(model, cfg.train.ema_decay)


def test_open_run_dir_removes_stale_temp_files_and_starts_fresh_without_checkpoint(tmp_path: Path, caplog):
    (tmp_path / ".checkpoint.123.tmp.pt").write_bytes(b"half written")
    assert open_run_dir(tmp_path, resume=True, info=ONE) is None
    assert not list(tmp_path.iterdir())
    assert caplog.messages == [f"--resume: no {tmp_path / CHECKPOINT} yet; starting a new run"]
    assert caplog.records[0].levelno == logging.WARNING


def test_train_state_round_trip_stores_the_classes_once(tmp_path: Path):
    cfg, model, optimizer, scheduler, ema = _parts()
    counters = Counters(epoch=2, batches_done=1, step=9, best_ap=0.25)
    state = capture_train_state(optimizer, scheduler, None, ema, counters, [1.0] * 12, None, ONE)
    counters.step = 10  # a snapshot: the run goes on
    save_run_checkpoints(tmp_path, model, cfg, NAMES, IDS, state, {"AP": 0.1})
    saved = read_train_state(tmp_path / CHECKPOINT)
    assert (saved["class_names"], saved["category_ids"]) == (NAMES, IDS) and "label_map" not in saved
    back = TrainState.from_dict(saved)
    assert back.counters == Counters(2, 1, 9, 0.25) and back.epoch_loss_sums == [1.0] * 12
    assert (back.batch_size, back.world_size, len(back.rng), back.loader_generator) == (
        cfg.train.batch_size, 1, 1, [None])
    assert back.ema is not None and back.ema["decay"] == ema.decay and back.scaler is None


def test_a_checkpoint_of_the_previous_version_resumes(tmp_path: Path, caplog):
    """Files written before the classes were stored once also hold a ``label_map``."""
    caplog.set_level(logging.INFO, logger="dinodet")
    cfg, model, optimizer, scheduler, ema = _parts()
    optimizer.step()  # no gradients, but a state to carry
    scheduler.step()
    state = capture_train_state(optimizer, scheduler, None, ema, Counters(1, 0, 4, 0.5), None, None, ONE)
    old = {**state.to_dict(), "label_map": {"class_names": NAMES, "category_ids": IDS}, "metrics": None}
    save_checkpoint(tmp_path / CHECKPOINT, model, cfg, NAMES, IDS, old)

    cfg2, model2, optimizer2, scheduler2, ema2 = _parts()
    point = resume_run(read_train_state(tmp_path / CHECKPOINT), tmp_path / CHECKPOINT, cfg2, NAMES, IDS,
                       {3: "a"}, model2, optimizer2, scheduler2, None, ema2, None, ONE, epoch_batches=2)
    assert point.counters == Counters(1, 0, 4, 0.5) and point.carried_loss_sums is None
    assert scheduler2.state_dict() == scheduler.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    assert caplog.messages == [f"resuming from {tmp_path / CHECKPOINT} (epoch 1, step 4)"]


def test_changed_settings_win_and_unchanged_ones_are_left_alone():
    cfg, _, optimizer, scheduler, ema = _parts()
    before = [dict(g, params=None) for g in optimizer.param_groups]
    assert apply_changed_settings(cfg.train, optimizer, scheduler, ema) == []
    assert [dict(g, params=None) for g in optimizer.param_groups] == before

    changed, _, _, _, _ = _parts("train.lr=1e-6", "train.weight_decay=0.5", "train.ema_decay=0.5")
    said = apply_changed_settings(changed.train, optimizer, scheduler, ema)
    assert said == [f"lr {cfg.train.lr:g} -> 1e-06", f"weight_decay {cfg.train.weight_decay:g} -> 0.5",
                    f"ema_decay {cfg.train.ema_decay:g} -> 0.5"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6) and ema.decay == 0.5


def test_epoch_position_follows_another_batch_size(caplog):
    def state(batch_size: int) -> TrainState:
        return TrainState({}, {}, Counters(), world_size=1, batch_size=batch_size)

    counters = Counters(epoch=0, batches_done=2)
    assert rescale_epoch_position(counters, state(1), 2, ONE, epoch_batches=2)  # 2 samples seen: 1 batch of 2
    assert counters.batches_done == 1 and "continuing after 2 of its samples" in caplog.messages[-1]
    counters = Counters(epoch=0, batches_done=3)
    assert not rescale_epoch_position(counters, state(1), 2, ONE, epoch_batches=2)  # 1 sample runs again
    assert counters.batches_done == 1 and "(3 were seen; the epoch's logged losses" in caplog.messages[-1]
    counters = Counters(epoch=0, batches_done=3)
    assert rescale_epoch_position(counters, state(2), 2, ONE, epoch_batches=2) and counters.batches_done == 3
