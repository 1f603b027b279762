"""The DINO training loop (official recipe) with resumable, reproducible, distributed runs.

Recipe (official ``main.py`` / ``engine.py``): AdamW with the backbone at ``lr_backbone`` and
everything else at ``lr``; StepLR dropping the lr by 0.1 after ``lr_drop`` epochs (stepped once per
epoch); gradient clipping at ``clip_max_norm`` over all parameters; the criterion supplies the
Hungarian-matched focal / L1 / GIoU losses of every decoder layer, the encoder proposals and the
denoising groups with the official weights.  Additions: mixed precision (bf16 autocast, or fp16
with a GradScaler), an optional weight EMA (evaluated instead of the raw weights), and gradient
accumulation.

Gradient accumulation reproduces the bigger batch: the criterion divides each micro-batch's loss
by that micro-batch's box count, so micro-batch i is weighted by max(N_i, W) / max(N, W) (N_i its
box count over all W processes, N the window's) instead of a flat 1/accumulate; the sum of the
weighted gradients is then exactly the gradient of the whole window as one batch (up to float
rounding; the denoising losses still differ because the number of denoising groups depends on the
largest image of each micro-batch).

Reproducibility: model initialisation uses ``train.seed`` on every rank; training randomness
(denoising noise, augmentation) uses ``seed + rank``.  The data order comes from a
DistributedSampler (also for one process) whose permutation depends only on (seed, epoch), so W
processes x batch B sees the same global batches as 1 process x batch W*B.  A checkpoint stores
every rank's RNG states, taken before the evaluation (which runs with the RNG state preserved), so
a resumed run continues exactly like an uninterrupted one (with ``data.num_workers=0``; worker
processes keep private RNG streams that cannot be captured).

The files the run writes in RUN_DIR (rank 0 only), the saved train state and resuming from it are
``engine.run_dir``'s.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from ..checkpoint import init_from_config
from ..config import ConfigError, DINOConfig, TrainConfig, check_config
from ..data.loader import RepeatFactorSampler, image_classes, repeat_factors
from ..errors import TrainingError
from ..files import write_json_atomic
from ..inference.modes import autocast as amp_autocast
from ..inference.modes import compute_dtype
from ..models.attention import configure_msda
from ..models.criterion import SetCriterion, build_criterion
from ..models.matcher import NonFiniteCostError
from .confusion import write_confusion_chart
from .distributed import (
    all_gather_tensor,
    all_reduce_sum,
    cleanup_distributed,
    init_distributed,
    preserved_rng,
    seed_everything,
)
from .ema import ModelEMA
from .evaluate import HEADLINE, EvalResult, evaluate
from .finetune import load_finetune_weights
from .logging import RunLogger
from .pictures import write_eval_pictures
from .plots import plot_curves
from .run_dir import (
    BEST_CHECKPOINT,
    CHECKPOINT,
    CURVES,
    FINAL_METRICS,
    RESOLVED_CONFIG,
    Counters,
    TrainState,
    capture_train_state,
    open_run_dir,
    resume_run,
    save_run_checkpoints,
    write_run_file,
)
from .tide import evaluation_breakdown, write_error_chart

log = logging.getLogger(__name__)

AMP_MODES = ("off", "bf16", "fp16")

# Loss terms logged besides the weighted total: final layer, final-layer denoising, encoder proposals.
LOGGED_LOSSES = ("loss_ce", "loss_bbox", "loss_giou", "class_error",
                 "loss_ce_dn", "loss_bbox_dn", "loss_giou_dn",
                 "loss_ce_interm", "loss_bbox_interm", "loss_giou_interm")


@dataclass
class TrainOptions:
    """How to run (as opposed to what to train, which is the DINOConfig)."""

    run_dir: Path
    device: str = "cpu"
    resume: bool = False  # continue RUN_DIR/checkpoint.pt (starts fresh, with a warning, if there is none)
    finetune_from: str | None = None  # initial weights: an official or dinodet checkpoint
    max_steps: int | None = None  # stop after this many optimizer steps in total (smoke tests)
    progress: bool = True  # tqdm bars (rank 0)
    tensorboard: bool = True
    pictures: int = 8  # val images drawn with the final evaluation's detections (0: none)
    picture_threshold: float = 0.3  # score above which a detection is drawn
    # early stopping: stop after this many evaluations without a better val AP (None: on resume the
    # run's own setting, else never)
    patience: int | None = None
    # the options that repeat the run (data, format, ...): written with the resolved settings to
    # RUN_DIR/config.yaml (``run_dir.write_run_file``); None: not written
    run_options: dict[str, Any] | None = None
    loggers: tuple[str, ...] = ()  # besides TensorBoard: "mlflow", "wandb" (engine.logging)
    tracking_uri: str | None = None  # MLflow's (default: a file store in RUN_DIR/mlruns)


# ------------------------------------------------------------------------------------ building blocks


def resolve_config(cfg: DINOConfig, num_classes: int) -> DINOConfig:
    """A copy of ``cfg`` whose class count comes from the dataset (and the denoising label book
    with it), after checking the training settings."""
    cfg = copy.deepcopy(cfg)
    cfg.model.num_classes = int(num_classes)
    cfg.model.dn_labelbook_size = None
    check_config(cfg)  # a config built in Python has not been through the checks of one read from data
    check_train_config(cfg.train)
    return cfg


def check_train_config(t: TrainConfig) -> None:
    """What ``config.check_config`` cannot know: the training choices this engine offers.  (Types
    and numeric ranges are checked whenever a config is read from data.)"""
    if t.amp not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {', '.join(AMP_MODES)}, got '{t.amp}'")


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two parameter groups (official ``get_param_dict``, type 'default'): 'main' at
    ``lr`` and 'backbone' (names starting with ``backbone.``) at ``lr_backbone``; frozen parameters
    are left out."""
    main, backbone = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else main).append(p)
    groups = [{"params": main, "lr": t.lr, "name": "main"},
              {"params": backbone, "lr": t.lr_backbone, "name": "backbone"}]
    # the fused kernel updates each parameter in one pass (no per-op Python loop): same maths, faster
    fused = all(p.device.type in ("cpu", "cuda") for p in main + backbone) or None
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig) -> torch.optim.lr_scheduler.StepLR:
    """lr x 0.1 after every ``lr_drop`` epochs; ``step()`` once per completed epoch."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.lr_drop, gamma=0.1)


def build_grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling against gradient underflow; bf16 (float32's exponent range) does not."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {("lr" if g.get("name", "main") == "main" else f"lr_{g['name']}"): float(g["lr"])
            for g in optimizer.param_groups}


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose current epoch can start after the first ``start`` samples, so a
    run stopped mid-epoch resumes with exactly the batches it had not seen yet."""

    start = 0

    def set_start(self, start: int) -> None:
        self.start = max(0, int(start))

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class ResumableRepeatFactorSampler(ResumableSampler, RepeatFactorSampler):
    """``RepeatFactorSampler`` that resumes mid-epoch like ``ResumableSampler``."""


