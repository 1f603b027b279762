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
    from .tide import ERROR_BREAKDOWN

    check_out_folder(Path(out_dir))
    if (Path(out_dir) / CHECKPOINT).is_file():
        raise ConfigError(f"--out '{out_dir}' holds a training run; its results would be replaced "
                          "(choose another --out)")
    check_not_foreign(Path(out_dir), (METRICS_JSON, PREDICTIONS_JSON, PR_CURVE, PER_CLASS_AP, CONFUSION_MATRIX,
                                      ERROR_BREAKDOWN), overwrite=overwrite)


def evaluate_checkpoint(
    checkpoint: str | Path | None,
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
    model: str | Path | None = None,
    backend: str | None = None,
) -> CheckpointEvaluation:
    """COCO-evaluate ``checkpoint`` on ``split`` of ``data`` (default: ``val_split``, or ``train_split``
    with a logged warning when there is none) in inference ``mode`` (``emulate``: a CUDA-only mode's
    numerics on a CPU).  ``overrides`` (KEY=VALUE) change the data settings and the top-k size; other
    model settings are the checkpoint's (a warning names them).  Images that cannot be read are left
    out of the scores (a warning names them).

    An exported ``model`` (``dinodet export``: .onnx or OpenVINO .xml; ``checkpoint`` None) runs with
    ``backend`` ``onnxruntime`` or ``openvino`` (default: openvino for an .xml, else onnxruntime) through
    the same dataset, resize and COCOeval: the resize and the top-k size are the file's (``data.*``
    overrides still apply), its label map is matched to the dataset's as a checkpoint's.  A fixed-shape
    export pads every image to its input size, which moves AP slightly (DINO sees the padding);
    export with ``dynamic`` for the torch model's AP.

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
    from ..inference.predict import DetectorOptions, note_compile
    from .distributed import cleanup_distributed, init_distributed
    from .evaluate import category_mapping, evaluate

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    # an exported model runs on the CPU: "auto" means that there
    options = DetectorOptions(checkpoint=checkpoint, model=model, preset=preset, mode=mode, backend=backend,
                              device="cpu" if model is not None and device == "auto" else device)
    if checkpoint is not None and model is not None:
        raise ConfigError("give a checkpoint or an exported model (--model), not both")
    options.check()  # one model and a backend that runs it, before the data is looked at
    check_data_root(str(data))
    if options.resolved_backend != "torch":
        return _evaluate_exported(options, data, format=format, split=split, train_split=train_split,
                                  val_split=val_split, overrides=overrides, batch_size=batch_size, progress=progress)
    assert checkpoint is not None
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


def _evaluate_exported(options: Any, data: str | Path, *, format: str, split: str | None, train_split: str,
                       val_split: str, overrides: Sequence[str], batch_size: int,
                       progress: bool) -> CheckpointEvaluation:
    """``evaluate_checkpoint`` of an exported model (``options``: checked ``DetectorOptions``), in this
    process on the CPU (not distributed)."""
    import torch

    from ..config import DINOConfig, apply_overrides
    from ..data.coco import build_dataset
    from ..data.splits import DataSpec, eval_split
    from ..presets import get_preset, list_presets
    from .evaluate import category_mapping, evaluate

    detector = options.build()  # CheckpointError / ConfigError: unreadable file, missing package
    # the data settings of the exported preset (workers etc.), with the resize the file was exported with
    base = get_preset(detector.preset) if detector.preset in list_presets() else DINOConfig()
    base.data.eval_size, base.data.max_size = detector.size, detector.max_size
    model_keys = [o.split("=")[0].strip() for o in overrides if o.strip().startswith("model.")]
    if model_keys:
        log.warning("%s: an exported model runs as it was exported; ignored", ", ".join(model_keys))
    cfg = apply_overrides(base, [o for o in overrides if not o.strip().startswith("model.")])
    split = split or eval_split(DataSpec(str(data), format, train_split, val_split))
    dataset = build_dataset(str(data), split, format, train=False, data_cfg=cfg.data)
    lm = dataset.label_map
    try:
        mapping, how = category_mapping(detector.class_names, detector._category_ids.tolist(), lm.class_names,
                                        lm.category_ids)
    except ValueError as e:
        raise ConfigError(f"{options.model} on {data}: {e}") from None
    if how == "name":
        log.warning("the model's category ids differ from the dataset's; classes matched by name "
                    "(%d of %d matched)", sum(m is not None for m in mapping), len(mapping))
    result = evaluate(detector, dataset, mapping, device=torch.device("cpu"), batch_size=batch_size,
                      num_select=detector.num_select, num_workers=cfg.data.num_workers, progress=progress)
    if result.unreadable_ids:
        _report_unreadable(result.unreadable_ids, dataset, split, data)
    return CheckpointEvaluation(result=result, dataset=dataset, split=split, checkpoint=str(options.model),
                                mode=options.resolved_backend, ema_weights=False)


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
    """Write ``out_dir/metrics.json`` (with AP per class, the confusion matrix counts and the TIDE error
    breakdown), ``predictions.json`` (COCO records), the PR curves, AP per class,
    ``confusion_matrix.png``, ``error_breakdown.png`` and
    ``pictures`` images of the split with their detections drawn (``SPLIT_predictions/``); returns
    the paths, metrics.json and predictions.json first.  Call it on rank 0 (``evaluation.is_main``): the others hold no records.  Files dinodet did not write are
    replaced only with ``overwrite`` (``check_eval_out``, best called before the evaluation).

    Raises:
        ConfigError: see ``check_eval_out``.
    """
    from .confusion import write_confusion_chart
    from .pictures import write_eval_pictures
    from .tide import evaluation_breakdown, write_error_chart

    out = Path(out_dir)
    check_eval_out(out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluation.result
    breakdown = evaluation_breakdown(result, evaluation.dataset)
    write_json_atomic(out / METRICS_JSON, {**evaluation.metrics, "per_class": result.per_class,
                                           "confusion_matrix": result.confusion, "error_breakdown": breakdown})
    write_json_atomic(out / PREDICTIONS_JSON, result.records)
    record_outputs(out, (METRICS_JSON, PREDICTIONS_JSON), COMMAND)
    written = write_eval_pictures(result, evaluation.dataset, out, pictures=pictures, threshold=picture_threshold,
                                  folder=f"{evaluation.split}_predictions", command=COMMAND, overwrite=overwrite)
    written += write_confusion_chart(result.confusion, out) + write_error_chart(breakdown, out)
    record_outputs(out, [p.name for p in written if p.is_file()], COMMAND)
    return [out / METRICS_JSON, out / PREDICTIONS_JSON, *written]
