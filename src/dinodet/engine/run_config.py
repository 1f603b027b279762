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
from collections.abc import Mapping, Sequence
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
from .logging import check_loggers, flatten_settings
from .pictures import PER_CLASS_AP, PR_CURVE, PREDICTIONS_DIR
from .run_dir import CHECKPOINT, CURVES, check_run_dir
from .tide import ERROR_BREAKDOWN
from .train import TrainOptions, check_train_config, train

log = logging.getLogger(__name__)

# the options a run file may hold (the names of ``run_training``'s parameters; ``set``: --set) and
# their types; paths are kept as written (relative ones are relative to the working directory)
RUN_FILE_OPTIONS: dict[str, tuple[type, ...]] = {
    "data": (str,), "format": (str,), "train_split": (str,), "val_split": (str,), "preset": (str,),
    "epochs": (int,), "batch_size": (int,), "amp": (str,), "backbone_checkpoint": (str,), "device": (str,),
    "finetune_from": (str,), "max_steps": (int,), "pictures": (int,), "picture_threshold": (float, int),
    "patience": (int,), "log": (list,), "tracking_uri": (str,), "set": (dict, list),
}
_REPEATABLE = ("overrides", "log")  # list options that add up (--set, --log) rather than replace


def read_run_file(path: str | Path) -> dict[str, Any]:
    """The options of a run file (YAML): ``RUN_FILE_OPTIONS`` keys, ``set`` as a mapping of
    ``KEY: value`` (dotted or nested) or a list of ``KEY=VALUE`` turned into ``overrides`` (a list
    of ``KEY=VALUE`` strings, as ``--set`` gives them).

    Raises:
        ConfigError: unreadable file, not a mapping, an unknown option or a value of the wrong type.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the run file '{path}': {e.strerror or e}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"'{path}' is not a YAML run file: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must be a YAML mapping of training options")
    options: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in RUN_FILE_OPTIONS:
            raise ConfigError(f"'{path}': unknown option '{key}' (options: {', '.join(RUN_FILE_OPTIONS)})")
        types = RUN_FILE_OPTIONS[name]
        if value is None:
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            raise ConfigError(f"'{path}': '{key}' must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
        if name == "set":
            options["overrides"] = _overrides_of(value, path)
        else:
            options[name] = [str(v) for v in value] if name == "log" else value
    return options


def merge_run_file(path: str | Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a run: the run file at ``path``'s (``read_run_file``) with ``given`` (the
    options stated explicitly, e.g. on the command line, by the same names) winning.  The repeatable
    ones (``overrides``, ``log``) add up instead, the file's first: a later ``--set`` item of the
    same key wins.  Options neither gives are left out (their defaults apply).

    Raises:
        ConfigError: the run file cannot be read or holds a bad option (``read_run_file``).
    """
    options = read_run_file(path)
    for name, value in given.items():
        options[name] = [*options.get(name, ()), *value] if name in _REPEATABLE else value
    return options


def _overrides_of(value: dict[str, Any] | list[Any], path: Path) -> list[str]:
    if isinstance(value, list):
        if not all(isinstance(v, str) and "=" in v for v in value):
            raise ConfigError(f"'{path}': 'set' as a list holds KEY=VALUE items")
        return list(value)
    return [f"{k}={json.dumps(v)}" for k, v in flatten_settings(value).items()]


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
    patience: int | None = None,
    loggers: Sequence[str] = (),
    tracking_uri: str | None = None,
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
    check_loggers(loggers)
    dev = str(resolve_device(device))

    train_set, val_set = build_train_datasets(DataSpec(str(data), format, train_split, val_split), cfg,
                                              label_map)
    if dist_info_from_env().is_main:
        log.info("training '%s' on %d images, %d classes; evaluating on %d images -> %s", cfg.name, len(train_set),
                 train_set.label_map.num_classes, len(val_set), run_dir)
    opts = TrainOptions(run_dir=run_dir, device=dev, resume=resume, finetune_from=finetune_from,
                        max_steps=max_steps, progress=progress, pictures=pictures,
                        picture_threshold=picture_threshold, patience=patience, loggers=tuple(loggers),
                        tracking_uri=tracking_uri,
                        run_options={"data": str(Path(data).absolute()), "format": format, "train_split": train_split,
                                     "val_split": val_split, "device": device,
                                     "finetune_from": str(Path(finetune_from).absolute()) if finetune_from else None,
                                     "max_steps": max_steps, "pictures": pictures,
                                     "picture_threshold": picture_threshold, "patience": patience,
                                     "log": list(loggers) or None, "tracking_uri": tracking_uri})
    return train(cfg, train_set, val_set, opts)


def run_pictures(run_dir: str | Path) -> list[str]:
    """The pictures a finished run (train or demo) holds, by name (``curves.png``, ...,
    ``val_predictions/``): some need detections or ground truth, so not every run has all."""

    run_dir = Path(run_dir)
    found = [n for n in (CURVES, PR_CURVE, PER_CLASS_AP, CONFUSION_MATRIX, ERROR_BREAKDOWN) if (run_dir / n).is_file()]
    if (run_dir / PREDICTIONS_DIR).is_dir():
        found.append(f"{PREDICTIONS_DIR}/")
    return found
