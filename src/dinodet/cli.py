"""The ``dinodet`` command line.

Each subcommand is an ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func`` to a ``_run_<name>(args) -> int`` function; adding ``train``/``eval``/``demo`` means adding
one such pair and registering it in ``build_parser``.

User mistakes (missing checkpoint, wrong or unknown preset, unreadable image, unavailable device)
are reported as ONE line ``dinodet: error: ...`` on stderr with exit status 2 and no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import ConfigError
from .data.images import ImageLoadError, iter_image_paths, load_image
from .presets import list_presets

if TYPE_CHECKING:
    from PIL import Image

    from .inference import Detector

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dinodet`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
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


def _user_errors() -> tuple[type[Exception], ...]:
    """The package's error types whose messages are meant for users (one line, naming the file)."""
    from .checkpoint import CheckpointError  # deferred: imports the model code

    return (CheckpointError, ConfigError, ImageLoadError)


def _error(message: str) -> None:
    # First line only: the contract is one line per error, whatever an exception carries.
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"dinodet: error: {first}", file=sys.stderr)


def _warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"dinodet: warning: {message}", file=sys.stderr)  # does not break a progress bar


# ----------------------------------------------------------------------------------------- predict


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="detect objects in images; writes annotated images and predictions.json",
        description=(
            "Detect objects in images (files or folders of images) and write, into --out, one "
            "annotated JPEG per image (same stem) and predictions.json: a list of "
            '{"file_name", "category_id", "bbox": [x, y, w, h], "score"} records in pixels of the '
            "original image.  Images that cannot be read are reported and skipped; the exit status "
            "is 0 when at least one image was processed."
        ),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="dinodet or official DINO checkpoint (.pth/.pt)")
    src.add_argument(
        "--random-weights",
        action="store_true",
        help="use a randomly initialised --preset model instead of a checkpoint: for smoke-testing "
        "the pipeline only, the boxes are MEANINGLESS",
    )
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
    p.add_argument("--size", type=int, default=800, help="short side after resizing (default 800)")
    p.add_argument("--max-size", type=int, default=1333, help="cap on the long side (default 1333)")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    _check_predict_args(args)
    paths = list(dict.fromkeys(iter_image_paths(args.images)))  # a file named twice runs once
    if not paths:
        raise ImageLoadError(f"no images found in {', '.join(repr(str(p)) for p in args.images)}")
    out_dir = Path(args.out)
    _check_output_names(paths, out_dir)
    detector = _build_detector(args)
    out_dir.mkdir(parents=True, exist_ok=True)

    # A lone unreadable image is an error; in a set of images it is reported and skipped.
    skip_unreadable = len(paths) > 1
    records, done = _predict_files(detector, paths, out_dir, args.threshold, args.batch_size, skip_unreadable)
    if done == 0:
        _error(f"none of the {len(paths)} images could be read; nothing written")
        return EXIT_USAGE
    json_path = out_dir / "predictions.json"
    write_json_atomic(json_path, records)
    skipped = len(paths) - done
    print(
        f"dinodet: {len(records)} detection(s) in {done} image(s) -> {json_path}"
        + (f" ({skipped} unreadable image(s) skipped)" if skipped else "")
    )
    return 0


def _check_predict_args(args: argparse.Namespace) -> None:
    if args.random_weights and not args.preset:
        raise ConfigError("--random-weights needs --preset NAME (e.g. --preset tiny)")
    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.size < 1 or args.max_size < args.size:
        raise ConfigError(f"need 1 <= --size <= --max-size, got --size {args.size} --max-size {args.max_size}")


def _check_output_names(paths: Sequence[Path], out_dir: Path) -> None:
    """Annotated images are written as ``out_dir/<stem>.jpg``: no two inputs may share a stem, and
    no output may overwrite an input (e.g. ``--out`` pointing at the image folder)."""
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise ImageLoadError(f"'{seen[p.stem]}' and '{p}' would both be written as {p.stem}.jpg; rename one")
        seen[p.stem] = p
        if (out_dir / f"{p.stem}.jpg").resolve() == p.resolve():
            raise ConfigError(f"--out '{out_dir}' would overwrite the input image '{p}'; choose another folder")


def _build_detector(args: argparse.Namespace) -> Detector:
    # deferred like every torch import here: torch + torchvision take seconds, `--help` should not
    from .inference import Detector

    if args.random_weights:
        detector = Detector.from_random(args.preset, device=args.device, size=args.size, max_size=args.max_size)
        _warn(f"using RANDOM weights for preset '{args.preset}': the detections are meaningless")
        return detector
    return Detector.from_checkpoint(
        args.checkpoint, preset=args.preset, device=args.device, size=args.size, max_size=args.max_size
    )


def _predict_files(
    detector: Detector,
    paths: Sequence[Path],
    out_dir: Path,
    threshold: float,
    batch_size: int,
    skip_unreadable: bool,
) -> tuple[list[dict[str, Any]], int]:
    """Run the detector over ``paths``; write annotated images. Returns (records, images done)."""
    from tqdm import tqdm

    from .boxes import box_xyxy_to_xywh
    from .visualize import draw_detections

    records: list[dict[str, Any]] = []
    done = 0
    with tqdm(total=len(paths), unit="img", disable=len(paths) < PROGRESS_MIN_IMAGES, file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = _load_images(paths[start : start + batch_size], skip_unreadable)
            if chunk:
                preds = detector.predict([im for _, im in chunk], threshold=threshold, batch_size=batch_size)
                for (path, image), pred in zip(chunk, preds):
                    draw_detections(image, pred.boxes, pred.class_names, pred.scores).save(
                        out_dir / f"{path.stem}.jpg", quality=90
                    )
                    records.extend(_records(path.name, pred.category_ids.tolist(),
                                            box_xyxy_to_xywh(pred.boxes).tolist(), pred.scores.tolist()))
                    done += 1
            bar.update(min(batch_size, len(paths) - start))
    return records, done


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


def _json_lines(data: Any) -> str:
    """A JSON list with one element per line: valid JSON that is still easy to grep and diff."""
    if isinstance(data, list):
        return "[\n" + ",\n".join(json.dumps(x) for x in data) + ("\n]\n" if data else "]\n")
    return json.dumps(data) + "\n"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` so readers never see a half-written file.

    The temp file lives in the same folder because ``os.replace`` is atomic only within one file
    system; a plain ``open`` (not ``mkstemp``) keeps the usual umask permissions.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(_json_lines(data))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
