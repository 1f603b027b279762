"""A training run's folder: the files a run writes there, the rule that no run overwrites another's
results (``check_run_dir``), the train state saved in checkpoint.pt and resuming from it.

Files in RUN_DIR (rank 0 only): checkpoint.pt (everything needed to resume), checkpoint_best.pt
(the evaluated weights with the best AP: the EMA weights when EMA is on), metrics.jsonl,
tb/ (TensorBoard), curves.png, config.json (the resolved config), config.yaml (the run file that
repeats the run: ``train --config``) and, at the end, metrics.json
(the final evaluation, with AP per class, the confusion matrix and the TIDE error breakdown),
pr_curve.png, per_class_ap.png, confusion_matrix.png, error_breakdown.png and val_predictions/
(the first val images with the final detections drawn; see ``engine.pictures``).

checkpoint.pt is a dinodet checkpoint (``checkpoint.save_checkpoint``: weights, config, classes)
whose extra entries are a ``TrainState``.  A resumed run continues bit-identically to an
uninterrupted one when nothing changed; a changed batch size, process count or schedule setting
is applied and said so.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import key_problems, read_train_state, save_checkpoint
from ..config import DINOConfig, TrainConfig
from ..errors import CheckpointError, ConfigError, first_line
from ..files import write_atomic
from ..presets import get_preset
from .confusion import CONFUSION_MATRIX
from .distributed import DistInfo, all_gather_objects, get_rng_state, seed_everything, set_rng_state
from .ema import ModelEMA
from .logging import METRICS_LOG, TB_DIR, flatten_settings
from .pictures import PER_CLASS_AP, PR_CURVE, PREDICTIONS_DIR
from .tide import ERROR_BREAKDOWN

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BEST_CHECKPOINT = "checkpoint_best.pt"
FINAL_METRICS = "metrics.json"
CURVES = "curves.png"
RESOLVED_CONFIG = "config.json"
RUN_FILE = "config.yaml"  # the options and settings that repeat the run (``engine.run_config``)
# everything a run writes in RUN_DIR besides checkpoint.pt, none of which a new run may overwrite
RUN_OUTPUTS = (BEST_CHECKPOINT, FINAL_METRICS, METRICS_LOG, RESOLVED_CONFIG, RUN_FILE, CURVES, PR_CURVE, PER_CLASS_AP,
               CONFUSION_MATRIX, ERROR_BREAKDOWN, PREDICTIONS_DIR, TB_DIR)
TRAIN_STATE_VERSION = 1
# settings derived from the data, never repeated from a run file
_DERIVED = ("model.num_classes", "model.dn_labelbook_size")


def check_run_dir(run_dir: Path, resume: bool) -> bool:
    """Whether the run in ``run_dir`` is to be resumed (``resume`` and a checkpoint.pt there).

    Raises ConfigError rather than overwrite an earlier run's results: a checkpoint.pt without
    ``resume``, or files a run writes with no checkpoint.pt to continue from.  One exception: with
    ``resume``, a run stopped before its first checkpoint (only its log, config and curves exist,
    no best checkpoint or final metrics) starts over there, as a requeued job needs."""
    if (run_dir / CHECKPOINT).is_file():
        if not resume:
            raise ConfigError(f"'{run_dir}' already holds a run ({CHECKPOINT}); pass --resume to continue it "
                              "or choose another --out")
        return True
    earlier = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    finished = [name for name in (BEST_CHECKPOINT, FINAL_METRICS) if name in earlier]
    if not earlier or (resume and not finished):
        return False
    hint = ("" if finished else f"; if it is a run stopped before its first {CHECKPOINT}, pass --resume to start "
            "it over")
    raise ConfigError(f"'{run_dir}' holds an earlier run's results ({', '.join(earlier)}) but no {CHECKPOINT} "
                      f"to resume from; choose another --out{hint}")


def open_run_dir(run_dir: Path, resume: bool, info: DistInfo) -> dict[str, Any] | None:
    """The content of the checkpoint.pt to resume (``read_train_state``), or None for a new run.

    Applies ``check_run_dir`` and removes the temporary files of a process killed while saving."""
    if info.is_main:
        for stale in run_dir.glob(".checkpoint*.tmp*"):
            stale.unlink(missing_ok=True)
    if check_run_dir(run_dir, resume):
        return read_train_state(run_dir / CHECKPOINT)
    if resume and info.is_main:
        log.warning(f"--resume: no {run_dir / CHECKPOINT} yet; starting a new run")
    return None


# ------------------------------------------------------------------------------------- run file


def resolved_run_file(cfg: DINOConfig, options: dict[str, Any]) -> dict[str, Any]:
    """The run file that repeats a run: its ``options`` (unset ones left out) and, under ``set``,
    every setting of ``cfg`` that differs from its preset's (all of them when ``cfg.name`` is no
    preset), the data-derived class count left out."""
    try:
        base = flatten_settings(get_preset(cfg.name).to_dict())
    except ConfigError:
        base = {}
    settings = {k: v for k, v in flatten_settings(cfg.to_dict()).items()
                if k != "name" and k not in _DERIVED and base.get(k, object()) != v}
    return {"preset": cfg.name, **{k: v for k, v in options.items() if v is not None and k != "preset"},
            "set": settings}


def write_run_file(run_dir: Path, cfg: DINOConfig, options: dict[str, Any]) -> Path:
    """``run_dir/config.yaml`` (``resolved_run_file``), written atomically."""
    import yaml

    text = ("# dinodet train --config this_file --out NEW_RUN_DIR repeats this run\n"
            + yaml.safe_dump(resolved_run_file(cfg, options), sort_keys=False, allow_unicode=True))
    path = Path(run_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


# ------------------------------------------------------------------------------------ train state


@dataclass
class Counters:
    """Where a run stands."""

    epoch: int = 0  # index of the epoch to run next (or in progress)
    batches_done: int = 0  # micro-batches of that epoch already consumed (per rank)
    step: int = 0  # optimizer steps so far
    best_ap: float = -math.inf
    evals_since_best: int = 0  # evaluations since the AP last improved (early stopping)
    patience: int | None = None  # stop after this many evaluations without improvement (None: never)
    stopped_early: bool = False  # the patience ran out: the run is finished


@dataclass
class TrainState:
    """What checkpoint.pt holds besides the weights, config and classes: everything needed to continue."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    counters: Counters
    scaler: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None
    # loss sums (all ranks') of the epoch a max_steps stop interrupted: that epoch's logged means
    # then cover every batch of it, not only those after the resume
    epoch_loss_sums: list[float] | None = None
    world_size: int | None = 1  # processes of the run that saved it (None: unreadable)
    rng: list[Any] = field(default_factory=list)  # every rank's RNG states
    loader_generator: list[Any] = field(default_factory=list)  # every rank's loader generator state
    batch_size: int | None = None  # of the run that saved it; read from its stored config, not stored twice

    def to_dict(self) -> dict[str, Any]:
        c = self.counters
        return {"train_state_version": TRAIN_STATE_VERSION, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler, "ema": self.ema,
                "epoch": c.epoch, "batches_done": c.batches_done, "step": c.step, "best_ap": c.best_ap,
                "evals_since_best": c.evals_since_best, "patience": c.patience, "stopped_early": c.stopped_early,
                "epoch_loss_sums": self.epoch_loss_sums, "world_size": self.world_size,
                "rng": self.rng, "loader_generator": self.loader_generator}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        """Inverse of ``to_dict`` over a whole checkpoint.pt content (older files also hold a
        ``label_map``, ignored: the classes are the file's top-level ``class_names`` /
        ``category_ids``).  A malformed entry raises KeyError, TypeError or ValueError."""
        try:
            batch_size = int(json.loads(saved["config"])["train"]["batch_size"])
            world_size = int(saved.get("world_size", 1))
        except (KeyError, TypeError, ValueError):  # the epoch position is then kept as stored
            batch_size = world_size = None
        patience = saved.get("patience")
        counters = Counters(int(saved["epoch"]), int(saved["batches_done"]), int(saved["step"]),
                            float(saved.get("best_ap", -math.inf)), int(saved.get("evals_since_best", 0)),
                            None if patience is None else int(patience), bool(saved.get("stopped_early", False)))
        return cls(saved["optimizer"], saved["scheduler"], counters, saved.get("scaler"), saved.get("ema"),
                   saved.get("epoch_loss_sums"), world_size, list(saved.get("rng") or []),
                   list(saved.get("loader_generator") or []), batch_size)


