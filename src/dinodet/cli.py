"""The ``dinodet`` command line.

Each subcommand is an ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func`` to a ``_run_<name>(args) -> int`` function; adding ``train``/``eval``/``demo`` means adding
one such pair and registering it in ``build_parser``.

User mistakes (missing checkpoint, wrong or unknown preset, unreadable image, unavailable device)
are reported as ONE line ``dinodet: error: ...`` on stderr with exit status 2 and no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import ConfigError
from .data.images import ImageLoadError, iter_image_paths, load_image
from .errors import first_line
from .files import save_image_atomic, write_json_atomic
from .presets import list_presets

if TYPE_CHECKING:
    from PIL import Image

    from .inference.detector import Detector
    from .inference.onnx_runtime import OnnxDetector

EXIT_USAGE = 2  # argparse's status for bad usage; we use it for every user-facing error
PROGRESS_MIN_IMAGES = 5  # below this a progress bar is more noise than help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinodet",
        description="DINO object detection (DETR with Improved deNoising anchOr boxes).",
    )
    parser.add_argument("--version", action="version", version=f"dinodet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_predict(subparsers)
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_check_data(subparsers)
    _add_demo(subparsers)
    _add_bench(subparsers)
    _add_export(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dinodet`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)  # what --slurm resubmits
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    with _warning_lines():
        return _run(args)


@contextlib.contextmanager
def _warning_lines() -> Iterator[None]:
    """While a command runs, the package's logged warnings are printed as ``dinodet: warning:``
    lines, by rank 0 only, and not also passed to the application's own (root) logging handlers:
    each warning is said once.  The logger is left as it was found afterwards."""
    log = logging.getLogger("dinodet")
    saved = log.level, log.propagate
    handler = _WarningLines()
    log.addHandler(handler)
    log.propagate = False
    if not _is_main_process():  # data problems are reported once per job, by rank 0
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.level, log.propagate = saved


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dinodet: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        _error(str(e))
        return EXIT_USAGE
    except OSError as e:  # e.g. output folder not writable, disk full
        _error(f"{e.strerror}: '{e.filename}'" if e.filename and e.strerror else str(e))
        return EXIT_USAGE
    except RuntimeError as e:
        # under torchrun, when another process stops (e.g. rank 0 on a full disk), this one's next
        # collective fails: one line here, the failing process says why
        if not _is_main_process() and _peer_failure(e):
            _error(f"process {os.environ.get('RANK')}: another process of the job stopped ({first_line(e)})")
            return 1
        raise


class _WarningLines(logging.Handler):
    """The package's logged warnings (e.g. an unreadable image, skipped) as ``dinodet: warning:``
    lines, like the CLI's own; written through tqdm so that a progress bar stays intact.  A
    multi-line warning (a dataset's problem counts and first files) keeps all its lines, each
    prefixed, so that none is lost and each can be grepped."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        kind = "error" if record.levelno >= logging.ERROR else "warning"
        lines = record.getMessage().rstrip().splitlines() or [""]
        tqdm.write("\n".join(f"dinodet: {kind}: {line}" for line in lines), file=sys.stderr)


def _is_main_process() -> bool:
    """Rank 0 of a torchrun / SLURM job, or a plain process: the one that prints warnings."""
    return int(os.environ.get("RANK", "0")) == 0


def _peer_failure(e: RuntimeError) -> bool:
    import torch.distributed as dist

    return (dist.is_available() and isinstance(e, dist.DistBackendError)) or any(
        s in str(e) for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _user_errors() -> tuple[type[Exception], ...]:
    """The package's error types whose messages are meant for users (one line, naming the file)."""
    from .checkpoint import CheckpointError  # deferred: imports the model code
    from .data.report import DatasetError
    from .deploy.export import ExportError
    from .errors import TrainingError

    return (CheckpointError, ConfigError, ImageLoadError, DatasetError, TrainingError, ExportError)


def _error(message: str) -> None:
    # First line only: the contract is one line per error, whatever an exception carries.
    print(f"dinodet: error: {first_line(message)}", file=sys.stderr)


def _warn(message: str) -> None:
    if not _is_main_process():  # under torchrun every process would repeat it
        return
    from tqdm import tqdm

    tqdm.write(f"dinodet: warning: {message}", file=sys.stderr)  # does not break a progress bar


def _note_compile(mode: str) -> None:
    """Say why a compiled mode's first batches are slow, before the progress bar seems to stall."""
    from .inference.modes import get_mode

    if get_mode(mode).compile:
        print(f"dinodet: mode '{mode}' compiles the model on the first batch of a new image size (at most 3 "
              "times; minutes on a CPU); the compiled code is cached for later runs (TORCHINDUCTOR_CACHE_DIR)",
              file=sys.stderr)


# ----------------------------------------------------------------------------------------- predict


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="detect objects in images; writes annotated images and predictions.json",
        description=(
            "Detect objects in images (files or folders of images) and write, into --out, one "
            "annotated JPEG per image (same stem) and predictions.json: a list of "
            '{"file_name", "category_id", "bbox": [x, y, w, h], "score"} records in pixels of the '
            "original image.  Images sharing a stem (cam1/0001.jpg, cam2/0001.jpg) are written as "
            "FOLDER_STEM.jpg and named by their path.  Images that cannot be read are reported and "
            "skipped; the exit status is 0 when at least one image was processed."
        ),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH", help="dinodet or official DINO checkpoint (.pth/.pt)")
    src.add_argument(
        "--random-weights",
        action="store_true",
        help="use a randomly initialised --preset model instead of a checkpoint: for smoke-testing "
        "the pipeline only, the boxes are MEANINGLESS",
    )
    src.add_argument("--model", metavar="MODEL.onnx",
                     help="an ONNX file from `dinodet export` (implies --backend onnxruntime)")
    p.add_argument("--backend", choices=("torch", "onnxruntime"),
                   help="run the PyTorch model (--checkpoint/--random-weights) or an exported ONNX model "
                   "(--model) with onnxruntime; same predictions.json (default: onnxruntime with --model, else torch)")
    p.add_argument(
        "--preset",
        metavar="NAME",
        help=f"model architecture ({', '.join(list_presets())}); with --checkpoint it is checked "
        "against the weights (default: taken from the checkpoint)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--threshold", type=float, default=0.3, help="minimum score to keep (default 0.3)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--size", type=int, help="short side after resizing (default: the checkpoint's data.eval_size, "
                   "800 for official checkpoints)")
    p.add_argument("--max-size", type=int, help="cap on the long side (default: the checkpoint's data.max_size, 1333)")
    p.add_argument("--mode", default="exact",
                   help="inference mode: exact (default, float32), reference (official grid_sample numerics), "
                   "channels_last, bf16, fp16 (CUDA), compile, compile_bf16 (CUDA); the fast ones trade a little "
                   "precision for speed (`dinodet bench` times them)")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    _check_predict_args(args)
    unique: dict[Path, Path] = {}  # a file named twice (also as "a.jpg" and "dir/../a.jpg") runs once
    for path in iter_image_paths(args.images):
        unique.setdefault(path.resolve(), path)
    paths = list(unique.values())
    if not paths:
        raise ImageLoadError(f"no images found in {', '.join(repr(str(p)) for p in args.images)}")
    out_dir = Path(args.out)
    outputs = _output_names(paths, out_dir)
    _check_out_folder(out_dir)
    detector = _build_detector(args)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)

    # A lone unreadable image is an error; in a set of images it is reported and skipped.
    skip_unreadable = len(paths) > 1
    try:
        records, done = _predict_files(detector, outputs, out_dir, args.threshold, args.batch_size, skip_unreadable)
    finally:
        if created and not any(out_dir.iterdir()):  # nothing came of it: leave no empty folder behind
            out_dir.rmdir()
    if done == 0:
        _error(f"none of the {len(paths)} images could be processed (see the warnings above); nothing written")
        return EXIT_USAGE
    json_path = out_dir / "predictions.json"
    write_json_atomic(json_path, records)
    skipped = len(paths) - done
    print(
        f"dinodet: {len(records)} detection(s) in {done} image(s) -> {json_path}"
        + (f" ({skipped} image(s) skipped, see the warnings above)" if skipped else "")
    )
    return 0


def _check_predict_args(args: argparse.Namespace) -> None:
    if args.backend is None:
        args.backend = "onnxruntime" if args.model else "torch"
    if args.backend == "onnxruntime" and not args.model:
        raise ConfigError("--backend onnxruntime needs --model MODEL.onnx (made by `dinodet export`)")
    if args.backend == "torch" and args.model:
        raise ConfigError("--model is an ONNX file: use it with --backend onnxruntime (or drop --backend)")
    if args.backend == "torch" and not (args.checkpoint or args.random_weights):
        raise ConfigError("one of --checkpoint PATH, --random-weights or --model MODEL.onnx is required")
    if args.model and args.preset:
        raise ConfigError("--preset does not apply to --model (the ONNX file records its preset)")
    if args.random_weights and not args.preset:
        raise ConfigError("--random-weights needs --preset NAME (e.g. --preset tiny)")
    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    for flag, value in (("--size", args.size), ("--max-size", args.max_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.size and args.max_size and args.max_size < args.size:
        raise ConfigError(f"need --size <= --max-size, got --size {args.size} --max-size {args.max_size}")
    if args.backend == "onnxruntime" and args.mode != "exact":
        raise ConfigError("--mode applies to the PyTorch backend; an ONNX model runs as it was exported")


def _check_out_folder(out_dir: Path) -> None:
    """Before the slow work: ``--out`` must be (or become) a folder we can write in."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out '{out_dir}' is a file; it must be a folder (created if needed)")
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out '{out_dir}': '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out '{out_dir}': no permission to write in '{existing}'")


@dataclasses.dataclass(frozen=True)
class _Output:
    """Where one input image's results go: its annotated picture (a file name in ``--out``) and the
    ``file_name`` of its records in predictions.json."""

    picture: str
    file_name: str


def _output_names(paths: Sequence[Path], out_dir: Path) -> dict[Path, _Output]:
    """Picture ``<stem>.jpg`` and file_name ``<name>`` per input, as long as those are unique.  Inputs
    whose stem is shared (``cam1/0001.jpg`` and ``cam2/0001.jpg``, or ``a.jpg`` and ``a.png``) get
    ``<folder>_<stem>[_<ext>].jpg`` (a number added if still not unique) and their path as given as
    file_name, so that no result overwrites another.  No picture may overwrite an input image
    (e.g. ``--out`` pointing at the image folder)."""
    stems = Counter(p.stem for p in paths)
    names = Counter(p.name for p in paths)
    outputs: dict[Path, _Output] = {}
    taken: set[str] = {f"{p.stem}.jpg" for p in paths if stems[p.stem] == 1}
    for p in paths:
        picture = f"{p.stem}.jpg"
        if stems[p.stem] > 1:
            ext = p.suffix.lower().lstrip(".")
            base = "_".join(x for x in (p.parent.name, p.stem, ext if ext != "jpg" else "") if x)
            picture, n = f"{base}.jpg", 2
            while picture in taken:
                picture, n = f"{base}_{n}.jpg", n + 1
            taken.add(picture)
        if (out_dir / picture).resolve() == p.resolve():
            raise ConfigError(f"--out '{out_dir}' would overwrite the input image '{p}'; choose another folder")
        outputs[p] = _Output(picture, p.name if names[p.name] == 1 else str(p))
    return outputs


def _build_detector(args: argparse.Namespace) -> Detector | OnnxDetector:
    # deferred like every torch import here: torch + torchvision take seconds, `--help` should not
    from .inference.detector import Detector

    if args.backend == "onnxruntime":
        from .inference.onnx_runtime import OnnxDetector

        return OnnxDetector(args.model, device=args.device, size=args.size, max_size=args.max_size)
    if args.random_weights:
        detector = Detector.from_random(args.preset, device=args.device, size=args.size, max_size=args.max_size,
                                        mode=args.mode)
        _warn(f"using RANDOM weights for preset '{args.preset}': the detections are meaningless")
    else:
        detector = Detector.from_checkpoint(args.checkpoint, preset=args.preset, device=args.device, size=args.size,
                                            max_size=args.max_size, mode=args.mode)
    _note_compile(args.mode)
    return detector


def _predict_files(
    detector: Detector | OnnxDetector,
    outputs: dict[Path, _Output],
    out_dir: Path,
    threshold: float,
    batch_size: int,
    skip_unreadable: bool,
) -> tuple[list[dict[str, Any]], int]:
    """Run the detector over the inputs of ``outputs`` (in order); write annotated images.  Returns
    (records, images done)."""
    from tqdm import tqdm

    from .boxes import box_xyxy_to_xywh
    from .visualize import draw_detections

    paths = list(outputs)
    records: list[dict[str, Any]] = []
    done = 0
    with tqdm(total=len(paths), unit="img", disable=len(paths) < PROGRESS_MIN_IMAGES, file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = _load_images(paths[start : start + batch_size], skip_unreadable)
            for (path, image), pred in _predict_chunk(detector, chunk, threshold, skip_unreadable):
                picture = out_dir / outputs[path].picture
                try:
                    save_image_atomic(draw_detections(image, pred.boxes, pred.class_names, pred.scores), picture,
                                      quality=90)
                except OSError as e:
                    if not skip_unreadable:
                        raise
                    _warn(f"cannot write '{picture}': {e.strerror or e}; skipped")
                    continue
                records.extend(_records(outputs[path].file_name, pred.category_ids.tolist(),
                                        box_xyxy_to_xywh(pred.boxes).tolist(), pred.scores.tolist()))
                done += 1
            bar.update(min(batch_size, len(paths) - start))
    return records, done


def _predict_chunk(detector: Detector | OnnxDetector, chunk: list[tuple[Path, Image.Image]], threshold: float,
                   skip_failures: bool) -> list[tuple[tuple[Path, Image.Image], Any]]:
    """((path, image), prediction) for a batch of loaded images.  When the batch fails (e.g. out of
    memory on one huge image) each image is retried alone, and one that still fails is reported and
    skipped (with ``skip_failures``; else the error propagates)."""
    if not chunk:
        return []
    try:
        return list(zip(chunk, detector.predict([im for _, im in chunk], threshold=threshold, batch_size=len(chunk))))
    except Exception as e:
        if not skip_failures:
            raise
        if len(chunk) > 1:
            return [r for item in chunk for r in _predict_chunk(detector, [item], threshold, skip_failures)]
        _warn(f"cannot predict '{chunk[0][0]}': {first_line(e)}; skipped")
        return []


def _load_images(paths: Sequence[Path], skip_unreadable: bool) -> list[tuple[Path, Image.Image]]:
    """Load ``paths``; with ``skip_unreadable`` report unreadable ones (one line each) and leave
    them out, otherwise let ImageLoadError propagate."""
    loaded = []
    for path in paths:
        try:
            loaded.append((path, load_image(path)))
        except ImageLoadError as e:
            if not skip_unreadable:
                raise
            _warn(f"{e}; skipped")
    return loaded


def _records(
    file_name: str, category_ids: list[int], bboxes: list[list[float]], scores: list[float]
) -> list[dict[str, Any]]:
    """COCO-results-style records for one image; bbox is [x, y, w, h] in original pixels."""
    return [
        {"file_name": file_name, "category_id": int(c), "bbox": [round(v, 2) for v in b], "score": round(s, 5)}
        for c, b, s in zip(category_ids, bboxes, scores)
    ]


# ------------------------------------------------------------------------------------------- train


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train (or fine-tune) a detector on a COCO or YOLO dataset",
        description=(
            "Train DINO on --data (train split; evaluated on the val split if there is one, else on "
            "the training images).  RUN_DIR (--out) receives checkpoint.pt (resumable), "
            "checkpoint_best.pt, metrics.jsonl, tb/ (TensorBoard), curves.png, config.json and, at the "
            "end, metrics.json (final COCO evaluation, with AP per class), pr_curve.png, per_class_ap.png and "
            "val_predictions/ (val images with the detections drawn).  The number of classes comes from the dataset.  "
            "The same command runs distributed under `torchrun --nproc_per_node N -m dinodet train ...` (or --slurm)."
        ),
    )
    _add_data_args(p)
    p.add_argument("--preset", metavar="NAME",
                   help=f"model + schedule ({', '.join(list_presets())}); required unless --resume")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created if needed)")
    p.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    p.add_argument("--batch-size", type=int, help="images per process per step (train.batch_size)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), help="mixed precision (train.amp)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR/checkpoint.pt (same end state as an "
                   "uninterrupted run); the stored config is used, --set/--epochs/... still apply (changed schedule settings "
                   "are applied and named)")
    p.add_argument("--finetune-from", metavar="CKPT", help="start from an official or dinodet checkpoint (with "
                   "--resume: only while RUN_DIR has no checkpoint.pt yet, as a requeued job needs); "
                   "the class heads keep the rows of the dataset's classes it knows (by id and name, else name) and start "
                   "the others fresh")
    p.add_argument("--backbone-checkpoint", metavar="PATH", help="ImageNet weights for the backbone (original "
                   "ResNet/Swin/ConvNeXt release or timm layout; model.backbone.checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.lr=2e-4 or data.eval_size=512 (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK) (default cpu)")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps in total (smoke tests)")
    _add_picture_args(p, "val_predictions/")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    s = p.add_argument_group("SLURM (needs the submitit package)")
    s.add_argument("--slurm", action="store_true", help="submit this command as a SLURM job instead of running it")
    s.add_argument("--slurm-nodes", type=int, default=1, metavar="N")
    s.add_argument("--slurm-gpus-per-node", type=int, default=1, metavar="N", help="also processes per node")
    s.add_argument("--slurm-cpus-per-task", type=int, default=8, metavar="N")
    s.add_argument("--slurm-time", type=int, default=24 * 60, metavar="MIN", help="time limit in minutes")
    s.add_argument("--slurm-partition", metavar="NAME")
    p.set_defaults(func=_run_train)


def _add_picture_args(p: argparse.ArgumentParser, folder: str) -> None:
    p.add_argument("--pictures", type=int, default=8, metavar="N",
                   help=f"images drawn with their detections (and ground truth) into {folder} (default 8; 0: none)")
    p.add_argument("--picture-threshold", type=float, default=0.3, metavar="SCORE",
                   help="score above which a detection is drawn (default 0.3)")


def _check_picture_args(args: argparse.Namespace) -> None:
    if args.pictures < 0:
        raise ConfigError(f"--pictures must be >= 0, got {args.pictures}")
    if not 0.0 <= args.picture_threshold <= 1.0:
        raise ConfigError(f"--picture-threshold must be in [0, 1], got {args.picture_threshold}")


def _check_data_arg(args: argparse.Namespace) -> None:
    from .data.coco import check_data_root

    check_data_root(args.data)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder (COCO or YOLO layout)")
    p.add_argument("--format", choices=("coco", "yolo"), default="coco", help="dataset layout (default coco)")


def _run_train(args: argparse.Namespace) -> int:
    from .data.splits import DataSpec, build_train_datasets
    from .engine.distributed import dist_info_from_env
    from .engine.run_dir import CHECKPOINT, check_run_dir
    from .engine.train import TrainOptions, train

    _check_train_args(args)
    _check_data_arg(args)
    run_dir = Path(args.out)
    if args.slurm:
        return _submit_slurm(args, run_dir)
    cfg, label_map = _train_config(args, run_dir / CHECKPOINT)
    check_run_dir(run_dir, args.resume)  # before the (possibly slow) dataset indexing
    info = dist_info_from_env()
    train_set, val_set = build_train_datasets(DataSpec(args.data, args.format), cfg, label_map)
    if info.is_main:
        print(f"dinodet: training '{cfg.name}' on {len(train_set)} images, {train_set.label_map.num_classes} "
              f"classes; evaluating on {len(val_set)} images -> {run_dir}", file=sys.stderr)
    opts = TrainOptions(run_dir=run_dir, device=_checked_device(args.device), resume=args.resume,
                        finetune_from=args.finetune_from, max_steps=args.max_steps,
                        progress=not args.no_progress, pictures=args.pictures,
                        picture_threshold=args.picture_threshold)
    metrics = train(cfg, train_set, val_set, opts)
    if info.is_main:
        _print_metrics(metrics)
        print(f"dinodet: final metrics -> {run_dir / 'metrics.json'}{_pictures_in(run_dir)}")
    return 0


def _pictures_in(run_dir: Path) -> str:
    """", pictures: curves.png, ..." for the pictures a run wrote (some need detections or GT)."""
    from .engine.pictures import PER_CLASS_AP, PR_CURVE, PREDICTIONS_DIR
    from .engine.run_dir import CURVES

    found = [n for n in (CURVES, PR_CURVE, PER_CLASS_AP) if (run_dir / n).is_file()]
    if (run_dir / PREDICTIONS_DIR).is_dir():
        found.append(f"{PREDICTIONS_DIR}/")
    return f"; pictures: {', '.join(found)}" if found else ""


def _check_train_args(args: argparse.Namespace) -> None:
    from .engine.run_dir import CHECKPOINT

    _check_picture_args(args)
    _check_out_folder(Path(args.out))
    for name in ("epochs", "batch_size", "max_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.resume and not args.preset:
        raise ConfigError("--preset NAME is required for a new run (e.g. --preset tiny)")
    if args.resume and not args.preset and not (Path(args.out) / CHECKPOINT).is_file():
        raise ConfigError(f"--resume: nothing to resume, no {Path(args.out) / CHECKPOINT} (add --preset NAME to "
                          "start a new run there)")


def _train_config(args: argparse.Namespace, checkpoint: Path) -> tuple[Any, Any]:
    """(config, label map or None): a resumed run's stored config (and classes), else the preset;
    then --set and the explicit flags."""
    from .config import DINOConfig, apply_overrides
    from .presets import get_preset

    label_map = None
    if args.resume and checkpoint.is_file():
        from .checkpoint import CheckpointError, read_train_state
        from .data.labels import LabelMap

        state = read_train_state(checkpoint)
        try:
            cfg = DINOConfig.from_json(state["config"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{checkpoint}: invalid stored config ({e})") from None
        if args.preset and args.preset != cfg.name:
            raise ConfigError(f"{checkpoint} was trained with preset '{cfg.name}', not '{args.preset}'")
        label_map = LabelMap(state["class_names"], state["category_ids"])
    else:
        cfg = get_preset(args.preset)
    flags = [f"train.epochs={args.epochs}" if args.epochs else None,
             f"train.batch_size={args.batch_size}" if args.batch_size else None,
             f'train.amp="{args.amp}"' if args.amp else None,
             f"model.backbone.checkpoint={json.dumps(args.backbone_checkpoint)}" if args.backbone_checkpoint else None]
    from .engine.train import check_train_config

    cfg = apply_overrides(cfg, list(args.overrides) + [f for f in flags if f])
    check_train_config(cfg.train)  # before the (possibly slow) dataset indexing
    return cfg, label_map


def _checked_device(device: str) -> str:
    from .inference.detector import resolve_device

    return str(resolve_device(device))


def _submit_slurm(args: argparse.Namespace, run_dir: Path) -> int:
    from .engine.distributed import SlurmOptions, submit_slurm

    argv = _strip_slurm_args(sys.argv[1:] if args.argv is None else args.argv)
    opts = SlurmOptions(nodes=args.slurm_nodes, gpus_per_node=args.slurm_gpus_per_node,
                        cpus_per_task=args.slurm_cpus_per_task, timeout_min=args.slurm_time,
                        partition=args.slurm_partition)
    try:
        job_id = submit_slurm(argv, run_dir, opts)
    except ImportError:
        raise ConfigError("--slurm needs the 'submitit' package: pip install submitit") from None
    print(f"dinodet: submitted SLURM job {job_id} ({opts.nodes} node(s) x {opts.gpus_per_node} GPU(s)); "
          f"logs in {run_dir / opts.folder}")
    return 0


def _strip_slurm_args(argv: Sequence[str]) -> list[str]:
    """The command line without the --slurm* options (the job runs the rest as is)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--slurm" or (a.startswith("--slurm-") and "=" in a):
            continue
        if a.startswith("--slurm-"):
            skip = True
            continue
        out.append(a)
    return out


def _print_metrics(metrics: dict[str, Any]) -> None:
    from .engine.evaluate import format_metrics

    print(format_metrics(metrics))


# -------------------------------------------------------------------------------------------- eval


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="COCO-evaluate a checkpoint on a dataset split",
        description=(
            "Evaluate a dinodet or official DINO checkpoint on a split of --data with pycocotools: "
            "prints AP, AP50, AP75, APs/m/l and AP per class; with --out also writes metrics.json (fractions), "
            "predictions.json (COCO results), pr_curve.png, per_class_ap.png and SPLIT_predictions/ (images "
            "with the detections drawn).  Images that cannot be read are reported and left out.  Images are resized as the checkpoint's config says "
            "(data.eval_size / data.max_size; change with --set).  EMA weights are used when the "
            "checkpoint has them.  Runs distributed under torchrun."
        ),
    )
    _add_data_args(p)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="dinodet or official DINO checkpoint")
    p.add_argument("--preset", metavar="NAME", help="architecture of an official checkpoint without stored args")
    p.add_argument("--split", help="split to evaluate (default: val, or train with a warning when there is no val)")
    p.add_argument("--batch-size", type=int, default=1, help="images per loader batch (AP does not depend on it)")
    p.add_argument("--out", metavar="DIR", help="write metrics.json, predictions.json and pictures here")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--mode", default="exact",
                   help="inference mode: exact (default, float32), reference, channels_last, bf16, fp16 (CUDA), "
                   "compile, compile_bf16 (CUDA); see `dinodet predict --help`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. data.eval_size=512 (repeatable)")
    _add_picture_args(p, "DIR/SPLIT_predictions/ (with --out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .config import apply_overrides
    from .data.coco import build_dataset
    from .data.splits import DataSpec, eval_split
    from .engine.distributed import cleanup_distributed, init_distributed
    from .engine.evaluate import category_mapping, evaluate
    from .inference.detector import default_label_map
    from .inference.modes import ModeRunner

    device = _check_eval_args(args)
    # a training checkpoint.pt holds EMA weights beside the raw ones: evaluate those, as training did
    ckpt = load_checkpoint(args.checkpoint, preset=args.preset, ema=True)
    cfg = apply_overrides(ckpt.config, args.overrides)
    # the model is the checkpoint's: of its settings only the top-k size applies at evaluation
    ignored = [o.split("=")[0].strip() for o in args.overrides
               if o.strip().startswith("model.") and o.split("=")[0].strip() != "model.num_select"]
    if ignored:
        _warn(f"{', '.join(ignored)}: the checkpoint's model is evaluated as built; ignored")
    model = ckpt.model
    split = args.split or eval_split(DataSpec(args.data, args.format))
    dataset = build_dataset(args.data, split, args.format, train=False, data_cfg=cfg.data)
    names, ids = default_label_map(cfg.model.num_classes, ckpt.class_names, ckpt.category_ids)
    lm = dataset.label_map
    try:
        mapping, how = category_mapping(names, ids, lm.class_names, lm.category_ids)
    except ValueError as e:
        raise ConfigError(f"{args.checkpoint} on {args.data}: {e}") from None
    if how == "name":
        _warn("the checkpoint's category ids differ from the dataset's; classes matched by name "
              f"({sum(m is not None for m in mapping)} of {len(mapping)} matched)")
    info, dev = init_distributed(device)
    try:
        runner = ModeRunner(model, args.mode, dev, copy_model=False)
        if info.is_main:
            _note_compile(args.mode)
        result = evaluate(runner, dataset, mapping, device=dev, batch_size=args.batch_size,
                          num_select=cfg.model.num_select, dist_info=info,
                          num_workers=cfg.data.num_workers, progress=not args.no_progress)
    finally:
        cleanup_distributed()
    if info.is_main:
        _report_eval(args, result, dataset, split, ckpt.ema_weights)
    return 0


def _check_eval_args(args: argparse.Namespace) -> str:
    """The eval flags that can be checked before any loading; returns the device to use."""
    from .inference.modes import check_mode

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_picture_args(args)
    _check_data_arg(args)
    device = _checked_device(args.device)
    check_mode(args.mode, device)
    if args.out:
        _check_out_folder(Path(args.out))
        if (Path(args.out) / "checkpoint.pt").is_file():  # its metrics.json and plots are the run's results
            raise ConfigError(f"--out '{args.out}' holds a training run; its results would be replaced "
                              "(choose another --out)")
    return device


def _report_eval(args: argparse.Namespace, result: Any, dataset: Any, split: str, ema_weights: bool) -> None:
    """Print an evaluation's scores; with --out write metrics.json, predictions.json and pictures."""
    from .data.report import DatasetError
    from .engine.evaluate import format_per_class
    from .engine.pictures import write_eval_pictures

    metrics = {**result.metrics, "split": split, "checkpoint": str(args.checkpoint), "ema_weights": ema_weights,
               "mode": args.mode}
    if result.unreadable_ids:
        index = {iid: i for i, iid in enumerate(dataset.image_ids)}
        names = [dataset.image_path(index[i]).name for i in result.unreadable_ids[:5]]
        listed = ", ".join(names) + (" ..." if len(result.unreadable_ids) > 5 else "")
        if len(result.unreadable_ids) == len(dataset):
            raise DatasetError(f"no image of '{split}' in '{args.data}' could be read ({listed})")
        _warn(f"{len(result.unreadable_ids)} of {len(dataset)} images could not be read and are left out of "
              f"the scores: {listed}")
    print(f"dinodet: {len(dataset) - len(result.unreadable_ids)} images of '{split}', {len(result.records)} "
          "detections" + (" (EMA weights)" if ema_weights else ""))
    _print_metrics(metrics)
    if result.per_class:
        print("AP per class:\n" + format_per_class(result.per_class))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "metrics.json", {**metrics, "per_class": result.per_class})
        write_json_atomic(out / "predictions.json", result.records)
        written = write_eval_pictures(result, dataset, out, pictures=args.pictures,
                                      threshold=args.picture_threshold, folder=f"{split}_predictions")
        print(f"dinodet: metrics -> {out / 'metrics.json'}, detections -> {out / 'predictions.json'}"
              + "".join(f", {p.name}" for p in written))


