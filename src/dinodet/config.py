"""Typed configuration for DINO models.

Every knob of the detector lives in one of these dataclasses; named presets (``dinodet.presets``)
build fully resolved instances.  Configs round-trip through plain dicts (``to_dict`` /
``from_dict``) so checkpoints can store them as JSON, and ``apply_overrides`` implements
``--set model.num_queries=300`` style edits with unknown keys rejected.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass
class BackboneConfig:
    """Convolutional / transformer feature extractor.

    ``name``: ``resnet18/34/50/101``, ``swin_t/s/b/l`` (patch 4; ``window_size`` 7 or 12) or
    ``convnext_tiny/small/base/large/xlarge``.  ``return_layers`` are the backbone stages whose outputs
    feed the transformer, counted like the official ``return_interm_indices`` (0 = stride 4,
    1 = stride 8, 2 = stride 16, 3 = stride 32).
    """

    name: str = "resnet50"
    return_layers: tuple[int, ...] = (1, 2, 3)
    dilation: bool = False  # ResNet: dilated layer4; Swin: no patch merging before stage 3 (stride 16)
    # ResNet: stages 0..freeze_at-1 are frozen (0 = stem only, 1 = stem + layer1 as in the official recipe,
    # -1 = nothing, for training from scratch)
    freeze_at: int = 1
    norm: str = "frozen_bn"  # ResNet only: frozen_bn (official) | bn | gn (GroupNorm; for training from scratch)
    checkpoint: str | None = None  # optional path to ImageNet weights; nothing is ever downloaded
    # --- Swin / ConvNeXt only ---
    window_size: int = 7  # Swin attention window (7 for the 224 releases, 12 for the 384 ones)
    drop_path_rate: float | None = None  # stochastic depth at the last block; None: official default (Swin 0.2, ConvNeXt 0)
    use_checkpoint: bool = False  # activation checkpointing per block (memory for compute; same outputs)
    # -1: train everything (official); 0: freeze the patch embedding / stem; k >= 1: also stages 0..k-1
    frozen_stages: int = -1


@dataclass
class ModelConfig:
    """Detector architecture: backbone, transformer sizes, queries, denoising, post-processing, MSDA kernel.

    Defaults are the official DINO 4-scale values (256-d, 6 + 6 layers, 900 queries, dn_number 100,
    COCO's 91 class ids); ``dn_number`` 0 disables contrastive denoising.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_classes: int = 91
    hidden_dim: int = 256
    num_heads: int = 8
    num_feature_levels: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 900
    pe_temperature_h: float = 20.0
    pe_temperature_w: float = 20.0
    proposal_base_size: float = 0.05  # encoder proposal width/height at level 0 (doubles per level)
    # contrastive denoising
    dn_number: int = 100
    dn_box_noise_scale: float = 0.4
    dn_label_noise_ratio: float = 0.5
    dn_labelbook_size: int | None = None  # None: equal to num_classes
    # post-processing
    num_select: int = 300
    # multi-scale deformable attention kernel (models/ops/msda.py): auto | pytorch (grid_sample reference) | gather
    # (ONNX-exportable) | embedding_bag (one fused embedding_bag) | triton (CUDA only).  Resolved once where the
    # model is put on a device (models.attention.configure_msda: inference modes, training, export, bench); auto =
    # Triton on CUDA, on CPU embedding_bag for inference and pytorch for training.  A backend that cannot run there
    # falls back to pytorch with a warning.  $DINODET_MSDA, read at that point, replaces it; the `reference` mode
    # and export (its --msda) override both
    msda_backend: str = "auto"

    @property
    def labelbook_size(self) -> int:
        return self.num_classes if self.dn_labelbook_size is None else self.dn_labelbook_size


@dataclass
class LossConfig:
    """Hungarian matching costs and loss weights (official DINO values)."""

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    interm_loss_coef: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    aux_loss: bool = True


@dataclass
class DataConfig:
    """Augmentation and evaluation resolution (official policy by default).

    Training: random horizontal flip, then either a random resize with the short side drawn from
    ``train_scales`` (long side <= ``max_size``) or resize to one of ``crop_resize_scales`` -> random
    crop with sides in ``crop_size`` -> random resize as before.  Evaluation resizes the short side
    to ``eval_size`` (long side <= ``max_size``).
    """

    train_scales: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    eval_size: int = 800
    num_workers: int = 2
    # LVIS repeat-factor sampling: an image with a class seen in fewer than this fraction of the
    # training images is drawn more often (0: off, every image once per epoch, as the official code)
    repeat_factor_threshold: float = 0.0


@dataclass
class TrainConfig:
    """Optimisation schedule (official DINO values for the 12-epoch schedule)."""

    epochs: int = 12
    batch_size: int = 2  # per process
    accumulate: int = 1  # gradient accumulation steps (effective batch = batch_size * accumulate * world)
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    lr_drop: int = 11  # epoch after which the lr is multiplied by 0.1
    clip_max_norm: float = 0.1
    amp: str = "off"  # "off" | "bf16" | "fp16"
    ema: bool = False
    ema_decay: float = 0.9997
    seed: int = 42
    eval_every: int = 1  # epochs
    eval_batch_size: int = 1
    log_every: int = 20  # optimizer steps between step logs / loss-finiteness checks (each is a host sync)


@dataclass
class DINOConfig:
    """A complete detector description: architecture, losses, data policy and schedule."""

    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DINOConfig:
        return _from_dict(cls, d, "")

    @classmethod
    def from_json(cls, s: str) -> DINOConfig:
        return cls.from_dict(json.loads(s))



def _from_dict(cls, d: dict[str, Any], prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        sub = _dataclass_type(cls, name)
        if sub is not None:
            kwargs[name] = _from_dict(sub, value, f"{prefix}{name}.")
        else:
            kwargs[name] = typed_value(hints[name], value, prefix + name)
    cfg = cls(**kwargs)
    return check_config(cfg) if cls is DINOConfig else cfg


def typed_value(hint: Any, value: Any, key: str) -> Any:
    """``value`` as the field type ``hint`` (int, float, bool, str, tuple[int, ...], tuple[int, int],
    X | None), or ConfigError naming ``key``.  JSON gives lists for tuples and may give 12.0 for 12."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        if isinstance(value, (list, tuple)) and (args[-1] is Ellipsis or len(value) == len(args)):
            return tuple(typed_value(args[0], v, key) for v in value)
        size = "a list of integers" if args[-1] is Ellipsis else f"a list of {len(args)} integers"
        raise ConfigError(f"{key} must be {size}, got {value!r}")
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
    raise ConfigError(f"{key} must be {what}, got {value!r}")


#: The largest image side (short side, long-side cap, training scales) a config or an option may ask
#: for: 6x the official 1333, and a bound on what one image can make dinodet allocate.
MAX_IMAGE_SIDE = 8192

# Ranges of the numeric settings (inclusive; None: open).  Checked whenever a config is read from
# data (overrides, checkpoints, official args), so a bad value is one line, not a traceback later.
# The sizes have upper bounds with a wide margin over every official config and preset (256-d,
# 2048 feed-forward, 900 queries, 6 + 6 layers, 8 heads, 4 points, 5 levels): a checkpoint or a
# config file is untrusted input, and without them hidden_dim=524288 asks for terabytes.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.repeat_factor_threshold": (0, 1),
    "model.num_classes": (1, 20000), "model.dn_labelbook_size": (1, 20000),  # V3Det has 13204 classes
    "model.hidden_dim": (1, 4096), "model.dim_feedforward": (1, 65536), "model.num_heads": (1, 64),
    "model.num_feature_levels": (1, 8), "model.enc_layers": (0, 64), "model.dec_layers": (1, 64),
    "model.enc_n_points": (1, 64), "model.dec_n_points": (1, 64), "model.num_queries": (1, 10000),
    "model.num_select": (1, 100000), "model.dn_number": (0, 10000), "model.dropout": (0, 1),
    "model.dn_box_noise_scale": (0, None), "model.dn_label_noise_ratio": (0, 1),
    "model.pe_temperature_h": (0, None), "model.pe_temperature_w": (0, None), "model.proposal_base_size": (0, None),
    "model.backbone.window_size": (1, 64), "model.backbone.drop_path_rate": (0, 1),
    "model.backbone.return_layers": (0, 3),  # stages of stride 4, 8, 16, 32
    **{f"loss.{k}": (0, None) for k in ("cost_class", "cost_bbox", "cost_giou", "cls_loss_coef", "bbox_loss_coef",
                                        "giou_loss_coef", "interm_loss_coef", "focal_gamma")},
    "loss.focal_alpha": (0, 1),
    **{f"data.{k}": (1, MAX_IMAGE_SIDE) for k in ("max_size", "eval_size", "train_scales", "crop_resize_scales",
                                                  "crop_size")},
    "data.num_workers": (0, 256),
    **{f"train.{k}": (1, None) for k in ("epochs", "lr_drop", "eval_every", "log_every")},
    **{f"train.{k}": (1, 1024) for k in ("batch_size", "accumulate", "eval_batch_size")},
    **{f"train.{k}": (0, None) for k in ("lr", "lr_backbone", "weight_decay", "clip_max_norm", "seed")},
    "train.ema_decay": (0, 1),
}


def check_config(cfg: DINOConfig) -> DINOConfig:
    """Raise ConfigError naming the first setting outside its range (``_RANGES``); returns ``cfg``."""
    for key, (lo, hi) in _RANGES.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        values = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and not value:
            raise ConfigError(f"{key} must not be empty")
        for v in values:
            if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
                bound = f"in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else f">= {lo:g}"
                raise ConfigError(f"{key} must be {bound}, got {value!r}")
    if cfg.data.crop_size[0] > cfg.data.crop_size[1]:
        raise ConfigError(f"data.crop_size is (min, max), got {list(cfg.data.crop_size)}")
    return cfg


def _dataclass_type(cls, name: str):
    default = cls.__dataclass_fields__[name].default_factory  # type: ignore[attr-defined]
    if default is not dataclasses.MISSING and dataclasses.is_dataclass(default):
        return default
    return None


def parse_override(item: str) -> tuple[str, Any]:
    """``"key.path=value"`` -> (key path, value parsed as JSON, else the text itself).

    Raises ConfigError for an item without ``=`` or without a key.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not of the form key.path=value")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def apply_overrides(cfg: DINOConfig, overrides: list[str]) -> DINOConfig:
    """Return a copy of ``cfg`` with ``key.path=value`` overrides applied (values parsed as JSON).

    Unknown keys raise ConfigError naming the key.
    """
    d = cfg.to_dict()
    for item in overrides:
        path, value = parse_override(item)
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            if not isinstance(node, dict) or k not in node or not isinstance(node[k], dict):
                raise ConfigError(f"unknown config key: {path}")
            node = node[k]
        if keys[-1] not in node:
            raise ConfigError(f"unknown config key: {path}")
        node[keys[-1]] = value
    return DINOConfig.from_dict(d)