def capture_train_state(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                        scaler: torch.amp.GradScaler | None, ema: ModelEMA | None, counters: Counters,
                        epoch_loss_sums: list[float] | None, generator: torch.Generator | None,
                        info: DistInfo) -> TrainState:
    """The train state to save now; collective (every rank must call: the RNG states are gathered)."""
    gen = generator.get_state() if generator is not None else None
    return TrainState(optimizer.state_dict(), scheduler.state_dict(), replace(counters),
                      scaler.state_dict() if scaler is not None else None,
                      ema.state_dict() if ema is not None else None,
                      epoch_loss_sums if counters.batches_done else None, info.world_size,
                      all_gather_objects(get_rng_state(), info), all_gather_objects(gen, info))


def save_run_checkpoints(run_dir: Path, model: nn.Module, cfg: DINOConfig, class_names: list[str],
                         category_ids: list[int], state: TrainState, metrics: dict[str, Any] | None,
                         best: nn.Module | None = None, ema_weights: bool = False) -> None:
    """checkpoint.pt (``model`` and ``state``), after checkpoint_best.pt when ``best`` (the evaluated
    weights, the EMA ones when ``ema_weights``) improved the AP: checkpoint.pt records best_ap,
    which must never name a file not written."""
    c = state.counters
    if best is not None:
        save_checkpoint(run_dir / BEST_CHECKPOINT, best, cfg, class_names, category_ids,
                        {"epoch": c.epoch, "step": c.step, "metrics": metrics, "ema_weights": ema_weights})
    save_checkpoint(run_dir / CHECKPOINT, model, cfg, class_names, category_ids,
                    {**state.to_dict(), "metrics": metrics})