# -------------------------------------------------------------------------------------- check-data


def _add_check_data(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check-data",
        help="scan a dataset for problems before training",
        description="Check every annotation and image header of the train and val splits (or --split) and "
                    "print what training would skip or fix.  With --out, also draw each split's boxes on its "
                    "first images (DIR/SPLIT_labels/*.jpg) and chart its boxes per class (DIR/SPLIT_classes.png).  "
                    "Exit status 1 when a split has no usable image.",
    )
    _add_data_args(p)
    p.add_argument("--split", action="append", help="split(s) to check (default: train and val when present)")
    p.add_argument("--decode", action="store_true", help="also decode every image (slower; finds truncated files)")
    p.add_argument("--out", metavar="DIR", help="write pictures of the labels here")
    p.add_argument("--pictures", type=int, default=16, metavar="N",
                   help="images per split drawn with their boxes (with --out; default 16)")
    p.set_defaults(func=_run_check_data)


def _run_check_data(args: argparse.Namespace) -> int:
    from .data.checks import check_dataset, format_report
    from .data.splits import DataSpec, split_exists

    if args.pictures < 0:
        raise ConfigError(f"--pictures must be >= 0, got {args.pictures}")
    if args.out:
        _check_out_folder(Path(args.out))
    _check_data_arg(args)
    spec = DataSpec(args.data, args.format)
    splits = args.split or [s for s in ("train", "val") if s == "train" or split_exists(spec, s)]
    status = 0
    for split in splits:
        report = check_dataset(args.data, args.format, split, decode=args.decode)
        print(f"[{split}]")
        print(format_report(report))
        if report.usable_images <= 0:
            status = 1
        elif args.out:
            print(_label_pictures(args, split))
    return status


