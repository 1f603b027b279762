"""``dinodet demo``: synthetic shapes -> train the ``tiny`` preset on CPU -> evaluate -> pictures.

All demo defaults live here: the dataset (``DemoSettings``) and the training overrides applied on
top of the ``tiny`` preset (``DEMO_OVERRIDES``).  Users change either with ``--set``: keys starting
with ``demo.`` go to DemoSettings (e.g. ``demo.num_train=100``), all others to the DINOConfig
(e.g. ``train.epochs=3``).
"""
from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, DINOConfig, apply_overrides, parse_override, typed_value
from ..presets import get_preset

log = logging.getLogger(__name__)

DEMO_PRESET = "tiny"
DATA_DIR = "data"


@dataclass
class DemoSettings:
    """The synthetic dataset and how many annotated val images to write."""

    num_train: int = 240
    num_val: int = 40
    image_size: int = 128  # square images
    seed: int = 0
    num_classes: int = 4
    min_size: float = 0.15  # object size range, as a fraction of the image side
    max_size: float = 0.45
    max_pictures: int = 40
    picture_threshold: float = 0.3


# Training schedule / resolution for a CPU run of about 12.5 min on 2 cores.  The backbone learns
# from scratch at the transformer's rate; EMA weights (a ~100-step horizon) are what gets evaluated; the
# classification loss counts double (telling the shapes apart is what the tiny model learns last).
# A fixed 10 denoising groups (dn_number < 50 counts groups, the official rule); 40 groups learned
# about as much per epoch with 30% slower steps.
DEMO_OVERRIDES: tuple[str, ...] = (
    "train.epochs=20",
    "train.lr_drop=16",
    "model.dn_number=5",
    "train.batch_size=4",
    "train.lr=1e-3",
    "train.lr_backbone=1e-3",
    "train.ema=true",
    "train.ema_decay=0.99",
    "data.train_scales=[112,128,144]",
    "data.max_size=192",
    "data.crop_resize_scales=[128,160]",
    "data.crop_size=[96,128]",
    "data.eval_size=128",
    "data.num_workers=0",
    "loss.cls_loss_coef=2.0",
    "model.num_queries=30",
    "model.num_select=30",
)


def demo_config(overrides: list[str] | tuple[str, ...] = ()) -> tuple[DemoSettings, DINOConfig]:
    """Demo defaults with user ``--set`` overrides (``demo.*`` keys for the dataset).

    Raises:
        ConfigError: an unknown key or a malformed override.
    """
    parsed = [parse_override(o) for o in overrides]
    demo_items = [(k, v) for k, v in parsed if k.startswith("demo.")]
    cfg_items = [o for o, (k, _) in zip(overrides, parsed) if not k.startswith("demo.")]
    cfg = apply_overrides(get_preset(DEMO_PRESET), list(DEMO_OVERRIDES) + cfg_items)
    cfg.name = DEMO_PRESET  # the architecture is tiny's; checkpoints then load with --preset tiny
    values = dataclasses.asdict(DemoSettings())
    hints = typing.get_type_hints(DemoSettings)
    for key, value in demo_items:
        name = key.removeprefix("demo.")
        if name not in values:
            raise ConfigError(f"unknown config key: {key} (demo keys: {', '.join('demo.' + k for k in values)})")
        values[name] = typed_value(hints[name], value, key)
    settings = DemoSettings(**values)
    # checked here, before the training they would otherwise end (the dataset's own are checked on generation)
    for name in ("num_train", "num_val"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"demo.{name} must be >= 1, got {getattr(settings, name)}")
    if settings.image_size < 32:
        raise ConfigError(f"demo.image_size must be >= 32, got {settings.image_size}")
    if settings.max_pictures < 0:
        raise ConfigError(f"demo.max_pictures must be >= 0, got {settings.max_pictures}")
    if not 0.0 <= settings.picture_threshold <= 1.0:
        raise ConfigError(f"demo.picture_threshold must be in [0, 1], got {settings.picture_threshold}")
    return settings, cfg


def make_demo_data(run_dir: Path, s: DemoSettings, resuming: bool = False) -> Path:
    """Generate (or reuse, when already there with the same settings) RUN_DIR/data.  A dataset there
    that the demo did not generate is never replaced: the run stops with a one-line error; nor is the
    data of a run being resumed (other ``demo.*`` settings are then an error)."""
    from ..data.synthetic import make_synthetic_coco

    try:
        return make_synthetic_coco(run_dir / DATA_DIR, num_train=s.num_train, num_val=s.num_val,
                                   image_size=(s.image_size, s.image_size), seed=s.seed, num_classes=s.num_classes,
                                   size_range=(s.min_size, s.max_size), keep=resuming)
    except FileExistsError:
        raise ConfigError(f"'{run_dir / DATA_DIR}' holds a dataset the demo did not generate; "
                          "choose another --out folder") from None
    except ValueError as e:
        hint = "; resume with the run's demo.* settings, or choose another --out" if resuming else ""
        raise ConfigError(f"demo dataset: {e}{hint}") from None


def run_demo(run_dir: str | Path, overrides: Sequence[str] = (), *, device: str = "cpu", resume: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """The whole demo into ``run_dir``: the synthetic dataset (RUN_DIR/data), training the tiny
    preset on it, the final evaluation and its pictures; returns the final metrics.  ``overrides``
    as for ``demo_config``.  One process only: its point is a quick look, not a distributed run.

    Raises:
        ConfigError: under torchrun, bad overrides, an unusable ``run_dir`` (or one holding a run, without ``resume``).
    """
    import os

    from ..data.coco import build_dataset
    from ..files import check_out_folder
    from ..inference.detector import resolve_device
    from .run_dir import check_run_dir
    from .train import Trainer, TrainOptions

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("the demo runs in one process; under torchrun use `dinodet train` on its data")
    settings, cfg = demo_config(list(overrides))
    run_dir = Path(run_dir)
    check_out_folder(run_dir)
    resuming = check_run_dir(run_dir, resume)
    dev = str(resolve_device(device))
    log.info("synthetic dataset of %d + %d images in %s (generated unless already there)", settings.num_train,
             settings.num_val, run_dir / DATA_DIR)
    data = make_demo_data(run_dir, settings, resuming)
    train_set = build_dataset(data, "train", train=True, data_cfg=cfg.data)
    val_set = build_dataset(data, "val", train=False, data_cfg=cfg.data, label_map=train_set.label_map)
    opts = TrainOptions(run_dir=run_dir, device=dev, resume=resume, progress=progress,
                        pictures=settings.max_pictures, picture_threshold=settings.picture_threshold)
    return Trainer(cfg, train_set, val_set, opts).fit()
