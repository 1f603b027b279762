"""Reading images from disk the same way everywhere (predict, eval, train).

Images are returned as RGB PIL images with their EXIF orientation applied, so pixel coordinates
(and therefore predicted boxes) refer to the image as a viewer shows it.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import stat
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageLoadError, first_line

logger = logging.getLogger(__name__)

# Lower-case suffixes picked up when a directory is expanded; explicitly named files are always
# tried, whatever their suffix.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 5..8 are the rotations that swap width and height


def upright(width: int, height: int, orientation: int) -> tuple[int, int]:
    """(width, height) of a stored ``width x height`` image as viewed with EXIF ``orientation``."""
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def upright_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image as viewed (EXIF orientation applied), from its header only.

    Raises OSError / PIL errors for unreadable files.
    """
    with logged_warnings(path), Image.open(path) as im:
        return upright(*im.size, im.getexif().get(EXIF_ORIENTATION, 1))


@contextlib.contextmanager
def logged_warnings(about: str | Path) -> Iterator[None]:
    """Re-log the Python warnings raised inside (PIL's, matplotlib's) as dinodet warnings naming
    ``about``, so that the CLI prints them as ``dinodet: warning:`` lines instead of Python's raw
    ``file:line: UserWarning: ...`` lines, which do not say which image or picture they concern.
    Not thread-safe (``warnings`` state is global): wrap the pool, not each thread's work."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # each file's warning is news, not a repeat to hide
        try:
            yield
        finally:  # also when the file then fails to load: the warning may say why
            for line in dict.fromkeys(f"{about}: {first_line(w.message)}" for w in caught):
                if line not in _said:
                    if len(_said) < _SAID_MAX:
                        _said.add(line)
                    logger.warning(line)


# Warning lines already logged by this process: training loads every image every epoch, and one
# large image should not say so once per epoch.  Bounded, so a huge dataset cannot grow it forever.
_said: set[str] = set()
_SAID_MAX = 100_000


_FILE_TYPES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def describe_unreadable(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a file, in words ("no such file", "a directory", "not a regular
    file (a FIFO)", "a symbolic link loop", ...), or None for a regular file.  Said before opening,
    because opening a FIFO blocks until some other program writes to it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else "no such file"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        return (e.strerror or first_line(e)).lower()  # e.g. "permission denied" on a parent folder
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    kind = next((name for test, name in _FILE_TYPES if test(mode)), "a special file")
    return f"not a regular file ({kind})"


def load_image(path: str | Path) -> Image.Image:
    """Load ``path`` as an RGB image, upright according to its EXIF orientation tag.

    Grayscale (8, 16, 32 bit and float), palette, RGBA/LA (alpha dropped) and CMYK images are
    converted to RGB.  PIL's warnings (e.g. a large image) are logged, naming the file.

    Raises:
        ImageLoadError: the file is missing, not a regular file, unreadable, truncated or not an image.
    """
    path = Path(path)
    problem = describe_unreadable(path)
    if problem is not None:
        raise ImageLoadError(f"cannot read image '{path}': {problem}")
    try:
        with logged_warnings(path), Image.open(path) as im:
            # exif_transpose decodes the pixels, so truncated files fail here, inside the try.
            upright = ImageOps.exif_transpose(im)
            return to_rgb(upright)
    except UnidentifiedImageError as e:  # PIL's own message repeats the path; say it once
        raise ImageLoadError(f"cannot read image '{path}': not an image, or an unsupported format") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports corrupt data with several exception types; SyntaxError comes from some
        # plugin parsers (e.g. broken PNG chunks); a decompression bomb is a file too large to trust.
        raise ImageLoadError(f"cannot read image '{path}': {first_line(e)}") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; ``convert`` always returns a new, fully loaded image."""
    if im.mode == "P" and "transparency" in im.info:
        # Palette images with transparency must pass through RGBA or PIL warns and may mis-map.
        im = im.convert("RGBA")
    if im.mode == "F" or im.mode.startswith("I"):
        im = _to_8bit(im)
    return im.convert("RGB")


def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grayscale image as 8-bit ``L``, scaled by the range its values
    use: PIL's own conversion clips at 255 (a 16-bit image turns white) or at 1 (a 0..1 float
    image turns black).  Integers up to 255 are kept, up to 65535 read as 16 bit; 0..1 floats
    are fractions of white; anything else (negative, 32-bit) is stretched from its minimum to its
    maximum.  NaN is black, infinities the ends of the range."""
    a = np.asarray(im, dtype=np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if im.mode == "F":
        scale = 255.0 if lo >= 0 and hi <= 1 else None
    else:
        scale = 1.0 if lo >= 0 and hi <= 255 else 1 / 256 if lo >= 0 and hi <= 65535 else None
    if scale is None:  # stretch min..max to 0..255 (a flat image is black)
        a, scale = a - lo, 255 / (hi - lo) if hi > lo else 0.0
    a = np.nan_to_num(a * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def iter_image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories into a list of image files.

    Files are kept as given (in order), missing ones too: ``load_image`` reports them like
    unreadable ones, so that one mistyped name among many is skipped, not fatal.  A directory
    contributes its direct children with an image suffix (see ``IMAGE_EXTENSIONS``), sorted by name.

    Raises:
        ImageLoadError: none of the inputs exists.
    """
    paths: list[Path] = []
    found = False
    for item in inputs:
        p = Path(item)
        found = found or p.exists()
        if p.is_dir():
            paths.extend(sorted(c for c in p.iterdir() if c.is_file() and c.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            paths.append(p)
    if paths and not found:
        raise ImageLoadError("no such file or directory: " + ", ".join(repr(str(p)) for p in paths))
    return paths