def _label_pictures(args: argparse.Namespace, split: str) -> str:
    from .data.coco import build_dataset
    from .engine.pictures import write_class_counts, write_label_pictures

    out = Path(args.out)
    log = logging.getLogger("dinodet")
    level = log.level
    log.setLevel(logging.ERROR)  # the report above already lists the data's problems
    try:
        dataset = build_dataset(args.data, split, args.format, train=False)
        n = write_label_pictures(dataset, out / f"{split}_labels", args.pictures)
    finally:
        log.setLevel(level)
    chart = write_class_counts(dataset, out / f"{split}_classes.png", f"{split}: boxes per class")
    return f"pictures: {n} images with their boxes -> {out / f'{split}_labels'}; boxes per class -> {chart}"


# -------------------------------------------------------------------------------------------- demo


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="generate a synthetic shapes dataset, train the tiny preset on it (CPU) and evaluate",
        description=(
            "End-to-end demo: writes a synthetic COCO dataset to RUN_DIR/data, trains the 'tiny' preset, "
            "evaluates on its val split and writes RUN_DIR/val_predictions/*.jpg, curves.png, "
            "metrics.jsonl and metrics.json (AP, AP50, ...).  Defaults live in dinodet.engine.demo; "
            "change them with --set (train.epochs=3, data.eval_size=96, demo.num_train=100, ...)."
        ),
    )
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created if needed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (demo.* keys for the dataset) (repeatable)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .data.coco import build_dataset
    from .engine.demo import demo_config, make_demo_data
    from .engine.run_dir import check_run_dir
    from .engine.train import Trainer, TrainOptions

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("the demo runs in one process; under torchrun use `dinodet train` on its data")
    settings, cfg = demo_config(args.overrides)
    run_dir = Path(args.out)
    _check_out_folder(run_dir)
    resuming = check_run_dir(run_dir, args.resume)
    device = _checked_device(args.device)
    print(f"dinodet: synthetic dataset of {settings.num_train} + {settings.num_val} images in {run_dir / 'data'} "
          "(generated unless already there)",
          file=sys.stderr)
    data = make_demo_data(run_dir, settings, resuming)
    train_set = build_dataset(data, "train", train=True, data_cfg=cfg.data)
    val_set = build_dataset(data, "val", train=False, data_cfg=cfg.data, label_map=train_set.label_map)
    opts = TrainOptions(run_dir=run_dir, device=device, resume=args.resume, progress=not args.no_progress,
                        pictures=settings.max_pictures, picture_threshold=settings.picture_threshold)
    metrics = Trainer(cfg, train_set, val_set, opts).fit()
    _print_metrics(metrics)
    print(f"dinodet: metrics -> {run_dir / 'metrics.json'}{_pictures_in(run_dir)}")
    return 0


