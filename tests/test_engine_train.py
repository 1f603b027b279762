"""Training engine: optimizer groups and schedule, EMA, accumulation, resume, fine-tuning, overfitting.

Runs use the ``tiny`` preset on a few 64 px synthetic images (a few hundred ms per step on one
CPU thread); the model is evaluated unpadded, and the training sets use the evaluation transform
where two runs must see identical pixels (accumulation) or where augmentation would only slow
convergence (overfitting).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from dinodet.checkpoint import CheckpointError, read_torch_file, save_checkpoint
from dinodet.config import ConfigError, apply_overrides
from dinodet.data.coco import build_dataset
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.ema import ModelEMA
from dinodet.engine.run_dir import BEST_CHECKPOINT, CHECKPOINT, CURVES, FINAL_METRICS
from dinodet.engine.train import (
    LOGGED_LOSSES,
    Trainer,
    TrainOptions,
    build_optimizer,
    build_scheduler,
    resolve_config,
    train,
    window_weights,
)
from dinodet.models import build_model
from dinodet.presets import get_preset

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("shapes"), num_train=4, num_val=2, image_size=(SIZE, SIZE), seed=0)


def small_config(*overrides: str):
    return apply_overrides(get_preset("tiny"), [
        f"data.train_scales=[{SIZE}]", f"data.max_size={SIZE}", f"data.crop_resize_scales=[{SIZE}]",
        f"data.crop_size=[{SIZE // 2},{SIZE}]", f"data.eval_size={SIZE}", "data.num_workers=0",
        "model.num_queries=20", "model.num_select=20", "train.epochs=1", "train.batch_size=2", *overrides,
    ])


def datasets(root: Path, cfg, augment: bool = True):
    tr = build_dataset(root, "train", train=augment, data_cfg=cfg.data)
    va = build_dataset(root, "val", train=False, data_cfg=cfg.data, label_map=tr.label_map)
    return tr, va


def run(cfg, tr, va, run_dir: Path, **kw) -> dict:
    return train(cfg, tr, va, TrainOptions(run_dir=run_dir, progress=False, tensorboard=False, **kw))


def weights(run_dir: Path, name: str = CHECKPOINT) -> dict[str, torch.Tensor]:
    return read_torch_file(run_dir / name)["model"]


# ----------------------------------------------------------------------------------- unit level


def test_optimizer_groups_and_step_schedule():
    cfg = resolve_config(get_preset("tiny"), 3)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.train)
    main, backbone = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert main["lr"] == cfg.train.lr and backbone["lr"] == cfg.train.lr_backbone
    assert all(names[id(p)].startswith("backbone.") for p in backbone["params"])
    assert not any(names[id(p)].startswith("backbone.") for p in main["params"])
    assert opt.defaults["weight_decay"] == cfg.train.weight_decay
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(main["params"]) + len(backbone["params"]) == trainable  # frozen stem left out

    sched = build_scheduler(opt, cfg.train)  # per-epoch StepLR, x0.1 after lr_drop epochs
    lrs = []
    for _ in range(cfg.train.lr_drop + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: a no-op, but the order torch expects
        sched.step()
    assert lrs[: cfg.train.lr_drop] == [cfg.train.lr] * cfg.train.lr_drop
    assert lrs[cfg.train.lr_drop] == pytest.approx(cfg.train.lr * 0.1)


def test_resolve_config_takes_classes_from_data_and_checks_train_settings():
    cfg = get_preset("tiny")
    cfg.model.dn_labelbook_size = 91
    resolved = resolve_config(cfg, 7)
    assert resolved.model.num_classes == 7 and resolved.model.labelbook_size == 7
    assert cfg.model.num_classes == 91  # the input is not modified
    for bad in ("train.amp=fp8", "train.accumulate=0", "train.batch_size=0"):
        with pytest.raises(ConfigError):
            resolve_config(apply_overrides(get_preset("tiny"), [bad]), 3)
    built_in_python = get_preset("tiny")
    built_in_python.train.epochs = 0  # not read from data: checked here
    with pytest.raises(ConfigError, match="train.epochs must be >= 1"):
        resolve_config(built_in_python, 3)


def test_ema_update_math():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked += 5
    ema.update(model)
    now, current = ema.module.state_dict(), model.state_dict()
    for k, v in now.items():
        if v.dtype.is_floating_point:
            assert torch.equal(v, 0.9 * before[k] + 0.1 * current[k])  # bitwise: the official order
        else:  # integer buffers are copied
            assert torch.equal(v, current[k])
    assert ema.updates == 1 and not any(p.requires_grad for p in ema.module.parameters())
    restored = ModelEMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and restored.updates == 1
    for k, v in restored.module.state_dict().items():
        assert torch.equal(v, now[k])


def test_window_weights_reproduce_the_big_batch_normaliser():
    # 1 rank, micro-batches with 3 and 1 boxes: loss_i / N_i * N_i / N = sum / N
    valid, w = window_weights(torch.tensor([[3, 1]]), 1)
    assert valid.tolist() == [True, True] and w.tolist() == pytest.approx([0.75, 0.25])
    # an empty micro-batch keeps its (unnormalised) no-object loss at 1/N
    _, w = window_weights(torch.tensor([[0, 4]]), 1)
    assert w.tolist() == pytest.approx([0.25, 1.0])
    # 2 ranks: counts add up; an unreadable micro-batch on one rank is skipped on all
    valid, w = window_weights(torch.tensor([[2, -1, 1], [2, 5, 1]]), 2)
    assert valid.tolist() == [True, False, True] and w.tolist() == pytest.approx([4 / 6, 0.0, 2 / 6])


# ----------------------------------------------------------------------------------- training runs


def _first_window_grads(cfg, tr, va, run_dir: Path) -> dict[str, torch.Tensor]:
    """Gradients (after clipping) of the first optimizer step of a run; the step itself is skipped."""
    trainer = Trainer(cfg, tr, va, TrainOptions(run_dir=run_dir, progress=False, tensorboard=False))
    trainer.optimizer.step = lambda *a, **k: None
    trainer.sampler.set_epoch(0)
    window = list(itertools.islice(iter(trainer.loader), cfg.train.accumulate))
    assert trainer._train_window(window, torch.zeros(len(LOGGED_LOSSES) + 2, dtype=torch.float64))
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    # per tensor ||a - b|| / ||b||, worst tensor
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)).item() for k in a)


def test_gradient_accumulation_matches_the_bigger_batch(shapes_root: Path, tmp_path: Path, monkeypatch):
    """accumulate 2 x batch 1 gives the gradient of batch 2.

    Compared on gradients: equal up to float32 noise (5e-4 relative here; 1e-14 in float64), while
    Adam's first steps would amplify that noise in near-zero gradients.  Denoising is off (its
    group count depends on the micro-batch) and the pixels are the same (no augmentation).
    """
    base = ["model.dn_number=0"]
    big = small_config(*base, "train.batch_size=2")
    acc = small_config(*base, "train.batch_size=1", "train.accumulate=2")
    tr, va = datasets(shapes_root, big, augment=False)
    assert len({len(tr[i][1]["labels"]) for i in range(len(tr))}) > 1  # unequal box counts matter
    g_big = _first_window_grads(big, tr, va, tmp_path / "big")
    g_acc = _first_window_grads(acc, tr, va, tmp_path / "acc")
    assert _max_relative_difference(g_acc, g_big) < 5e-3  # measured 5e-4

    # the naive 1/accumulate weighting is measurably different on these images
    import dinodet.engine.train as engine

    naive = lambda counts, world: (counts[0] >= 0, torch.full(counts.shape[1:], 1.0 / counts.shape[1]))
    monkeypatch.setattr(engine, "window_weights", naive)
    assert _max_relative_difference(_first_window_grads(acc, tr, va, tmp_path / "naive"), g_big) > 5e-2  # 0.37

    # a full accumulated run counts optimizer steps, not micro-batches
    run(acc, tr, va, tmp_path / "acc_run")
    assert read_torch_file(tmp_path / "acc_run" / CHECKPOINT)["step"] == 2  # 4 images / (1 x 2)


def test_resume_gives_the_same_end_state(shapes_root: Path, tmp_path: Path):
    """2 epochs straight == 1 epoch, then --resume to 2 == stopped mid-epoch 2 by max_steps, then resumed.

    With augmentation and denoising on: the RNG states travel in the checkpoint.
    """
    cfg2 = small_config("train.epochs=2", "train.ema=true", "train.ema_decay=0.9")
    cfg1 = small_config("train.epochs=1", "train.ema=true", "train.ema_decay=0.9")
    tr, va = datasets(shapes_root, cfg2)

    straight = run(cfg2, tr, va, tmp_path / "straight")
    run(cfg1, tr, va, tmp_path / "split")
    resumed = run(cfg2, tr, va, tmp_path / "split", resume=True)
    run(cfg2, tr, va, tmp_path / "mid", max_steps=3)  # 2 steps per epoch: stops inside epoch 2
    mid = read_torch_file(tmp_path / "mid" / CHECKPOINT)
    assert (mid["epoch"], mid["batches_done"], mid["step"]) == (1, 1, 3)
    resumed_mid = run(cfg2, tr, va, tmp_path / "mid", resume=True)

    ref = read_torch_file(tmp_path / "straight" / CHECKPOINT)
    for other in ("split", "mid"):
        got = read_torch_file(tmp_path / other / CHECKPOINT)
        assert got["step"] == ref["step"] == 4 and got["epoch"] == 2
        for k, v in ref["model"].items():
            assert torch.equal(got["model"][k], v), (other, k)
        for k, v in ref["ema"]["module"].items():
            assert torch.equal(got["ema"]["module"][k], v), (other, "ema", k)
        assert got["scheduler"] == ref["scheduler"]
        for pid, st in ref["optimizer"]["state"].items():
            assert torch.equal(got["optimizer"]["state"][pid]["exp_avg"], st["exp_avg"])
    assert resumed["AP"] == straight["AP"] == resumed_mid["AP"]

    # the epoch stopped inside and resumed logs the mean over all its batches, as the straight run
    def epoch_records(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    mid_records, straight_records = epoch_records("mid"), epoch_records("straight")
    assert [r["epoch"] for r in mid_records] == [1, 1.5, 2]
    for key in ("train_loss", "train_loss_ce", "train_loss_bbox_dn"):
        assert mid_records[-1][key] == straight_records[-1][key], key
    assert mid_records[1]["train_loss"] != straight_records[-1]["train_loss"]  # only the first batch

    # metrics.jsonl of the resumed run: one record per epoch, no duplicates
    records = epoch_records("split")
    assert [r["epoch"] for r in records] == [1, 2]
    for name in (BEST_CHECKPOINT, CURVES, FINAL_METRICS, "config.json"):
        assert (tmp_path / "split" / name).is_file(), name


def test_new_run_refuses_to_overwrite_and_resume_without_checkpoint_starts_fresh(shapes_root: Path, tmp_path: Path,
                                                                                 caplog):
    caplog.set_level(logging.INFO, logger="dinodet")
    cfg = small_config("train.amp=bf16")  # bf16 autocast works on CPU too
    tr, va = datasets(shapes_root, cfg)
    metrics = run(cfg, tr, va, tmp_path / "r", max_steps=1, resume=True)  # nothing to resume: a new run (warning)
    assert metrics["step"] == 1 and math.isfinite(metrics["AP"])
    with pytest.raises(ConfigError, match="--resume"):
        run(cfg, tr, va, tmp_path / "r", max_steps=1)
    # resuming where it stopped: nothing to train, said so; the final weights are evaluated again
    again = run(cfg, tr, va, tmp_path / "r", max_steps=1, resume=True)
    assert again["step"] == 1 and again["AP"] == metrics["AP"]
    assert f"--resume: no {tmp_path / 'r' / CHECKPOINT} yet; starting a new run" in caplog.messages
    assert "nothing left to train (epoch 0/1, step 1); evaluating the final weights" in caplog.messages
    assert any(re.match(r"epoch 0\.\d\d/1: loss", m) for m in caplog.messages)  # the fraction done, rounded


def test_resume_applies_changed_schedule_settings(shapes_root: Path, tmp_path: Path, caplog):
    """--set on resume wins over the stored optimizer / scheduler / EMA settings (config.json said
    so before, while the stored values were used), and says so."""
    caplog.set_level(logging.INFO, logger="dinodet")
    cfg = small_config("train.epochs=1", "train.ema=true", "train.ema_decay=0.9")
    tr, va = datasets(shapes_root, cfg)
    run(cfg, tr, va, tmp_path / "r")
    changed = small_config("train.epochs=2", "train.ema=true", "train.ema_decay=0.5", "train.lr=1e-6",
                           "train.weight_decay=0.5", "train.lr_drop=1")
    run(changed, tr, va, tmp_path / "r", resume=True)
    state = read_torch_file(tmp_path / "r" / CHECKPOINT)
    main_group = next(g for g in state["optimizer"]["param_groups"] if g["name"] == "main")
    # lr_drop 1: dropped once for the resumed epoch, once more by the scheduler after it
    assert main_group["lr"] == pytest.approx(1e-8) and main_group["initial_lr"] == 1e-6
    assert all(g["weight_decay"] == 0.5 for g in state["optimizer"]["param_groups"])
    assert state["scheduler"]["step_size"] == 1 and state["ema"]["decay"] == 0.5
    said = next(m for m in caplog.messages if m.startswith("resume with changed settings: "))
    assert said.count("weight_decay") == 1 and "lr_drop" in said and "ema_decay 0.9 -> 0.5" in said, said


def test_resume_inside_an_epoch_with_another_batch_size(shapes_root: Path, tmp_path: Path, caplog):
    """Stopped after 2 of 4 samples with batch 1: resumed with batch 2, one step finishes the epoch."""
    tr, va = datasets(shapes_root, small_config())
    run(small_config("train.batch_size=1"), tr, va, tmp_path / "r", max_steps=2)
    assert read_torch_file(tmp_path / "r" / CHECKPOINT)["batches_done"] == 2
    run(small_config("train.batch_size=2"), tr, va, tmp_path / "r", resume=True)
    state = read_torch_file(tmp_path / "r" / CHECKPOINT)
    assert (state["epoch"], state["batches_done"], state["step"]) == (1, 0, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("continuing after 2 of its samples" in m for m in warnings), warnings


def test_resume_refuses_data_with_classes_the_run_lacks(shapes_root: Path, tmp_path: Path):
    import shutil

    cfg = small_config()
    tr, va = datasets(shapes_root, cfg)
    run(cfg, tr, va, tmp_path / "r", max_steps=1)
    other = tmp_path / "other"
    shutil.copytree(shapes_root, other)
    ann = other / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    data["categories"][0]["name"] = "giraffe"
    ann.write_text(json.dumps(data))
    # as the CLI does on resume: the data is indexed with the run's classes
    tr2 = build_dataset(other, "train", data_cfg=cfg.data, label_map=tr.label_map)
    with pytest.raises(CheckpointError, match="not trained on this dataset's classes .*'giraffe'"):
        run(cfg, tr2, va, tmp_path / "r", resume=True)


def test_earlier_results_are_never_overwritten_and_damaged_state_is_one_error(shapes_root: Path, tmp_path: Path):
    cfg = small_config()
    tr, va = datasets(shapes_root, cfg)
    run(cfg, tr, va, tmp_path / "r", max_steps=1)
    state = read_torch_file(tmp_path / "r" / CHECKPOINT)
    torch.save({k: v for k, v in state.items() if k != "epoch"}, tmp_path / "r" / CHECKPOINT)
    with pytest.raises(CheckpointError, match="damaged training state .*KeyError"):
        run(cfg, tr, va, tmp_path / "r", resume=True)
    (tmp_path / "r" / CHECKPOINT).unlink()  # e.g. deleted by hand: best checkpoint and metrics remain
    for resume in (False, True):
        with pytest.raises(ConfigError, match="earlier run's results .*checkpoint_best.pt"):
            run(cfg, tr, va, tmp_path / "r", resume=resume)


def test_best_checkpoint_and_log_come_before_checkpoint(shapes_root: Path, tmp_path: Path, monkeypatch):
    """checkpoint.pt records best_AP and the epoch: an interrupt before it is written must not
    leave a best_AP without its file, nor lose the epoch's log record."""
    import dinodet.engine.run_dir as run_dir

    order = []

    def recording_save(path, *args, **kwargs):
        log = path.parent / "metrics.jsonl"
        order.append((path.name, log.is_file() and len(log.read_text().splitlines())))
        return save_checkpoint(path, *args, **kwargs)

    monkeypatch.setattr(run_dir, "save_checkpoint", recording_save)
    cfg = small_config()
    tr, va = datasets(shapes_root, cfg)
    run(cfg, tr, va, tmp_path / "r")
    assert order == [(BEST_CHECKPOINT, 1), (CHECKPOINT, 1)]


