"""COCO evaluation of a checkpoint on a dataset split (what ``dinodet eval`` and
``benchmarks/mode_agreement.py`` run), and the files it writes.

The checkpoint is evaluated as it was trained: a training checkpoint's EMA weights when it has
them, its own model (of the model settings, only the top-k size ``model.num_select`` can be
changed), the dataset resized as its config says.  Its classes are matched to the dataset's by
category id, else by name.  Runs distributed under torchrun (each rank a shard of the images).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from ..files import check_not_foreign, check_out_folder, record_outputs, write_json_atomic
from .evaluate import EvalResult

log = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
PREDICTIONS_JSON = "predictions.json"
COMMAND = "eval"  # what the folders' manifests say wrote the files


@dataclass
class CheckpointEvaluation:
    """One evaluation: ``result`` (metrics, per class, PR curves; the records on rank 0 only), the
    ``dataset`` and ``split`` it scored, and what was evaluated.  ``is_main``: this process is the
    one that reports and writes (rank 0)."""

    result: EvalResult
    dataset: Any
    split: str
    checkpoint: str
    mode: str
    ema_weights: bool
    is_main: bool = True

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics with what they describe, as metrics.json holds them."""
        return {**self.result.metrics, "split": self.split, "checkpoint": self.checkpoint,
                "ema_weights": self.ema_weights, "mode": self.mode}

    @property
    def images_scored(self) -> int:
        return len(self.dataset) - len(self.result.unreadable_ids)


def check_eval_out(out_dir: str | Path, *, overwrite: bool = False) -> None:
    """Before the evaluation: ``out_dir`` must be writable, not a training run's folder (whose
    metrics.json and plots are the run's results) and (without ``overwrite``) hold no file of the
    names ``write_eval_outputs`` writes that dinodet did not write.

    Raises:
        ConfigError: it is not.
    """
    from .confusion import CONFUSION_MATRIX
    from .pictures import PER_CLASS_AP, PR_CURVE
    from .run_dir import CHECKPOINT

    check_out_folder(Path(out_dir))
    if (Path(out_dir) / CHECKPOINT).is_file():
        raise ConfigError(f"--out '{out_dir}' holds a training run; its results would be replaced "
                          "(choose another --out)")
    check_not_foreign(Path(out_dir), (METRICS_JSON, PREDICTIONS_JSON, PR_CURVE, PER_CLASS_AP, CONFUSION_MATRIX),
                      overwrite=overwrite)


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    format: str = "coco",
    split: str | None = None,
    train_split: str = "train",
    val_split: str = "val",
    preset: str | None = None,
    overrides: Sequence[str] = (),
    device: str = "cpu",
    mode: str = "exact",
    emulate: bool = False,
    batch_size: int = 1,
    progress: bool = True,
) -> CheckpointEvaluation:
    """COCO-evaluate ``checkpoint`` on ``split`` of ``data`` (default: ``val_split``, or ``train_split``
    with a logged warning when there is none) in inference ``mode`` (``emulate``: a CUDA-only mode's
    numerics on a CPU).  ``overrides`` (KEY=VALUE) change the data settings and the top-k size; other
    model settings are the checkpoint's (a warning names them).  Images that cannot be read are left
    out of the scores (a warning names them).

    Raises:
        CheckpointError, ConfigError, DatasetError: one-line messages (e.g. no class in common, no
        readable image).
    """
    from ..checkpoint import load_checkpoint
    from ..config import apply_overrides
    from ..data.coco import build_dataset, check_data_root
    from ..data.splits import DataSpec, eval_split
    from ..inference.detector import default_label_map, resolve_device
    from ..inference.modes import ModeRunner, check_mode
    from ..inference.predict import note_compile
    from .distributed import cleanup_distributed, init_distributed
    from .evaluate import category_mapping, evaluate

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    check_data_root(str(data))
    dev_name = str(resolve_device(device))
    check_mode(mode, dev_name, emulate=emulate)
    # a training checkpoint.pt holds EMA weights beside the raw ones: evaluate those, as training did
    ckpt = load_checkpoint(checkpoint, preset=preset, ema=True)
    cfg = apply_overrides(ckpt.config, list(overrides))
    ignored = [o.split("=")[0].strip() for o in overrides
               if o.strip().startswith("model.") and o.split("=")[0].strip() != "model.num_select"]
    if ignored:
        log.warning("%s: the checkpoint's model is evaluated as built; ignored", ", ".join(ignored))
    split = split or eval_split(DataSpec(str(data), format, train_split, val_split))
    dataset = build_dataset(str(data), split, format, train=False, data_cfg=cfg.data)
    names, ids = default_label_map(cfg.model.num_classes, ckpt.class_names, ckpt.category_ids)
    lm = dataset.label_map
    try:
        mapping, how = category_mapping(names, ids, lm.class_names, lm.category_ids)
    except ValueError as e:
        raise ConfigError(f"{checkpoint} on {data}: {e}") from None
    if how == "name":
        log.warning("the checkpoint's category ids differ from the dataset's; classes matched by name "
                    "(%d of %d matched)", sum(m is not None for m in mapping), len(mapping))
    info, dev = init_distributed(dev_name)
    try:
        runner = ModeRunner(ckpt.model, mode, dev, copy_model=False, emulate=emulate)
        if info.is_main:
            note_compile(mode)
        result = evaluate(runner, dataset, mapping, device=dev, batch_size=batch_size,
                          num_select=cfg.model.num_select, dist_info=info,
                          num_workers=cfg.data.num_workers, progress=progress)
    finally:
        cleanup_distributed()
    if info.is_main and result.unreadable_ids:  # said once, by the process that reports
        _report_unreadable(result.unreadable_ids, dataset, split, data)
    return CheckpointEvaluation(result=result, dataset=dataset, split=split, checkpoint=str(checkpoint), mode=mode,
                                ema_weights=ckpt.ema_weights, is_main=info.is_main)


