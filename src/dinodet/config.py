"""Typed configuration for DINO models.

Every knob of the detector lives in one of these dataclasses; named presets (``dinodet.presets``)
build fully resolved instances.  Configs round-trip through plain dicts (``to_dict`` /
``from_dict``) so checkpoints can store them as JSON, and ``apply_overrides`` implements
``--set model.num_queries=300`` style edits with unknown keys rejected.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


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
    # multi-scale deformable attention kernel: auto (Triton on CUDA, PyTorch elsewhere) | pytorch | gather | triton;
    # $DINODET_MSDA overrides it
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


class ConfigError(ValueError):
    """A config key or value that does not exist or does not fit."""


def _from_dict(cls, d: dict[str, Any], prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for name, value in d.items():
        sub = _dataclass_type(cls, name)
        if sub is not None:
            kwargs[name] = _from_dict(sub, value, f"{prefix}{name}.")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _dataclass_type(cls, name: str):
    default = cls.__dataclass_fields__[name].default_factory  # type: ignore[attr-defined]
    if default is not dataclasses.MISSING and dataclasses.is_dataclass(default):
        return default
    return None


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: DINOConfig, overrides: list[str]) -> DINOConfig:
    """Return a copy of ``cfg`` with ``key.path=value`` overrides applied (values parsed as JSON).

    Unknown keys raise ConfigError naming the key.
    """
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = d
        for k in keys[:-1]:
            if not isinstance(node, dict) or k not in node or not isinstance(node[k], dict):
                raise ConfigError(f"unknown config key: {path}")
            node = node[k]
        if keys[-1] not in node:
            raise ConfigError(f"unknown config key: {path}")
        node[keys[-1]] = _parse_value(raw)
    return DINOConfig.from_dict(d)
