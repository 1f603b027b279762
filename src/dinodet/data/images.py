"""Reading images from disk the same way everywhere (predict, eval, train).

Images are returned as RGB PIL images with their EXIF orientation applied, so pixel coordinates
(and therefore predicted boxes) refer to the image as a viewer shows it.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageLoadError, first_line

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
    with Image.open(path) as im:
        return upright(*im.size, im.getexif().get(EXIF_ORIENTATION, 1))



def load_image(path: str | Path) -> Image.Image:
    """Load ``path`` as an RGB image, upright according to its EXIF orientation tag.

    Grayscale, palette, RGBA/LA (alpha dropped) and CMYK images are converted to RGB.

    Raises:
        ImageLoadError: the file is missing, unreadable, truncated or not an image.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not an image" if path.is_dir() else "no such file"
        raise ImageLoadError(f"cannot read image '{path}': {what}")
    try:
        with Image.open(path) as im:
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
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bit instead of clipping everything above 255 to white.
        im = im.point(lambda v: v / 256).convert("L")
    return im.convert("RGB")


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