def build_train_sampler(train_set: Any, cfg: DINOConfig, world_size: int, rank: int) -> ResumableSampler:
    """The training order: every image once per epoch, or with ``data.repeat_factor_threshold`` > 0
    images of rare classes repeated (``data.loader.repeat_factors``); both depend only on (seed,
    epoch), so every process and every resume draws the same."""
    threshold = cfg.data.repeat_factor_threshold
    if threshold > 0:
        factors = repeat_factors(image_classes(train_set), threshold)
        if rank == 0:
            log.info("repeat-factor sampling (threshold %g): %d of %d images repeated (up to %.1fx); an epoch is %d "
                     "images", threshold, int((factors > 1).sum()), len(factors), float(factors.max(initial=1.0)),
                     round(float(factors.sum())))
        return ResumableRepeatFactorSampler(train_set, factors, num_replicas=world_size, rank=rank, seed=cfg.train.seed)
    return ResumableSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed,
                            drop_last=False)


def window_weights(box_counts: Tensor, world_size: int) -> tuple[Tensor, Tensor]:
    """Accumulation weights of one window from every rank's per-micro-batch box counts.

    Args:
        box_counts: int [W, k] boxes of micro-batch i on rank r; -1 where a rank's micro-batch was
            entirely unreadable (then every rank skips it, keeping the collectives in step).
    Returns:
        (valid bool [k], weight float64 [k]): weight_i = max(N_i, W) / max(N, W) for the valid ones.
    """
    valid = (box_counts >= 0).all(0)
    per_batch = box_counts.clamp(min=0).sum(0).double()
    total = per_batch[valid].sum()
    w = float(world_size)
    weights = torch.where(valid, per_batch.clamp(min=w) / total.clamp(min=w), torch.zeros_like(per_batch))
    return valid, weights