@pytest.mark.slow
def test_overfits_four_images(tmp_path: Path):
    """The whole loop learns: 4 synthetic images, 100 steps of batch 4 -> AP50 ~1 (threshold 0.8).

    Measured with seeds 0..2: AP50 0.96-1.0 after 80-120 steps (about 1 min on one CPU thread).
    """
    size = 96
    root = make_synthetic_coco(tmp_path / "data", num_train=4, num_val=1, image_size=(size, size), seed=0)
    cfg = apply_overrides(get_preset("tiny"), [
        f"data.eval_size={size}", f"data.max_size={size}", "data.num_workers=0", "model.num_queries=20",
        "model.num_select=20", "train.epochs=1", "train.batch_size=4", "train.lr=1e-3", "train.lr_backbone=1e-4",
    ])
    images = build_dataset(root, "train", train=False, data_cfg=cfg.data)
    metrics = run(cfg, _Repeat(images, 100), images, tmp_path / "run")
    assert metrics["AP50"] > 0.8, metrics
    assert metrics["AP"] > 0.4, metrics


class _Repeat(torch.utils.data.Dataset):
    """``times`` passes over ``dataset`` as one epoch (one evaluation and checkpoint for many steps)."""

    def __init__(self, dataset, times: int):
        self.dataset, self.times = dataset, times
        self.label_map, self.coco = dataset.label_map, dataset.coco

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, i: int):
        return self.dataset[i % len(self.dataset)]