# ------------------------------------------------------------------------------------------ resume


@dataclass
class ResumePoint:
    """Where a resumed run continues."""

    counters: Counters
    carried_loss_sums: list[float] | None  # see TrainState.epoch_loss_sums; None when they do not apply


def resume_run(saved: dict[str, Any], path: Path, cfg: DINOConfig, class_names: list[str], category_ids: list[int],
               data_categories: dict[int, str], model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.StepLR, scaler: torch.amp.GradScaler | None,
               ema: ModelEMA | None, generator: torch.Generator | None, info: DistInfo,
               epoch_batches: int) -> ResumePoint:
    """Load a saved run (``saved``: the content of checkpoint.pt at ``path``) into the objects of a
    new process: weights, optimizer, scheduler, scaler, EMA, RNG states, then apply the settings
    changed since (``cfg`` wins).  ``data_categories``: the classes the training data declares;
    ``epoch_batches``: micro-batches per rank in a full epoch now.  Any misfit is a CheckpointError."""
    check_run_classes(path, saved, class_names, category_ids, data_categories)
    load_run_weights(path, model, saved["model"])
    try:  # the file is untrusted input: any malformed part is one CheckpointError line
        state = TrainState.from_dict(saved)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        if ema is not None and state.ema:
            ema.load_state_dict(state.ema)
        counters, sums = state.counters, state.epoch_loss_sums
        carried = [float(v) for v in sums] if sums is not None and counters.batches_done > 0 else None
        same_world = len(state.rng) == info.world_size and len(state.loader_generator) == info.world_size
        if same_world:
            set_rng_state(state.rng[info.rank])
            if generator is not None:
                generator.set_state(state.loader_generator[info.rank])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: damaged training state ({type(e).__name__}: {first_line(e)})") from None
    if ema is not None and not state.ema and info.is_main:
        log.warning("EMA enabled on resume but the checkpoint has none; starting it from the current weights")
    changed = apply_changed_settings(cfg.train, optimizer, scheduler, ema)
    if changed and info.is_main:
        log.info("resume with changed settings: " + ", ".join(changed))
    if not rescale_epoch_position(counters, state, cfg.train.batch_size, info, epoch_batches):
        carried = None
    if not same_world:
        if info.is_main:
            log.warning(f"checkpoint written by {len(state.rng)} process(es), resuming with {info.world_size}: "
                        "the random streams restart (the run is not bit-identical to an uninterrupted one)")
        seed_everything(cfg.train.seed + info.rank + 1000 * counters.epoch)
    if info.is_main:
        log.info(f"resuming from {path} (epoch {counters.epoch}, step {counters.step})")
    return ResumePoint(counters, carried)


def check_run_classes(path: Path, saved: dict[str, Any], class_names: list[str], category_ids: list[int],
                      data_categories: dict[int, str]) -> None:
    """CheckpointError unless the saved run was trained on these classes and the data declares no
    class the run lacks (the data was indexed with the run's classes)."""
    stored = (saved.get("class_names"), saved.get("category_ids"))
    if stored != (class_names, category_ids):
        raise CheckpointError(f"{path}: the run was trained on other classes than this dataset's "
                              f"({len(stored[1] or [])} vs {len(category_ids)}); use --finetune-from")
    trained = dict(zip(category_ids, class_names))
    new = [f"{cid} '{name}'" for cid, name in data_categories.items() if trained.get(cid) != name]
    if new:
        raise CheckpointError(f"{path}: the run was not trained on this dataset's classes "
                              f"{', '.join(new[:5])}{' ...' if len(new) > 5 else ''}; "
                              "use --finetune-from to train on them")