# ------------------------------------------------------------------------------------------- bench


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time inference / training of every speed mode against the reference path",
        description=(
            "Times the reference path (float32, PyTorch MSDA) and every fast mode in the same process on random "
            "weights and images, prints mode, ms/img (ms/step for training), img/s, peak memory and the "
            "speed-up over the reference, and writes the same records with --json."
        ),
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--preset", default="dino_r50_4scale", help="model preset (default dino_r50_4scale)")
    p.add_argument("--size", default="800x1199", help="image size HEIGHTxWIDTH (default 800x1199)")
    p.add_argument("--batch", type=int, default=1, help="inference batch size (training uses at least 2)")
    p.add_argument("--task", choices=("infer", "train", "both"), default="infer", help="what to time (default infer)")
    p.add_argument("--modes", default=None,
                   help="comma-separated modes (default: all for the device; the reference always runs first)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per mode (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per mode")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the records as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the records as a bar chart")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from .deploy.bench import TRAIN_MODES, format_table, parse_size, records_json, run_bench
    from .inference.modes import MODES, supported_modes
    from .presets import get_preset

    device = _checked_device(args.device)
    try:
        size = parse_size(args.size)
        get_preset(args.preset)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        raise ConfigError("--batch and --iters must be >= 1 and --warmup >= 0")
    modes = None
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise ConfigError(f"unknown mode(s) {', '.join(unknown)} (available: {', '.join(MODES)})")
        offered = {"infer": supported_modes(device), "train": list(TRAIN_MODES)}
        tasks = ["infer", "train"] if args.task == "both" else [args.task]
        for m in modes:
            fits = [t for t in tasks if m in offered[t]]
            if not fits:
                raise ConfigError(f"mode '{m}' cannot be benchmarked for {args.task} on {device} "
                                  f"(available: {', '.join(dict.fromkeys(x for t in tasks for x in offered[t]))})")
            if len(fits) < len(tasks):
                _warn(f"mode '{m}' is benchmarked for {fits[0]} only")
    for flag, out in (("--json", args.json_out), ("--plot", args.plot)):  # a bad path must not cost the whole run
        if out and Path(out).is_dir():
            raise ConfigError(f"{flag} '{out}' is a folder; give a file name")
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
    print(f"dinodet: benchmarking {args.preset} at {size[0]}x{size[1]} on {device} "
          f"({args.warmup} warm-up + {args.iters} timed iterations per mode)", file=sys.stderr)
    records = run_bench(args.preset, device, size, args.batch, args.task, modes, warmup=args.warmup, iters=args.iters)
    print(format_table(records))
    if args.json_out:
        out = Path(args.json_out)
        write_json_atomic(out, records_json(records))
        print(f"dinodet: records -> {out}", file=sys.stderr)
    if args.plot:
        from .engine.plots import plot_speed

        title = f"{args.preset} {size[0]}x{size[1]} {device}"
        print(f"dinodet: chart -> {plot_speed(records_json(records), Path(args.plot), title)}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ export


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to ONNX (for onnxruntime, TensorRT, ...)",
        description=(
            "Export the eval-mode model of a dinodet or official DINO checkpoint to ONNX.  Inputs: "
            "'images' float32 [B, 3, H, W] (resized, ImageNet-normalised, zero-padded) and 'mask' bool "
            "[B, H, W] (True on padding); outputs 'logits' [B, Q, C] and 'boxes' [B, Q, 4] (cxcywh 0..1), "
            "or with --with-postprocess (extra input 'orig_sizes' int64 [B, 2] = (h, w)) the top-k "
            "'scores', 'labels', 'boxes' (xyxy pixels).  The file's metadata records the preset, class "
            "names and this input contract; run it with `dinodet predict --model FILE`."
        ),
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="dinodet or official DINO checkpoint")
    p.add_argument("--preset", metavar="NAME", help="architecture of an official checkpoint without stored args")
    p.add_argument("--format", default="onnx", choices=("onnx",), help="export format (default onnx)")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="output file")
    p.add_argument("--opset", type=int, default=None, metavar="N",
                   help="ONNX opset, 17..25 (default 18)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width (else fixed, "
                   "see --batch-size/--input-size)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and arithmetic (float32 inputs/outputs; "
                   "for GPU execution providers)")
    p.add_argument("--with-postprocess", action="store_true",
                   help="end the graph with the top-k post-processing (scores, labels, boxes in pixels)")
    p.add_argument("--msda", default="grid_sample", choices=("grid_sample", "gather"),
                   help="deformable-attention sampling: ONNX GridSample, or gather-based bilinear index "
                   "arithmetic (use it for TensorRT, which mis-builds GridSample for DETR models) (default grid_sample)")
    p.add_argument("--batch-size", type=int, metavar="N", help="fixed batch size without --dynamic (default 1)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="fixed padded input size without --dynamic (default MAX_SIZE MAX_SIZE)")
    p.add_argument("--size", type=int, help="short side the model expects (default: the checkpoint's "
                   "evaluation size, 800 for the official models)")
    p.add_argument("--max-size", type=int, help="cap on the long side (default: the checkpoint's, 1333 officially)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .deploy.export import DEFAULT_OPSET, check_opset, to_onnx

    opset = check_opset(DEFAULT_OPSET if args.opset is None else args.opset)  # before the slow loading
    from .checkpoint import check_checkpoint_path

    check_checkpoint_path(Path(args.checkpoint))
    print(f"dinodet: exporting {args.checkpoint} to ONNX (opset {opset}, "
          f"{'dynamic' if args.dynamic else 'fixed'} shapes, msda {args.msda}{', float16' if args.fp16 else ''}); "
          "this takes a few minutes",
          file=sys.stderr)
    result = to_onnx(args.checkpoint, args.out, preset=args.preset, opset=opset, dynamic=args.dynamic,
                     fp16=args.fp16, with_postprocess=args.with_postprocess, msda=args.msda,
                     batch_size=args.batch_size, input_size=args.input_size, size=args.size, max_size=args.max_size)
    contract = json.loads(result.metadata["input_contract"])
    shapes = ", ".join(f"{k} {v['shape']}" for k, v in contract["inputs"].items())
    print(f"dinodet: wrote {result.path} (preset {result.metadata['preset']}; inputs {shapes}; "
          f"outputs {', '.join(result.outputs)}); checked with onnx.checker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