def test_non_finite_loss_stops_the_run_before_anything_is_saved(shapes_root: Path, tmp_path: Path, monkeypatch):
    from dinodet.engine.train import TrainingError
    from dinodet.models.criterion import SetCriterion

    cfg = small_config("train.log_every=1000")  # checked at the epoch end, not at a log step
    tr, va = datasets(shapes_root, cfg)
    real = SetCriterion.forward

    def poisoned(self, out, targets):
        losses = real(self, out, targets)
        losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        return losses

    monkeypatch.setattr(SetCriterion, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite.*loss_bbox"):
        run(cfg, tr, va, tmp_path / "r")
    assert not (tmp_path / "r" / CHECKPOINT).exists()


# with train.ema the evaluation and checkpoint_best.pt use the EMA weights
def test_ema_run_evaluates_and_keeps_the_ema_weights(shapes_root, tmp_path):
    from dinodet.checkpoint import load_checkpoint
    from dinodet.engine.evaluate import evaluate

    cfg = small_config("train.ema=true", "train.ema_decay=0.5")
    tr, va = datasets(shapes_root, cfg)
    metrics = run(cfg, tr, va, tmp_path / "r")
    state, best = read_torch_file(tmp_path / "r" / CHECKPOINT), read_torch_file(tmp_path / "r" / BEST_CHECKPOINT)
    assert best["ema_weights"] is True
    for k, v in state["ema"]["module"].items():
        assert torch.equal(best["model"][k], v), k
    assert any(not torch.equal(state["model"][k], v) for k, v in state["ema"]["module"].items() if v.is_floating_point())
    ema_model = load_checkpoint(tmp_path / "r" / BEST_CHECKPOINT).model
    again = evaluate(ema_model, va, tr.label_map.category_ids, device=torch.device("cpu"), batch_size=1,
                     num_select=cfg.model.num_select)
    assert again.metrics["AP"] == metrics["AP"]


# the gradient of a step is clipped to train.clip_max_norm (official 0.1)
def test_gradients_are_clipped_to_clip_max_norm(shapes_root, tmp_path):
    clipped_cfg = small_config("model.dn_number=0", "train.clip_max_norm=0.1")
    raw_cfg = small_config("model.dn_number=0", "train.clip_max_norm=0")
    tr, va = datasets(shapes_root, clipped_cfg, augment=False)
    raw = _first_window_grads(raw_cfg, tr, va, tmp_path / "raw")
    clipped = _first_window_grads(clipped_cfg, tr, va, tmp_path / "clipped")
    norm = lambda g: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in g.values()]))
    assert norm(raw) > 1.0  # far above the limit, so the test means something
    assert norm(clipped) == pytest.approx(0.1, rel=1e-3)
    for k in raw:  # same direction, scaled by 0.1 / |g|
        torch.testing.assert_close(clipped[k], raw[k] * (0.1 / norm(raw)), rtol=1e-4, atol=1e-9)