# ------------------------------------------------------------------------------------- the run


class Trainer:
    """Owns the model, optimisation state and files of one run; ``fit()`` runs it."""

    def __init__(self, cfg: DINOConfig, train_set: Any, val_set: Any, opts: TrainOptions):
        self.opts = opts
        self.label_map = train_set.label_map
        self.cfg = resolve_config(cfg, self.label_map.num_classes)
        self.train_set, self.val_set = train_set, val_set
        self.info, self.device = init_distributed(opts.device)
        self.run_dir = Path(opts.run_dir)
        t = self.cfg.train

        saved = open_run_dir(self.run_dir, opts.resume, self.info)  # checkpoint.pt to resume, if any

        seed_everything(t.seed)  # the same initial weights on every rank
        self.model = init_from_config(self.cfg).to(self.device)
        # the MSDA backend is chosen here, once, for this device, precision and backward
        configure_msda(self.model, self.device, compute_dtype(t.amp), needs_grad=True)
        if opts.finetune_from and saved is None:
            loaded = load_finetune_weights(self.model, opts.finetune_from, self.label_map.class_names,
                                           self.label_map.category_ids)
            if self.info.is_main:
                log.info(f"fine-tuning from {opts.finetune_from}{loaded.summary()}")
        self.criterion: SetCriterion = build_criterion(self.cfg.model.num_classes, self.cfg.loss,
                                                       self.cfg.model.dec_layers).to(self.device)
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.scaler = build_grad_scaler(self.device, t.amp)
        self.ema = ModelEMA(self.model, t.ema_decay) if t.ema else None
        self.counters = Counters()
        # loss sums of the epoch a max_steps stop interrupted (all ranks'), continued after --resume
        # so that epoch's logged means cover every batch of it, not only those after the resume
        self._carried_sums: list[float] | None = None
        self._stopped_sums: list[float] | None = None

        self.sampler = build_train_sampler(train_set, self.cfg, self.info.world_size, self.info.rank)
        from ..data.loader import build_loader

        self.loader = build_loader(train_set, t.batch_size, train=True, num_workers=self.cfg.data.num_workers,
                                   sampler=self.sampler, seed=t.seed + self.info.rank,
                                   pin_memory=self.device.type == "cuda")
        if self.device.type == "cpu" and t.amp == "fp16" and self.info.is_main:
            log.warning("train.amp=fp16 on the CPU is much slower than float32 (no fast half kernels there); "
                        "bf16 is the CPU's mixed precision")
        if saved is not None:
            lm = self.label_map
            point = resume_run(saved, self.run_dir / CHECKPOINT, self.cfg, lm.class_names, lm.category_ids,
                               getattr(train_set, "data_categories", {}), self.model, self.optimizer,
                               self.scheduler, self.scaler, self.ema, self.loader.generator, self.info,
                               self._epoch_batches())
            self.counters, sums = point.counters, point.carried_loss_sums
            self._carried_sums = sums if sums is not None and len(sums) == len(LOGGED_LOSSES) + 2 else None
        else:
            seed_everything(t.seed + self.info.rank)  # training randomness differs between ranks
        if opts.patience is not None:
            if opts.patience < 1:
                raise ConfigError(f"patience must be >= 1 evaluation, got {opts.patience}")
            self.counters.patience = opts.patience
            # a run that stopped early continues under a larger patience
            self.counters.stopped_early = self.counters.evals_since_best >= opts.patience
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                    if self.info.enabled else self.model)
        self.logger = RunLogger(self.run_dir, enabled=self.info.is_main,
                                # a run restarted by --resume (stopped before its first checkpoint): its
                                # log and TensorBoard events are dropped, as those after a checkpoint are
                                resume_step=self.counters.step if saved is not None else (0 if opts.resume else None),
                                tensorboard=opts.tensorboard, loggers=opts.loggers,
                                tracking_uri=opts.tracking_uri, params=self.cfg.to_dict())
        if self.info.is_main:
            write_json_atomic(self.run_dir / RESOLVED_CONFIG, self.cfg.to_dict())
            if opts.run_options is not None:
                write_run_file(self.run_dir, self.cfg, opts.run_options)
        self.last_eval: EvalResult | None = None
        # losses not yet checked for NaN/inf (see _check_finite): their sum and the last loss dict
        self._unchecked_sum: Tensor | float = 0.0
        self._last_losses: dict[str, Tensor] = {}
        # completed epochs, fractional after a max_steps stop mid-epoch
        self.epochs_done = self.counters.epoch + self.counters.batches_done / max(self._epoch_batches(), 1)

    # ---------------------------------------------------------------- checkpoints

    def _save(self, state: TrainState, result: EvalResult | None) -> None:
        """checkpoint.pt always; checkpoint_best.pt (the evaluated weights) when AP improved.  An
        evaluation without improvement counts towards the patience (``TrainOptions.patience``)."""
        c = self.counters
        improved = result is not None and result.metrics["AP"] > c.best_ap
        if result is not None and improved:
            c.best_ap = state.counters.best_ap = result.metrics["AP"]
        if result is not None:
            c.evals_since_best = 0 if improved else c.evals_since_best + 1
            # the last epoch is no early stop: more --epochs on resume then train on
            c.stopped_early = (c.patience is not None and c.evals_since_best >= c.patience
                               and c.epoch < self.cfg.train.epochs)
            state.counters.evals_since_best, state.counters.stopped_early = c.evals_since_best, c.stopped_early
            state.counters.patience = c.patience
        if self.info.is_main:
            lm = self.label_map
            save_run_checkpoints(self.run_dir, self.model, self.cfg, lm.class_names, lm.category_ids, state,
                                 result.metrics if result else None, best=self.eval_model if improved else None,
                                 ema_weights=self.ema is not None)

    # ---------------------------------------------------------------- training

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _epoch_batches(self) -> int:
        """Micro-batches per rank in a full epoch (the sampler pads ranks to equal length)."""
        return math.ceil(self.sampler.num_samples / self.cfg.train.batch_size)

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """One epoch, or what is left of it after a resume.  Returns (mean losses, stopped early by
        max_steps)."""
        from tqdm import tqdm

        t, c, info = self.cfg.train, self.counters, self.info
        self.model.train()
        self.criterion.train()
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(c.batches_done * t.batch_size)
        sums = torch.zeros(len(LOGGED_LOSSES) + 2, dtype=torch.float64, device=self.device)  # terms, total, count
        if self._carried_sums is not None and info.is_main:  # already summed over ranks: counted once
            sums += torch.tensor(self._carried_sums, dtype=sums.dtype, device=sums.device)
        self._carried_sums = None
        bar = tqdm(total=self._epoch_batches(), initial=c.batches_done, desc=f"epoch {epoch + 1}/{t.epochs}",
                   unit="batch", file=sys.stderr, dynamic_ncols=True,
                   disable=not (self.opts.progress and info.is_main))
        batches = iter(self.loader)
        steps_before, windows = c.step, 0
        try:
            while True:
                window = list(itertools.islice(batches, t.accumulate))
                if not window:
                    if windows and c.step == steps_before:  # every batch was dropped (same on every rank)
                        raise TrainingError(f"epoch {epoch + 1} took no training step: no image of it could be "
                                            "read (see the data problems above, or `dinodet check-data --decode`)")
                    self._check_finite()
                    return self._mean_losses(sums, stopped=False), False
                windows += 1
                if self._train_window(window, sums) and c.step % t.log_every == 0:
                    self._check_finite()
                    bar.set_postfix(loss=f"{sums[-2].item() / max(sums[-1].item(), 1):.3f}",
                                    lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
                c.batches_done += len(window)
                bar.update(len(window))
                if self._max_steps_reached() and c.batches_done < self._epoch_batches():
                    self._check_finite()
                    return self._mean_losses(sums, stopped=True), True
        finally:
            bar.close()

    def _train_window(self, window: list[Any], sums: Tensor) -> bool:
        """Forward/backward each micro-batch of an accumulation window, then one optimizer step.
        Returns whether a step was taken.  Besides the box-count exchange between processes,
        nothing here waits for the device: the loss is checked and logged every
        ``train.log_every`` steps (``_check_finite``)."""
        t, info = self.cfg.train, self.info
        counts = torch.tensor([-1 if b is None else sum(len(x["labels"]) for x in b[2]) for b in window],
                              dtype=torch.int64, device=self.device if info.enabled else "cpu")
        valid, weights = window_weights(all_gather_tensor(counts, info).cpu(), info.world_size)
        if not valid.any():
            return False
        last = int(valid.nonzero()[-1])
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(window):
            if not valid[i]:
                continue
            images, mask, targets = batch
            images, mask = images.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
            targets = [{k: v.to(self.device, non_blocking=True) for k, v in tg.items()} for tg in targets]
            # gradients are all-reduced once per window, at its last micro-batch
            sync = nullcontext() if (i == last or not info.enabled) else self.ddp.no_sync()
            with sync:
                with amp_autocast(self.device, t.amp):
                    out = self.ddp(images, mask, targets)
                try:
                    losses = self.criterion(out.float(), targets)
                except NonFiniteCostError:
                    self._check_finite()  # names the loss that went bad first, if one did
                    raise TrainingError(f"the model's predictions became NaN/inf at step {self.counters.step + 1}; "
                                        "try a lower train.lr or train.amp=off") from None
                loss = self.criterion.total_loss(losses)
                scaled = loss * float(weights[i])
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            # summed on the device: no host sync per micro-batch for logging
            zero = loss.new_zeros(())
            logged = [losses.get(k, zero).detach() for k in LOGGED_LOSSES] + [loss.detach(), zero + 1]
            sums += torch.stack(logged).to(sums.dtype)
            self._unchecked_sum, self._last_losses = self._unchecked_sum + loss.detach(), losses
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if t.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.counters.step += 1
        if self.info.is_main and self.counters.step % t.log_every == 0:
            self.logger.log_scalars(self.counters.step, {"loss": loss.item(), **current_lrs(self.optimizer)},
                                    prefix="train_step/")
        return True

    def _check_finite(self) -> None:
        """Raise TrainingError when a loss since the last check was NaN/inf (one host sync).

        Checked every ``log_every`` steps and before anything is saved, so a diverged run stops
        with its last good checkpoint intact.
        """
        total, self._unchecked_sum = self._unchecked_sum, 0.0
        if not isinstance(total, Tensor) or bool(torch.isfinite(total)):
            return
        bad = {k: round(v.item(), 4) for k, v in self._last_losses.items() if not torch.isfinite(v)}
        raise TrainingError(f"the loss became non-finite (NaN/inf) by step {self.counters.step} (last non-finite "
                            f"terms: {bad or 'none, the sum overflowed'}); try a lower train.lr or train.amp=off")

    def _mean_losses(self, sums: Tensor, stopped: bool) -> dict[str, float]:
        """Epoch means over every micro-batch of every rank (so far, when ``stopped`` inside the
        epoch: the sums are then kept for the checkpoint)."""
        total = all_reduce_sum(sums, self.info).cpu()
        self._stopped_sums = total.tolist() if stopped else None
        n = max(total[-1].item(), 1.0)
        means = {f"train_{k}": total[i].item() / n for i, k in enumerate(LOGGED_LOSSES)}
        return {"train_loss": total[-2].item() / n, **means}

    # ---------------------------------------------------------------- evaluation

    def evaluate(self) -> EvalResult:
        t = self.cfg.train
        with preserved_rng():
            return evaluate(self.eval_model, self.val_set, self.label_map.category_ids, device=self.device,
                            batch_size=t.eval_batch_size, num_select=self.cfg.model.num_select, amp=t.amp,
                            dist_info=self.info, num_workers=self.cfg.data.num_workers, progress=self.opts.progress)

    # ---------------------------------------------------------------- the loop

    def fit(self) -> dict[str, float]:
        """Train to ``train.epochs`` (or ``max_steps``), evaluating and checkpointing as configured;
        returns the final evaluation (also written to RUN_DIR/metrics.json)."""
        t, c = self.cfg.train, self.counters
        start = time.time()
        if c.stopped_early and self.info.is_main:
            log.info(f"the run is finished: it stopped early at epoch {c.epoch} (no better AP in {c.evals_since_best} "
                     f"evaluations, patience {c.patience}; best AP {c.best_ap:.4f} in {BEST_CHECKPOINT}); "
                     "evaluating the final weights (a larger --patience continues it)")
        elif (c.epoch >= t.epochs or self._max_steps_reached()) and self.info.is_main:
            log.info(f"nothing left to train (epoch {c.epoch}/{t.epochs}, step {c.step}); evaluating the final weights")
        try:
            while c.epoch < t.epochs and not self._max_steps_reached() and not c.stopped_early:
                epoch_start = time.time()
                epoch = c.epoch
                losses, stopped = self._train_epoch(epoch)
                progress = epoch + (c.batches_done / self._epoch_batches() if stopped else 1.0)
                self.epochs_done = progress
                if not stopped:
                    self.scheduler.step()  # per epoch, as officially
                    c.epoch, c.batches_done = epoch + 1, 0
                # RNG captured before evaluating
                train_state = capture_train_state(self.optimizer, self.scheduler, self.scaler, self.ema, c,
                                                  self._stopped_sums, self.loader.generator, self.info)
                last = c.epoch >= t.epochs or self._max_steps_reached()
                result = self.evaluate() if (last or c.epoch % t.eval_every == 0) else None
                # logged first: an interrupt while saving then still leaves the epoch in metrics.jsonl
                # (a resume drops records newer than its checkpoint, so none is ever doubled)
                self._log_epoch(progress, losses, result, time.time() - epoch_start, time.time() - start)
                self._save(train_state, result)
                if result is not None:
                    self.last_eval = result
                if c.stopped_early and self.info.is_main:
                    log.info(f"stopping early after epoch {c.epoch}: the val AP has not improved in {c.evals_since_best} "
                             f"evaluations (patience {c.patience}); the best weights (AP {c.best_ap:.4f}) are "
                             f"{self.run_dir / BEST_CHECKPOINT}")
            if self.last_eval is None:  # e.g. resuming a finished run: evaluate its final weights
                self.last_eval = self.evaluate()
            return self._finish()
        finally:
            self.logger.close()

    def _max_steps_reached(self) -> bool:
        return self.opts.max_steps is not None and self.counters.step >= self.opts.max_steps

    def _log_epoch(self, epoch: float, losses: dict[str, float], result: EvalResult | None, seconds: float,
                   elapsed: float) -> None:
        if not self.info.is_main:
            return
        record: dict[str, Any] = {"epoch": round(epoch, 4), "step": self.counters.step, **current_lrs(self.optimizer),
                                  **losses}
        if result is not None:
            record.update({f"eval_{k}": v for k, v in result.metrics.items()})
        record.update(time_s=round(seconds, 2), elapsed_s=round(elapsed, 2))
        self.logger.log_record(record)
        plot_curves(self.logger.records, self.run_dir / CURVES)
        shown = f"{epoch:g}" if float(epoch).is_integer() else f"{epoch:.2f}"  # a --max-steps stop: 0.03, not 0.03125
        line = f"epoch {shown}/{self.cfg.train.epochs}: loss {losses['train_loss']:.4f}"
        if result is not None:
            line += f", AP {result.metrics['AP']:.4f}, AP50 {result.metrics['AP50']:.4f}"
        log.info(line + f" ({seconds:.1f} s)")

    def _finish(self) -> dict[str, float]:
        assert self.last_eval is not None
        metrics = {k: self.last_eval.metrics[k] for k in HEADLINE}
        metrics.update({k: v for k, v in self.last_eval.metrics.items() if k not in metrics})
        metrics.update(epoch=round(self.epochs_done, 4), step=self.counters.step, ema_weights=self.ema is not None,
                       best_AP=max(self.counters.best_ap, metrics["AP"]))
        if self.info.is_main:
            breakdown = evaluation_breakdown(self.last_eval, self.val_set)
            write_json_atomic(self.run_dir / FINAL_METRICS, {**metrics, "per_class": self.last_eval.per_class,
                                                             "confusion_matrix": self.last_eval.confusion,
                                                             "error_breakdown": breakdown})
            plot_curves(self.logger.records, self.run_dir / CURVES)
            write_eval_pictures(self.last_eval, self.val_set, self.run_dir, pictures=self.opts.pictures,
                                threshold=self.opts.picture_threshold)
            write_confusion_chart(self.last_eval.confusion, self.run_dir)
            write_error_chart(breakdown, self.run_dir)
        return metrics


def train(cfg: DINOConfig, train_set: Any, val_set: Any, opts: TrainOptions) -> dict[str, float]:
    """Run training (see the module docstring); ``val_set`` is evaluated with ``train_set``'s label map.

    Joins the process group described by the environment (torchrun / SLURM) and leaves it at the end.
    """
    was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        return Trainer(cfg, train_set, val_set, opts).fit()
    finally:
        if not was_initialised:
            cleanup_distributed()

