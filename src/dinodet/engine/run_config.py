"""A training run from its settings (what ``dinodet train`` runs): the run's configuration, then
the datasets, the options and ``engine.train.train``.

The configuration is settled before any slow step (dataset indexing, model building), so that a
wrong preset or override costs nothing; a resumed run takes its stored config and classes, on top
of which the overrides and explicit settings still apply (the trainer names changed schedule
settings).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import read_train_state, stored_config
from ..config import ConfigError, DINOConfig, apply_overrides
from ..data.coco import check_data_root
from ..data.labels import LabelMap
from ..data.splits import DataSpec, build_train_datasets
from ..inference.detector import resolve_device
from ..presets import get_preset
from .confusion import CONFUSION_MATRIX
from .distributed import dist_info_from_env
from .pictures import PER_CLASS_AP, PR_CURVE, PREDICTIONS_DIR
from .run_dir import CHECKPOINT, CURVES, check_run_dir
from .train import TrainOptions, check_train_config, train

log = logging.getLogger(__name__)


def train_run_config(
    preset: str | None,
    run_dir: str | Path,
    resume: bool = False,
    overrides: Sequence[str] = (),
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    amp: str | None = None,
    backbone_checkpoint: str | None = None,
) -> tuple[DINOConfig, LabelMap | None]:
    """(config, label map or None) of a run in ``run_dir``: a resumed run's stored config (and
    classes, which the datasets must then keep), else ``preset``'s; then ``overrides`` (KEY=VALUE)
    and the explicit settings (train.epochs, train.batch_size, train.amp, model.backbone.checkpoint).

    Raises:
        ConfigError: unknown preset or key, a value that does not fit, or a ``preset`` that is not the resumed run's.
        CheckpointError: the run's checkpoint cannot be read.
    """

    checkpoint = Path(run_dir) / CHECKPOINT
    label_map = None
    if resume and checkpoint.is_file():

        state = read_train_state(checkpoint)
        cfg = stored_config(state, checkpoint)
        if preset and preset != cfg.name:
            raise ConfigError(f"{checkpoint} was trained with preset '{cfg.name}', not '{preset}'")
        label_map = LabelMap(state["class_names"], state["category_ids"])
    elif preset:
        cfg = get_preset(preset)
    else:
        raise ConfigError("a preset is required for a new run (e.g. tiny)")
    flags = [f"train.epochs={epochs}" if epochs else None,
             f"train.batch_size={batch_size}" if batch_size else None,
             f'train.amp="{amp}"' if amp else None,
             f"model.backbone.checkpoint={json.dumps(backbone_checkpoint)}" if backbone_checkpoint else None]
    cfg = apply_overrides(cfg, list(overrides) + [f for f in flags if f])
    check_train_config(cfg.train)
    return cfg, label_map


def run_training(
    data: str | Path,
    run_dir: str | Path,
    *,
    format: str = "coco",
    train_split: str = "train",
    val_split: str = "val",
    preset: str | None = None,
    resume: bool = False,
    overrides: Sequence[str] = (),
    epochs: int | None = None,
    batch_size: int | None = None,
    amp: str | None = None,
    backbone_checkpoint: str | None = None,
    device: str = "cpu",
    finetune_from: str | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    pictures: int = 8,
    picture_threshold: float = 0.3,
) -> dict[str, Any]:
    """Train on ``data`` (a ``dinodet.data.layouts.FORMATS`` layout; its ``train_split``, evaluated on
    its ``val_split``, or on the training images when there is none) into ``run_dir``; returns the
    final metrics (on every rank).  The settings are those of ``train_run_config`` and
    ``engine.train.TrainOptions``.  Runs distributed under torchrun / SLURM (the process group comes
    from the environment).

    Raises:
        ConfigError, CheckpointError, DatasetError, TrainingError: one-line messages for users.
    """

    check_data_root(str(data))
    run_dir = Path(run_dir)
    cfg, label_map = train_run_config(preset, run_dir, resume, overrides, epochs=epochs, batch_size=batch_size,
                                      amp=amp, backbone_checkpoint=backbone_checkpoint)
    check_run_dir(run_dir, resume)  # before the (possibly slow) dataset indexing
    dev = str(resolve_device(device))
    train_set, val_set = build_train_datasets(DataSpec(str(data), format, train_split, val_split), cfg,
                                              label_map)
    if dist_info_from_env().is_main:
        log.info("training '%s' on %d images, %d classes; evaluating on %d images -> %s", cfg.name, len(train_set),
                 train_set.label_map.num_classes, len(val_set), run_dir)
    opts = TrainOptions(run_dir=run_dir, device=dev, resume=resume, finetune_from=finetune_from,
                        max_steps=max_steps, progress=progress, pictures=pictures,
                        picture_threshold=picture_threshold)
    return train(cfg, train_set, val_set, opts)


def run_pictures(run_dir: str | Path) -> list[str]:
    """The pictures a finished run (train or demo) holds, by name (``curves.png``, ...,
    ``val_predictions/``): some need detections or ground truth, so not every run has all."""

    run_dir = Path(run_dir)
    found = [n for n in (CURVES, PR_CURVE, PER_CLASS_AP, CONFUSION_MATRIX) if (run_dir / n).is_file()]
    if (run_dir / PREDICTIONS_DIR).is_dir():
        found.append(f"{PREDICTIONS_DIR}/")
    return found