# fp16 autocast + GradScaler (runs on CPU): the scaler state travels and resume is exact
def test_fp16_training_saves_the_scaler_and_resumes_exactly(shapes_root, tmp_path):
    cfg = small_config("train.amp=\"fp16\"", "train.epochs=2")
    tr, va = datasets(shapes_root, cfg)
    run(cfg, tr, va, tmp_path / "straight")
    run(cfg, tr, va, tmp_path / "split", max_steps=3)
    mid = read_torch_file(tmp_path / "split" / CHECKPOINT)
    assert mid["scaler"] is not None and mid["scaler"]["scale"] > 0
    run(cfg, tr, va, tmp_path / "split", resume=True)
    a, b = (read_torch_file(tmp_path / d / CHECKPOINT) for d in ("straight", "split"))
    assert a["scaler"] == b["scaler"] and a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    assert all(torch.isfinite(v).all() for v in a["model"].values() if v.is_floating_point())


# TrainOptions.finetune_from (dinodet train --finetune-from) starts from the checkpoint's weights
def test_finetune_from_starts_the_run_from_those_weights(shapes_root, tmp_path, monkeypatch):
    from dinodet.checkpoint import save_checkpoint
    from dinodet.engine.train import resolve_config
    from dinodet.models import build_model

    cfg = small_config()
    tr, va = datasets(shapes_root, cfg)
    src_cfg = resolve_config(cfg, tr.label_map.num_classes)
    torch.manual_seed(123)
    src = build_model(src_cfg)
    ckpt = save_checkpoint(tmp_path / "src.pt", src, src_cfg, tr.label_map.class_names, tr.label_map.category_ids)
    trainer = Trainer(cfg, tr, va, TrainOptions(run_dir=tmp_path / "r", progress=False, tensorboard=False,
                                                finetune_from=str(ckpt)))
    for k, v in src.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k

    # a requeued job (--resume --finetune-from) pre-empted before its first checkpoint starts from them too,
    # and one that has a checkpoint resumes it instead
    resumed = Trainer(cfg, tr, va, TrainOptions(run_dir=tmp_path / "q", progress=False, tensorboard=False,
                                                finetune_from=str(ckpt), resume=True))
    for k, v in src.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    run(cfg, tr, va, tmp_path / "q2", max_steps=1)
    own = read_torch_file(tmp_path / "q2" / CHECKPOINT)["model"]
    again = Trainer(cfg, tr, va, TrainOptions(run_dir=tmp_path / "q2", progress=False, tensorboard=False,
                                              finetune_from=str(ckpt), resume=True))
    for k, v in own.items():
        assert torch.equal(again.model.state_dict()[k], v), k


