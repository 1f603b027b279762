"""Pre-flight dataset scan (``dinodet check-data``): find bad data before a long run does.

``check_dataset`` runs the same annotation cleaning as training (``coco.build_index``: missing
files, malformed/degenerate/out-of-image boxes, unknown categories, ...) and then opens every
image header: unreadable files, non-RGB modes, EXIF rotations and sizes that disagree with the
annotations.  ``decode=True`` also decodes the pixels, which catches truncated files at the cost
of a full read.
"""
from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import first_line
from .coco import build_index
from .images import EXIF_ORIENTATION, logged_warnings, upright
from .labels import LabelMap
from .report import DataReport

__all__ = ["DataReport", "check_dataset", "check_image", "format_report"]


@dataclass
class ImageCheck:
    """Result of ``check_image``: ``error`` set when unreadable; sizes are (width, height)."""

    path: str
    error: str | None = None
    mode: str = ""
    stored_size: tuple[int, int] = (0, 0)
    upright_size: tuple[int, int] = (0, 0)


def check_image(path: str | Path, decode: bool = False) -> ImageCheck:
    """Open (and verify / optionally decode) one image file without raising."""
    result = ImageCheck(str(path))
    try:
        with Image.open(path) as im:
            im.verify()  # structural check (PNG CRCs, ...); must come first and spoils the object
        with Image.open(path) as im:
            result.mode = im.mode
            w, h = im.size
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            if decode:
                im.load()
        result.stored_size = (w, h)
        result.upright_size = upright(w, h, orientation)
    except UnidentifiedImageError:  # PIL's message repeats the path
        result.error = "not an image, or an unsupported format"
    except Exception as e:  # noqa: BLE001 -- anything else PIL raises also means the file is unusable
        result.error = first_line(e)
    return result


def check_dataset(root: str | Path, format: str = "coco", split: str = "train", *, ann_file: str | Path | None = None,
                  img_dir: str | Path | None = None, label_map: LabelMap | None = None, decode: bool = False,
                  workers: int = 8, max_images: int | None = None) -> DataReport:
    """Scan a dataset split and return what is wrong with it (nothing is modified).

    Args:
        root, format, split, ann_file, img_dir, label_map: as ``coco.build_dataset``.
        decode: fully decode every image (slower; catches truncated files).
        workers: threads opening images (PIL releases the GIL while decoding).
        max_images: only open the first N images (annotation checks still cover all).
    Raises:
        DatasetError: the dataset cannot be located or parsed at all.
    """
    index = build_index(root, split, format, ann_file, img_dir, label_map)
    report = index.report
    sizes = index.sizes if max_images is None else index.sizes[:max_images]
    files = index.files[: len(sizes)]
    # PIL's warnings (a large image, odd metadata) logged, not printed raw; from threads they cannot be
    # told apart per file, so they name the dataset
    with logged_warnings(report.source or root), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda p: check_image(p, decode), files)
        for res, (h, w) in zip(results, sizes.tolist()):
            if res.error is not None:
                report.add("unreadable_images", f"{res.path}: cannot read image ({res.error})")
                continue
            if res.mode != "RGB":
                report.add("non_rgb_images", f"{res.path}: mode {res.mode}, converted to RGB when loaded")
            if res.upright_size == (w, h):
                continue
            if res.stored_size == (w, h):
                report.add("exif_reoriented", f"{res.path}: EXIF orientation swaps width/height but the annotations "
                                              f"give {w}x{h}; the image will be used as stored")
            else:
                uw, uh = res.upright_size
                report.add("size_mismatch", f"{res.path}: image is {uw}x{uh} but annotated as {w}x{h}; it will be "
                                            "resized to the annotated size")
    return report


def format_report(report: DataReport, max_messages: int = 50, label_map: LabelMap | None = None) -> str:
    """Human-readable report: source, counts, the first ``max_messages`` messages and a verdict."""
    lines = [f"dataset: {report.source}" if report.source else "dataset:"]
    if label_map is not None:
        lines.append(f"classes: {label_map.num_classes} ({_preview(label_map.class_names)})")
    elif report.num_classes:
        lines.append(f"classes: {report.num_classes}")
    lines.append(report.summary())
    shown = report.messages[:max_messages]
    if shown:
        lines.append("details:")
        lines.extend(f"  {m}" for m in shown)
        hidden = len(report.messages) - len(shown) + report.messages_suppressed
        if hidden:
            lines.append(f"  ... and {hidden} more")
    if report.usable_images <= 0:
        lines.append("result: NO USABLE IMAGES")
    elif report.no_boxes:
        lines.append("result: NO BOXES: every image is a negative, there is nothing to learn to detect"
                     + (f"; {report.num_problems} problem(s) as listed" if report.num_problems else ""))
    elif report.ok:
        lines.append("result: OK")
    else:
        lines.append(f"result: {report.num_problems} problem(s); training will skip/fix them as listed")
    return "\n".join(lines)


def _preview(names: Iterable[str], n: int = 8) -> str:
    names = list(names)
    head = ", ".join(names[:n])
    return head + (", ..." if len(names) > n else "")
