"""The ``dinodet`` command line: a thin face over the library's workflows.

Each subcommand is an ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func`` to a ``_run_<name>(args) -> int`` that checks them, calls one library workflow and prints
its result; library imports are deferred into it (torch takes seconds, ``dinodet --help`` must not).
The library logs; while a command runs its records are printed on stderr (``printed_logs``).
User mistakes (a ``DinodetError``: missing checkpoint, unknown preset, unreadable image, ...) are
ONE line ``dinodet: error: ...`` on stderr with exit status 2 and no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, DinodetError, first_line
from .files import check_out_folder
from .presets import list_presets

EXIT_USAGE = 2  # argparse's status for bad usage; we use it for every user-facing error


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
    _add_convert(subparsers)
    _add_demo(subparsers)
    _add_bench(subparsers)
    _add_export(subparsers)
    _add_serve(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dinodet`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)  # what --slurm resubmits
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    with printed_logs():
        return _run(args)


@contextlib.contextmanager
def printed_logs() -> Iterator[None]:
    """While a command runs, the package's log records (INFO and above) are printed on stderr as
    ``dinodet:`` lines, by rank 0 only (the other ranks print errors only), and not also passed to
    the application's own (root) logging handlers: each message is said once.  The logger is left
    as it was found afterwards."""
    log = logging.getLogger("dinodet")
    saved = log.level, log.propagate
    handler = _LogLines()
    log.addHandler(handler)
    log.propagate = False
    # data problems are reported once per job, by rank 0
    log.setLevel(logging.INFO if _is_main_process() else logging.ERROR)
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
    except DinodetError as e:
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


class _LogLines(logging.Handler):
    """The package's log records as ``dinodet:`` lines, like the CLI's own: warnings (e.g. an
    unreadable image, skipped) as ``dinodet: warning: ...``, status notes (INFO: "resuming from ...")
    as ``dinodet: ...``; written through tqdm so that a progress bar stays intact.  A multi-line
    message (a dataset's problem counts and first files) keeps all its lines, each prefixed, so that
    none is lost and each can be grepped."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        level = record.levelno
        prefix = "dinodet: " + ("error: " if level >= logging.ERROR else "warning: " if level >= logging.WARNING else "")
        lines = record.getMessage().rstrip().splitlines() or [""]
        tqdm.write(_printable("\n".join(prefix + line for line in lines), sys.stderr), file=sys.stderr)


def _is_main_process() -> bool:
    """Rank 0 of a torchrun / SLURM job, or a plain process: the one that prints warnings."""
    return int(os.environ.get("RANK", "0")) == 0


def _peer_failure(e: RuntimeError) -> bool:
    import torch.distributed as dist

    return (dist.is_available() and isinstance(e, dist.DistBackendError)) or any(
        s in str(e) for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _error(message: str) -> None:
    # First line only: the contract is one line per error, whatever an exception carries.
    _say(f"dinodet: error: {first_line(message)}", sys.stderr)


def _printable(text: str, stream: Any) -> str:
    """``text`` as ``stream`` can encode it: a file name's undecodable bytes (kept by Python as
    surrogate escapes, e.g. b'\\xff.jpg') shown as ``\\xff``, any other character the stream's
    encoding lacks escaped, so that a strict UTF-8 (or ASCII) stdout never fails on a name."""
    try:  # the bytes the name had on disk, shown escaped where they are not UTF-8
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte: escaped below
        pass
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


def _say(text: str, stream: Any = None) -> None:
    """``print`` for every line the CLI writes that can hold a file name (see ``_printable``)."""
    stream = sys.stdout if stream is None else stream
    print(_printable(text, stream), file=stream)


def _pictures(run_dir: str) -> str:
    from .engine.run_config import run_pictures

    found = run_pictures(run_dir)  # some need detections or ground truth
    return f"; pictures: {', '.join(found)}" if found else ""


def _print_metrics(metrics: dict[str, Any]) -> None:
    from .engine.evaluate import format_metrics

    print(format_metrics(metrics))


# ---------------------------------------------------------------------------------------- predict


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="detect objects in images; writes annotated images and predictions.json",
        description=(
            "Detect objects in images (files or folders of images) and write, into --out, one "
            "annotated JPEG per image (same stem) and predictions.json: a list of "
            '{"image_id", "file_name", "category_id", "class_name", "bbox": [x, y, w, h], "score"} records in '
            "pixels of the original image, which COCO.loadRes reads (image ids from --image-info, else 1..N).  Images sharing a stem (cam1/0001.jpg, cam2/0001.jpg) are written as "
            "FOLDER_STEM.jpg and named by their path.  Images that cannot be read are reported and "
            "skipped; the exit status is 0 when at least one image was processed.  A video (mp4, mkv, avi, "
            "mov, webm), webcam index (0) or stream URL (rtsp://, http(s)://) gives OUT/NAME.mp4 (detections "
            "drawn) and OUT/NAME.jsonl (one line per processed frame); needs pip install 'dinodet[video]'."
        ),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files and/or folders of images, video files, a webcam index or stream URLs")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH", help="dinodet or official DINO checkpoint (.pth/.pt)")
    src.add_argument(
        "--random-weights",
        action="store_true",
        help="use a randomly initialised --preset model instead of a checkpoint: for smoke-testing "
        "the pipeline only, the boxes are MEANINGLESS",
    )
    src.add_argument("--model", metavar="MODEL.onnx|MODEL.xml",
                     help="a model from `dinodet export`: ONNX (onnxruntime or openvino) or an OpenVINO IR .xml")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"),
                   help="run the PyTorch model (--checkpoint/--random-weights) or an exported model (--model) with "
                   "onnxruntime or OpenVINO (CPU); same predictions.json (default: openvino for a .xml, onnxruntime "
                   "for a .onnx, else torch)")
    p.add_argument(
        "--preset",
        metavar="NAME",
        help=f"model architecture ({', '.join(list_presets())}); with --checkpoint it is checked "
        "against the weights (default: taken from the checkpoint)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    _add_overwrite_arg(p)
    p.add_argument("--threshold", type=float, default=0.3, help="minimum score to keep (default 0.3)")
    p.add_argument("--device", default="auto", help="torch device, e.g. cpu, cuda, cuda:1 (default auto: cuda when "
                   "available, else cpu)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--size", type=int, help="short side after resizing (default: the checkpoint's data.eval_size, "
                   "800 for official checkpoints)")
    p.add_argument("--max-size", type=int, help="cap on the long side (default: the checkpoint's data.max_size, 1333)")
    p.add_argument("--mode", default="exact",
                   help="inference mode: exact (default, float32), reference (official grid_sample numerics), "
                   "channels_last, bf16, fp16 (CUDA), compile, compile_bf16 (CUDA); the fast ones trade a little "
                   "precision for speed (`dinodet bench` times them)")
    p.add_argument("--no-save-images", action="store_true",
                   help="write no annotated images or videos, only the detections (predictions.json, NAME.jsonl)")
    p.add_argument("--vid-stride", type=int, default=1, metavar="N", help="videos: every Nth frame (default 1)")
    p.add_argument("--max-frames", type=int, metavar="N", help="videos: stop after N processed frames per source")
    p.add_argument("--image-info", metavar="FILE.json",
                   help="COCO annotation or image-info file (e.g. instances_val2017.json): predictions.json takes its "
                   "image ids, matched by file name, so COCOeval scores it (default: ids 1..N in input order)")
    p.add_argument("--classes", metavar="LIST", type=_class_list,
                   help="keep only these classes: comma-separated category ids and/or class names, e.g. 1,3 or person,car")
    p.add_argument("--max-det", type=int, metavar="N", help="keep at most N detections per image or frame (highest scores)")
    p.add_argument("--agnostic-nms", type=float, metavar="IOU",
                   help="class-agnostic NMS: of two boxes overlapping more than IOU, whatever their classes, keep the "
                   "higher score (default: none, as the official model)")
    p.add_argument("--one-label-per-query", action="store_true",
                   help="keep only each query's best class (default: the official top-k over all query-class pairs, "
                   "where one query may give several classes)")
    p.add_argument("--track", action="store_true",
                   help="videos: persistent object ids (ByteTrack): track_id in NAME.jsonl, #id on the boxes")
    p.add_argument("--save-txt", action="store_true",
                   help="also write YOLO label files OUT/labels/STEM.txt (video frames STEM_FRAME.txt): "
                   "class cx cy w h score, normalised")
    p.add_argument("--save-csv", action="store_true",
                   help="also write OUT/predictions.csv: one row per detection of every image and frame")
    p.add_argument("--tile", type=int, metavar="SIZE",
                   help="small objects: predict images larger than SIZE pixels in overlapping SIZE x SIZE tiles "
                   "(plus the whole image), merged with NMS")
    p.add_argument("--tile-overlap", type=float, default=0.2, metavar="F",
                   help="with --tile: the fraction of a tile shared with its neighbour (default 0.2)")
    p.set_defaults(func=_run_predict)


def _class_list(text: str) -> list[int | str]:
    """``--classes 1,car``: numbers are category ids, other words class names."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [int(t) if t.lstrip("-").isdigit() else t for t in items]


def _run_predict(args: argparse.Namespace) -> int:
    from .inference.predict import DetectorOptions, predict_to_folder

    options = DetectorOptions(checkpoint=args.checkpoint, model=args.model, random_weights=args.random_weights,
                              preset=args.preset, device=args.device, size=args.size, max_size=args.max_size,
                              mode=args.mode, backend=args.backend, one_label_per_query=args.one_label_per_query)
    options.check()  # which model and backend, before the inputs are looked at
    _check_predict_args(args)
    summary = predict_to_folder(options, args.images, args.out, threshold=args.threshold, batch_size=args.batch_size,
                                overwrite=args.overwrite, save_images=not args.no_save_images,
                                vid_stride=args.vid_stride, max_frames=args.max_frames, image_info=args.image_info,
                                classes=args.classes, max_det=args.max_det, agnostic_nms=args.agnostic_nms,
                                track=args.track, save_txt=args.save_txt, save_csv=args.save_csv, tile=args.tile,
                                tile_overlap=args.tile_overlap)
    if summary.images:
        _say(
            f"dinodet: {len(summary.records)} detection(s) in {summary.done} image(s) -> {summary.predictions}"
            + (f" ({summary.skipped} image(s) skipped, see the warnings above)" if summary.skipped else "")
        )
    for video in summary.videos:
        _say(f"dinodet: {video.detections} detection(s) in {video.frames} frame(s) of '{video.source}' -> "
             f"{video.jsonl}" + (f", {video.video}" if video.video else ""))
    if summary.exports:
        _say("dinodet: also wrote " + ", ".join(str(p) for p in summary.exports))
    return 0


def _check_predict_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.vid_stride < 1 or (args.max_frames is not None and args.max_frames < 1):
        raise ConfigError("--vid-stride and --max-frames must be >= 1")


# ------------------------------------------------------------------------------------------ train


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train (or fine-tune) a detector on a COCO, YOLO, Roboflow, Pascal VOC or CVAT dataset",
        description=(
            "Train DINO on --data (train split; evaluated on the val split if there is one, else on "
            "the training images).  RUN_DIR (--out) receives checkpoint.pt (resumable), "
            "checkpoint_best.pt, metrics.jsonl, tb/ (TensorBoard), curves.png, config.json and, at the "
            "end, metrics.json (final COCO evaluation, with AP per class), pr_curve.png, per_class_ap.png, "
            "confusion_matrix.png and "
            "val_predictions/ (val images with the detections drawn).  The number of classes comes from the dataset.  "
            "The same command runs distributed under `torchrun --nproc_per_node N -m dinodet train ...` (or --slurm)."
        ),
    )
    _add_data_args(p, data_required=False)  # may come from --config
    p.add_argument("--config", metavar="RUN.yaml",
                   help="run file holding any of these options (data, preset, epochs, patience, ...; --set keys under "
                   "'set:'); options given here win.  Every run writes RUN_DIR/config.yaml: --config it repeats the run")
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
    p.add_argument("--device", default="auto", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK) (default auto: "
                   "cuda when available, else cpu)")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps in total (smoke tests)")
    p.add_argument("--patience", type=int, metavar="N", help="stop early after N evaluations without a better val AP "
                   "(checkpoint_best.pt keeps the best weights; --resume of such a run says it is finished)")
    p.add_argument("--log", action="append", choices=("mlflow", "wandb"), default=[], metavar="NAME",
                   help="also log to mlflow (RUN_DIR/mlruns, or --tracking-uri) or wandb (offline, RUN_DIR/wandb); "
                   "TensorBoard is always on (repeatable; needs pip install 'dinodet[mlflow]' / 'dinodet[wandb]')")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: a file store in RUN_DIR/mlruns)")
    _add_picture_args(p, "val_predictions/")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    s = p.add_argument_group("SLURM (needs the submitit package)")
    s.add_argument("--slurm", action="store_true", help="submit this command as a SLURM job instead of running it")
    s.add_argument("--slurm-nodes", type=int, default=1, metavar="N")
    s.add_argument("--slurm-gpus-per-node", type=int, default=1, metavar="N", help="also processes per node")
    s.add_argument("--slurm-cpus-per-task", type=int, default=8, metavar="N")
    s.add_argument("--slurm-time", type=int, default=24 * 60, metavar="MIN", help="time limit in minutes")
    s.add_argument("--slurm-partition", metavar="NAME")
    p.set_defaults(func=_run_train, train_parser=p)


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


def _add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in --out that dinodet did not write (without it, a run that would is "
                   "refused before it starts; files dinodet wrote there are always replaced)")


def _add_data_args(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    from .data.layouts import FORMATS  # no torch behind it: --help stays fast

    p.add_argument("--data", required=data_required, metavar="DIR",
                   help="dataset folder (COCO, YOLO, Roboflow COCO export, Pascal VOC or CVAT for images 1.1 layout)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="dataset layout (default auto: detected from the folder's files)")
    p.add_argument("--train-split", default="train", metavar="NAME", help="training split's name (default train)")
    p.add_argument("--val-split", default="val", metavar="NAME",
                   help="validation split's name (default val; found as valid/validation too)")


def _data_spec(args: argparse.Namespace) -> Any:
    from .data.splits import DataSpec

    return DataSpec(args.data, args.format, args.train_split, args.val_split)


def _given_train_options(args: argparse.Namespace) -> dict[str, Any]:
    """The train options the command line states itself (argparse's defaults left out)."""
    argv = list(sys.argv[1:] if args.argv is None else args.argv)
    unset = object()
    # argparse fills in a default only where the namespace lacks the name; repeatable options start empty
    blank = argparse.Namespace(**{k: [] if isinstance(v, list) else unset for k, v in vars(args).items()})
    parsed = args.train_parser.parse_args(argv[argv.index("train") + 1:], namespace=blank)
    return {k: v for k, v in vars(parsed).items() if v is not unset}


def _run_train(args: argparse.Namespace) -> int:
    from .engine.run_config import merge_run_file, run_training

    if args.config:  # the command line wins over the run file
        args = argparse.Namespace(**{**vars(args), **merge_run_file(args.config, _given_train_options(args))})
    _check_train_args(args)
    if args.slurm:
        return _submit_slurm(args)
    metrics = run_training(args.data, args.out, format=args.format, train_split=args.train_split,
                           val_split=args.val_split, preset=args.preset, resume=args.resume,
                           overrides=args.overrides, epochs=args.epochs, batch_size=args.batch_size, amp=args.amp,
                           backbone_checkpoint=args.backbone_checkpoint, device=args.device,
                           finetune_from=args.finetune_from, max_steps=args.max_steps,
                           progress=not args.no_progress, pictures=args.pictures,
                           picture_threshold=args.picture_threshold, patience=args.patience, loggers=args.log,
                           tracking_uri=args.tracking_uri)
    if _is_main_process():
        _print_metrics(metrics)
        print(f"dinodet: final metrics -> {Path(args.out) / 'metrics.json'}{_pictures(args.out)}")
    return 0


def _check_train_args(args: argparse.Namespace) -> None:
    from .data.coco import check_data_root
    from .engine.run_dir import CHECKPOINT

    _check_picture_args(args)
    if not args.data:
        raise ConfigError("--data DIR is required (on the command line or in the --config file)")
    check_out_folder(Path(args.out))
    for name in ("epochs", "batch_size", "max_steps", "patience"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.resume and not args.preset:
        raise ConfigError("--preset NAME is required for a new run (e.g. --preset tiny)")
    if args.resume and not args.preset and not (Path(args.out) / CHECKPOINT).is_file():
        raise ConfigError(f"--resume: nothing to resume, no {Path(args.out) / CHECKPOINT} (add --preset NAME to "
                          "start a new run there)")
    check_data_root(args.data)


def _submit_slurm(args: argparse.Namespace) -> int:
    from .engine.slurm import SlurmOptions, submit_slurm

    opts = SlurmOptions(nodes=args.slurm_nodes, gpus_per_node=args.slurm_gpus_per_node,
                        cpus_per_task=args.slurm_cpus_per_task, timeout_min=args.slurm_time,
                        partition=args.slurm_partition)
    run_dir = Path(args.out)
    try:  # the job runs this same entry point on the command line without its --slurm* options
        job_id = submit_slurm(sys.argv[1:] if args.argv is None else args.argv, run_dir, opts, main)
    except ImportError:
        raise ConfigError("--slurm needs the 'submitit' package: pip install submitit") from None
    print(f"dinodet: submitted SLURM job {job_id} ({opts.nodes} node(s) x {opts.gpus_per_node} GPU(s)); "
          f"logs in {run_dir / opts.folder}")
    return 0


# ------------------------------------------------------------------------------------------- eval


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="COCO-evaluate a checkpoint on a dataset split",
        description=(
            "Evaluate a dinodet or official DINO checkpoint on a split of --data with pycocotools: "
            "prints AP, AP50, AP75, APs/m/l and AP per class; with --out also writes metrics.json (fractions), "
            "predictions.json (COCO results), pr_curve.png, per_class_ap.png, confusion_matrix.png and "
            "SPLIT_predictions/ (images "
            "with the detections drawn).  Images that cannot be read are reported and left out.  Images are resized as the checkpoint's config says "
            "(data.eval_size / data.max_size; change with --set).  EMA weights are used when the "
            "checkpoint has them.  Runs distributed under torchrun."
        ),
    )
    _add_data_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", help="dinodet or official DINO checkpoint")
    src.add_argument("--model", metavar="MODEL.onnx|MODEL.xml",
                     help="a model from `dinodet export` (ONNX or OpenVINO IR), evaluated on the CPU with --backend; "
                     "its resize and top-k size are the file's")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"),
                   help="what runs the model: torch (--checkpoint), onnxruntime or openvino (--model) (default: "
                   "openvino for a .xml, onnxruntime for a .onnx, else torch)")
    p.add_argument("--preset", metavar="NAME", help="architecture of an official checkpoint without stored args")
    p.add_argument("--split", help="split to evaluate (default: --val-split, or --train-split with a warning when there is none)")
    p.add_argument("--batch-size", type=int, default=1, help="images per loader batch (AP does not depend on it)")
    p.add_argument("--out", metavar="DIR", help="write metrics.json, predictions.json and pictures here")
    _add_overwrite_arg(p)
    p.add_argument("--device", default="auto", help="torch device (default auto: cuda when available, else cpu)")
    p.add_argument("--mode", default="exact",
                   help="inference mode: exact (default, float32), reference, channels_last, bf16, fp16 (CUDA), "
                   "compile, compile_bf16 (CUDA); see `dinodet predict --help`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. data.eval_size=512 (repeatable)")
    _add_picture_args(p, "DIR/SPLIT_predictions/ (with --out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .engine.eval_checkpoint import check_eval_out, evaluate_checkpoint, write_eval_outputs
    from .engine.evaluate import format_per_class

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_picture_args(args)
    if args.out:
        check_eval_out(args.out, overwrite=args.overwrite)
    ev = evaluate_checkpoint(args.checkpoint, args.data, format=args.format, split=args.split,
                             train_split=args.train_split, val_split=args.val_split, preset=args.preset,
                             overrides=args.overrides, device=args.device, mode=args.mode,
                             batch_size=args.batch_size, progress=not args.no_progress, model=args.model,
                             backend=args.backend)
    if not ev.is_main:
        return 0
    _say(f"dinodet: {ev.images_scored} images of '{ev.split}', {len(ev.result.records)} detections"
         + (" (EMA weights)" if ev.ema_weights else ""))
    _print_metrics(ev.metrics)
    if ev.result.per_class:
        _say("AP per class:\n" + format_per_class(ev.result.per_class))
    if args.out:
        metrics, predictions, *pictures = write_eval_outputs(ev, args.out, pictures=args.pictures,
                                                             picture_threshold=args.picture_threshold,
                                                             overwrite=args.overwrite)
        _say(f"dinodet: metrics -> {metrics}, detections -> {predictions}" + "".join(f", {p.name}" for p in pictures))
    return 0


# ---------------------------------------------------------------------------------------- convert


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    from .data.layouts import FORMATS

    p = subparsers.add_parser(
        "convert",
        help="rewrite a dataset in the COCO, YOLO or Pascal VOC layout",
        description="Read the train, val and test splits of --data (or --split) in any supported layout and "
                    "write them, with copies of their images, into the new folder --out in the --to layout.  "
                    "The data is read as training reads it: each bad item is reported and left out.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="its layout (default auto: detected from the folder's files)")
    p.add_argument("--to", required=True, choices=("coco", "yolo", "voc"), help="layout to write")
    p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) folder to write the dataset in")
    p.add_argument("--split", action="append", help="split(s) to convert (default: those of train, val, test present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from .data.convert import convert_dataset

    result = convert_dataset(args.data, args.to, args.out, format=args.format, splits=args.split,
                             progress=not args.no_progress)
    _say(f"dinodet: {result.summary()}")
    return 0


# ------------------------------------------------------------------------------------- check-data


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
    p.add_argument("--split", action="append", help="split(s) to check (default: --train-split and --val-split when present)")
    p.add_argument("--decode", action="store_true", help="also decode every image (slower; finds truncated files)")
    p.add_argument("--out", metavar="DIR", help="write pictures of the labels here")
    _add_overwrite_arg(p)
    p.add_argument("--pictures", type=int, default=16, metavar="N",
                   help="images per split drawn with their boxes (with --out; default 16)")
    p.set_defaults(func=_run_check_data)


def _run_check_data(args: argparse.Namespace) -> int:
    from .data.checks import format_report
    from .engine.data_check import check_data

    status = 0
    for checked in check_data(_data_spec(args), args.split, decode=args.decode, out_dir=args.out,
                              pictures=args.pictures, overwrite=args.overwrite):
        _say(f"[{checked.split}]")
        _say(format_report(checked.report))
        status = max(status, int(checked.report.usable_images <= 0))  # a split with no usable image: exit 1
        if checked.pictures:
            pics = checked.pictures
            _say(f"pictures: {pics.count} images with their boxes -> {pics.folder}; boxes per class -> {pics.chart}")
    return status


# ------------------------------------------------------------------------------------------- demo


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
    p.add_argument("--device", default="auto", help="torch device (default auto: cuda when available, else cpu)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .engine.demo import run_demo

    metrics = run_demo(args.out, args.overrides, device=args.device, resume=args.resume,
                       progress=not args.no_progress)
    _print_metrics(metrics)
    print(f"dinodet: metrics -> {Path(args.out) / 'metrics.json'}{_pictures(args.out)}")
    return 0


# ------------------------------------------------------------------------------------------ bench


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
    p.add_argument("--device", default="auto", help="cpu or cuda (default auto: cuda when available, else cpu)")
    p.add_argument("--preset", default="dino_r50_4scale", help="model preset (default dino_r50_4scale)")
    p.add_argument("--size", default="800x1199", help="image size HEIGHTxWIDTH (default 800x1199)")
    p.add_argument("--batch", type=int, default=1, help="inference batch size (training uses at least 2)")
    p.add_argument("--task", choices=("infer", "train", "both"), default="infer", help="what to time (default infer)")
    p.add_argument("--modes", default=None,
                   help="comma-separated modes (default: all for the device; the reference always runs first); on "
                   "the CPU also the exported backends onnxruntime, openvino, openvino_int8 (exported inside the run)")
    p.add_argument("--calib-data", metavar="DIR", help="images calibrating the openvino_int8 row (default: noise "
                   "images, fine for speed)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per mode (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per mode")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the records as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the records as a bar chart")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from .deploy.bench import bench_modes, check_output_paths, format_table, parse_size, run_bench, write_outputs
    from .inference.detector import resolve_device
    from .presets import get_preset

    device = str(resolve_device(args.device))
    try:
        size = parse_size(args.size)
        get_preset(args.preset)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        raise ConfigError("--batch and --iters must be >= 1 and --warmup >= 0")
    modes = bench_modes(args.modes, args.task, device)
    check_output_paths(args.json_out, args.plot)  # a bad path must not cost the whole run
    print(f"dinodet: benchmarking {args.preset} at {size[0]}x{size[1]} on {device} "
          f"({args.warmup} warm-up + {args.iters} timed iterations per mode)", file=sys.stderr)
    records = run_bench(args.preset, device, size, args.batch, args.task, modes, warmup=args.warmup, iters=args.iters,
                        calib_data=args.calib_data)
    print(format_table(records))
    title = f"{args.preset} {size[0]}x{size[1]} {device}"
    for what, path in write_outputs(records, args.json_out, args.plot, title).items():
        print(f"dinodet: {what} -> {path}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------- export


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
    p.add_argument("--format", default="onnx", choices=("onnx", "openvino"),
                   help="export format: onnx, or openvino (an OpenVINO IR FILE.xml + FILE.bin for CPU "
                   "inference, converted from the ONNX export) (default onnx)")
    p.add_argument("--out", required=True, metavar="FILE.onnx|FILE.xml", help="output file")
    p.add_argument("--opset", type=int, default=None, metavar="N",
                   help="ONNX opset, 17..25 (default 18)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width (else fixed, "
                   "see --batch-size/--input-size)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and arithmetic (float32 inputs/outputs; "
                   "for GPU execution providers)")
    p.add_argument("--with-postprocess", action="store_true",
                   help="end the graph with the top-k post-processing (scores, labels, boxes in pixels)")
    p.add_argument("--msda", choices=("level_sum", "pytorch", "gather", "grid_sample", "embedding_bag"),
                   help="MSDA arrangement exported: level_sum (ONNX GridSample per level, summed level by level), "
                   "pytorch (the reference's arrangement; alias grid_sample), gather (bilinear index arithmetic, for "
                   "TensorRT, which mis-builds GridSample for DETR models) or embedding_bag (one weighted embedding "
                   "bag per layer: OpenVINO only, fixed shapes only, the fastest there); all give the same results "
                   "(default: embedding_bag for a fixed-shape --format openvino, else level_sum)")
    p.add_argument("--batch-size", type=int, metavar="N", help="fixed batch size without --dynamic (default 1)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="fixed padded input size without --dynamic (default MAX_SIZE MAX_SIZE)")
    p.add_argument("--size", type=int, help="short side the model expects (default: the checkpoint's "
                   "evaluation size, 800 for the official models)")
    p.add_argument("--max-size", type=int, help="cap on the long side (default: the checkpoint's, 1333 officially)")
    p.add_argument("--int8", action="store_true",
                   help="with --format openvino: NNCF post-training int8 quantisation calibrated on --calib-data (the "
                   "MSDA sampling offsets / attention weights, the class / box heads and the backbone's first stage "
                   "stay float32)")
    p.add_argument("--calib-data", metavar="DIR", help="folder of images like the deployment's, for --int8")
    p.add_argument("--calib-images", type=int, default=300, metavar="N",
                   help="calibration images taken from --calib-data, spread over the folder (default 300)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .deploy.export import DEFAULT_OPSET, to_onnx, to_openvino

    openvino = args.format == "openvino"
    if (args.int8 or args.calib_data) and not openvino:
        raise ConfigError("--int8 / --calib-data need --format openvino")
    int8 = {"int8": args.int8, "calib_data": args.calib_data, "calib_images": args.calib_images} if openvino else {}
    result = (to_openvino if openvino else to_onnx)(  # checks every option before the slow loading
        args.checkpoint, args.out, preset=args.preset, opset=DEFAULT_OPSET if args.opset is None else args.opset,
        dynamic=args.dynamic, fp16=args.fp16, with_postprocess=args.with_postprocess,
        msda=args.msda, batch_size=args.batch_size, input_size=args.input_size, size=args.size,
        max_size=args.max_size, **int8)
    contract = json.loads(result.metadata["input_contract"])
    shapes = ", ".join(f"{k} {v['shape']}" for k, v in contract["inputs"].items())
    _say(f"dinodet: wrote {result.path} (preset {result.metadata['preset']}; inputs {shapes}; "
         f"outputs {', '.join(result.outputs)}); checked with "
         + ("OpenVINO's converter" if openvino else "onnx.checker")
         + (f"; int8, calibrated on {json.loads(result.metadata['int8_calibration'])['images']} image(s)"
            if result.metadata.get("int8") == "true" else ""))
    return 0


# ------------------------------------------------------------------------------------------ serve


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="HTTP detection service with a web page (POST /v1/detect, GET /)",
        description=(
            "Serve a model over HTTP: POST /v1/detect (a multipart upload in the field 'image', or JSON "
            '{"image": BASE64}; query threshold, classes, max_det) answers the detections `dinodet predict` '
            "gives; GET / is a web page to try it; GET /health, /ready, /v1/model, /metrics (Prometheus).  "
            "Concurrent requests of the same resized shape run as one batch.  Binds 127.0.0.1 unless --host says "
            "otherwise; SIGTERM lets in-flight requests finish.  Needs pip install 'dinodet[serve]'."
        ),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH", help="dinodet or official DINO checkpoint (.pth/.pt)")
    src.add_argument("--model", metavar="MODEL.onnx|MODEL.xml", help="a model from `dinodet export`")
    src.add_argument("--random-weights", action="store_true",
                     help="a randomly initialised --preset model: smoke tests only, the boxes are MEANINGLESS")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"),
                   help="as for predict (default: openvino for a .xml, onnxruntime for a .onnx, else torch)")
    p.add_argument("--preset", metavar="NAME", help=f"model architecture ({', '.join(list_presets())}); checked "
                   "against a checkpoint's weights (default: taken from the checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda:1...")
    p.add_argument("--mode", default="exact", help="inference mode, as for predict (default exact)")
    p.add_argument("--size", type=int, help="short side after resizing (default: the model's)")
    p.add_argument("--max-size", type=int, help="cap on the long side (default: the model's)")
    p.add_argument("--max-batch", default="auto", metavar="N|auto",
                   help="images per forward pass at most (1 turns dynamic batching off; default auto: 1 on a CPU, "
                   "where a batch costs as much as its images one by one, 8 on a GPU)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS",
                   help="how long a request may wait for others to batch with (default 10)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting at most; beyond, 503 with Retry-After (default 64)")
    p.add_argument("--max-queue-mb", type=float, default=1024.0, metavar="MB",
                   help="decoded images waiting at most, in MB (4 bytes a pixel); beyond, 503 with Retry-After "
                   "(default 1024)")
    p.add_argument("--max-image-mb", type=float, default=20.0, metavar="MB",
                   help="largest upload accepted, in MB (default 20; larger: 413)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="a file holding the API key that /v1/* and /metrics then require "
                   "(Authorization: Bearer KEY or X-API-Key: KEY)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from .serve import require_serve

    require_serve()
    from .inference.predict import DetectorOptions
    from .serve import ServeOptions, run_server

    options = ServeOptions(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                           max_queue=args.max_queue, max_queue_mb=args.max_queue_mb,
                           max_image_mb=args.max_image_mb, api_key_file=args.api_key_file)
    model = DetectorOptions(checkpoint=args.checkpoint, model=args.model, random_weights=args.random_weights,
                            preset=args.preset, device=args.device, size=args.size,
                            max_size=args.max_size, mode=args.mode, backend=args.backend)
    run_server(model, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