# train.eval_every=2 evaluates (and can only improve checkpoint_best.pt) every second epoch
def test_eval_every_skips_the_evaluations_in_between(shapes_root, tmp_path):
    cfg = small_config("train.epochs=3", "train.eval_every=2")
    tr, va = datasets(shapes_root, cfg)
    run(cfg, tr, va, tmp_path / "r")
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert ["eval_AP" in r for r in records] == [False, True, True]  # epoch 2, and the last one


def test_a_run_stopped_before_its_first_checkpoint_can_be_started_over(tmp_path: Path):
    """A job killed while saving its first checkpoint leaves its log, config and TensorBoard files:
    --resume (what a requeued job passes) starts it over; a new run there is refused, as anywhere
    a run's files would be overwritten."""
    from dinodet.engine.run_dir import check_run_dir

    run_dir = tmp_path / "r"
    (run_dir / "tb").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1, "step": 4}\n')
    (run_dir / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="pass --resume to start it over"):
        check_run_dir(run_dir, resume=False)
    assert check_run_dir(run_dir, resume=True) is False  # nothing to resume: a new run, allowed
    (run_dir / "metrics.json").write_text("{}")  # a finished run's results: never overwritten
    with pytest.raises(ConfigError, match=r"earlier run's results \(metrics.json, metrics.jsonl"):
        check_run_dir(run_dir, resume=True)
    alone = tmp_path / "mine"
    alone.mkdir()
    (alone / "curves.png").write_bytes(b"a picture of the user's")
    with pytest.raises(ConfigError, match="curves.png"):
        check_run_dir(alone, resume=False)