def load_run_weights(path: Path, model: nn.Module, weights: dict[str, Any]) -> None:
    """The saved run's weights into ``model``; CheckpointError if they do not fit (another architecture)."""
    hint = "; a --set that changes the architecture cannot resume (use --finetune-from)"
    try:
        result = model.load_state_dict(weights, strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:  # e.g. "size mismatch for class_head.bias: ..."
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if ln.startswith("size mismatch")), lines[0] if lines else "")
        raise CheckpointError(f"{path}: does not fit the configured model ({first}){hint}") from None
    if result.missing_keys or result.unexpected_keys:
        problems = key_problems(result.missing_keys, result.unexpected_keys)
        raise CheckpointError(f"{path}: does not fit the configured model ({problems}){hint}")


def apply_changed_settings(t: TrainConfig, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.StepLR, ema: ModelEMA | None) -> list[str]:
    """On resume the config (with this run's --set) wins over the stored optimizer, scheduler and
    EMA settings: lr / lr_backbone (the current lr rescaled by new/old, keeping past drops),
    weight_decay, lr_drop and ema_decay.  Unchanged settings are left untouched, so a plain
    resume stays bit-identical.  Returns the changes ("lr 0.0001 -> 1e-06", ...)."""
    changed = []
    base = {"main": t.lr, "backbone": t.lr_backbone}
    for i, group in enumerate(optimizer.param_groups):
        name = group.get("name", "main")
        old = float(group.get("initial_lr", scheduler.base_lrs[i]))
        if old != base[name]:
            group["lr"] = group["lr"] * base[name] / old if old > 0 else base[name]
            group["initial_lr"] = scheduler.base_lrs[i] = base[name]
            changed.append(f"{'lr' if name == 'main' else 'lr_' + name} {old:g} -> {base[name]:g}")
        if group["weight_decay"] != t.weight_decay:
            changed.append(f"weight_decay {group['weight_decay']:g} -> {t.weight_decay:g}")
            group["weight_decay"] = t.weight_decay
    if scheduler.step_size != t.lr_drop:
        changed.append(f"lr_drop {scheduler.step_size} -> {t.lr_drop}")
        drops = scheduler.last_epoch // t.lr_drop  # the lr the new schedule gives at this epoch
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = scheduler.base_lrs[i] * scheduler.gamma**drops
        scheduler.step_size = t.lr_drop
    if ema is not None and ema.decay != t.ema_decay:
        changed.append(f"ema_decay {ema.decay:g} -> {t.ema_decay:g}")
        ema.decay = t.ema_decay
    return list(dict.fromkeys(changed))  # weight_decay once, not per parameter group


def rescale_epoch_position(counters: Counters, state: TrainState, batch_size: int, info: DistInfo,
                           epoch_batches: int) -> bool:
    """A run stopped inside an epoch resumes after the samples it had seen.  Its position
    (``counters.batches_done``, updated here) is counted in micro-batches per process, so another
    batch size or process count converts it (exact for another batch size; with another process
    count the samples are partitioned differently, so which ones are left is approximate).

    Returns False when some samples run again, so the epoch's loss sums so far would count them twice."""
    if state.batch_size is None or state.world_size is None:
        return True
    old_batch, old_world = state.batch_size, state.world_size
    new_batch, new_world = batch_size, info.world_size
    if counters.batches_done == 0 or (old_batch, old_world) == (new_batch, new_world):
        return True
    seen = counters.batches_done * old_batch * old_world  # samples of this epoch, all processes
    counters.batches_done = min(seen // (new_batch * new_world), epoch_batches)
    skipped = counters.batches_done * new_batch * new_world
    if info.is_main:
        log.warning(f"resuming inside epoch {counters.epoch + 1} with batch size {new_batch} x {new_world} "
                    f"process(es) (stopped with {old_batch} x {old_world}): continuing after {skipped} of its samples"
                    + (f" ({seen} were seen; the epoch's logged losses cover only what follows)"
                       if skipped != seen else "")
                    + (", approximately (another process count)" if old_world != new_world else ""))
    return skipped == seen
