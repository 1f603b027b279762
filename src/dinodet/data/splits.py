"""Where a dataset's splits are (``DataSpec``), which split evaluates, and the training pair of
datasets (``build_train_datasets``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..config import DINOConfig
from .coco import DetectionDataset, build_dataset, resolve_coco_paths
from .cvat import resolve_cvat_split
from .layouts import resolve_format, resolve_roboflow_paths
from .report import SplitNotFoundError
from .voc import resolve_voc_paths
from .yolo import resolve_yolo_paths

logger = logging.getLogger("dinodet")


@dataclass
class DataSpec:
    """Where the data is: a folder in one of ``layouts.FORMATS`` (``auto``: detected), and the names
    of its training and validation splits (each layout finds ``val`` under its usual aliases)."""

    root: str
    format: str = "coco"
    train_split: str = "train"
    val_split: str = "val"


def split_exists(spec: DataSpec, split: str) -> bool:
    """Whether ``split`` can be located (its annotations/images found; not yet parsed).  A split that
    is named but broken (a data YAML's path that does not exist, a missing label folder) raises."""
    format = resolve_format(spec.root, spec.format)
    try:
        if format == "yolo":
            resolve_yolo_paths(spec.root, split)
        elif format == "roboflow":
            resolve_roboflow_paths(spec.root, split)
        elif format == "voc":
            resolve_voc_paths(spec.root, split)
        elif format == "cvat":
            resolve_cvat_split(spec.root, split)
        else:
            resolve_coco_paths(spec.root, split)
    except SplitNotFoundError:
        return False
    return True


def eval_split(spec: DataSpec) -> str:
    """The split to evaluate on: the val split if the data has one, else the training split (with
    a logged warning: the scores then measure fitting, not generalisation)."""
    if split_exists(spec, spec.val_split):
        return spec.val_split
    logger.warning("no '%s' split in '%s'; evaluating on the '%s' split (the training images)",
                   spec.val_split, spec.root, spec.train_split)
    return spec.train_split


def build_train_datasets(spec: DataSpec, cfg: DINOConfig, label_map: Any = None
                         ) -> tuple[DetectionDataset, DetectionDataset]:
    """(training set with augmentation, evaluation set of ``eval_split``).  Both share one label map:
    ``label_map`` if given (resume / fine-tuning onto a stored class set), else the training split's."""
    train_set = build_dataset(spec.root, spec.train_split, spec.format, train=True, data_cfg=cfg.data,
                              label_map=label_map)
    val_set = build_dataset(spec.root, eval_split(spec), spec.format, train=False, data_cfg=cfg.data,
                            label_map=train_set.label_map)
    return train_set, val_set