def test_ema_defaults_eval_mode_and_decay_bounds():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)).train()
    ema = ModelEMA(model)
    assert ema.decay == 0.9997  # the official default
    assert not ema.module.training and model.training  # the shadow is evaluated as is: no dropout
    frozen, copied = ModelEMA(model, decay=1.0), ModelEMA(model, decay=0.0)  # both ends are valid
    with torch.no_grad():
        model[0].weight.add_(1.0)
    frozen.update(model)
    copied.update(model)
    assert torch.equal(copied.module[0].weight, model[0].weight)
    assert torch.equal(frozen.module[0].weight, ema.module[0].weight)
    with pytest.raises(ValueError):
        ModelEMA(model, decay=1.5)


def test_trainer_runs_the_configured_msda_backend(shapes_root: Path, tmp_path: Path):
    """The trainer resolves the MSDA backend once, where it puts the model on its device: the
    config's choice is what runs (and, with autograd, what the gradient flows through)."""
    from dinodet.models.attention import MultiScaleDeformableAttention

    for wanted in ("gather", "auto"):
        cfg = small_config(f'model.msda_backend="{wanted}"')
        tr, va = datasets(shapes_root, cfg, augment=False)
        trainer = Trainer(cfg, tr, va, TrainOptions(run_dir=tmp_path / wanted, progress=False, tensorboard=False))
        ran = {m.backend for m in trainer.model.modules() if isinstance(m, MultiScaleDeformableAttention)}
        assert ran == {"gather" if wanted == "gather" else "pytorch"}  # auto on CPU with a backward: the reference
        trainer.logger.close()