def _report_unreadable(unreadable: list[int], dataset: Any, split: str, data: str | Path) -> None:
    """None readable is an error (not AP 0); some unreadable is a warning naming the first five."""
    index = {iid: i for i, iid in enumerate(dataset.image_ids)}
    names = [dataset.image_path(index[i]).name for i in unreadable[:5]]
    listed = ", ".join(names) + (" ..." if len(unreadable) > 5 else "")
    if len(unreadable) == len(dataset):
        raise DatasetError(f"no image of '{split}' in '{data}' could be read ({listed})")
    log.warning("%d of %d images could not be read and are left out of the scores: %s", len(unreadable),
                len(dataset), listed)


def write_eval_outputs(evaluation: CheckpointEvaluation, out_dir: str | Path, *, pictures: int = 8,
                       picture_threshold: float = 0.3, overwrite: bool = False) -> list[Path]:
    """Write ``out_dir/metrics.json`` (with AP per class and the confusion matrix counts),
    ``predictions.json`` (COCO records), the PR curves, AP per class, ``confusion_matrix.png`` and
    ``pictures`` images of the split with their detections drawn (``SPLIT_predictions/``); returns
    the paths, metrics.json and predictions.json first.  Call it on rank 0 (``evaluation.is_main``): the others hold no records.  Files dinodet did not write are
    replaced only with ``overwrite`` (``check_eval_out``, best called before the evaluation).

    Raises:
        ConfigError: see ``check_eval_out``.
    """
    from .confusion import write_confusion_chart
    from .pictures import write_eval_pictures

    out = Path(out_dir)
    check_eval_out(out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluation.result
    write_json_atomic(out / METRICS_JSON, {**evaluation.metrics, "per_class": result.per_class,
                                           "confusion_matrix": result.confusion})
    write_json_atomic(out / PREDICTIONS_JSON, result.records)
    record_outputs(out, (METRICS_JSON, PREDICTIONS_JSON), COMMAND)
    written = write_eval_pictures(result, evaluation.dataset, out, pictures=pictures, threshold=picture_threshold,
                                  folder=f"{evaluation.split}_predictions", command=COMMAND, overwrite=overwrite)
    written += write_confusion_chart(result.confusion, out)
    record_outputs(out, [p.name for p in written if p.is_file()], COMMAND)
    return [out / METRICS_JSON, out / PREDICTIONS_JSON, *written]
