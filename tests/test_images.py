import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinodet.data.images import ImageLoadError, iter_image_paths, load_image

EXIF_ORIENTATION = 0x0112


def _two_tone(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2, 0] = 255
    a[:, width // 2 :, 2] = 255
    return Image.fromarray(a)


def test_exif_orientation_is_applied(tmp_path: Path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    _two_tone(40, 20).save(path, exif=exif, quality=95)

    im = load_image(path)
    assert im.mode == "RGB"
    assert im.size == (20, 40)  # (w, h) swapped
    a = np.asarray(im).astype(int)
    # turning clockwise moves the (red) left half to the top
    assert a[5, 10, 0] > 200 and a[5, 10, 2] < 60
    assert a[35, 10, 2] > 200 and a[35, 10, 0] < 60


def test_grayscale_becomes_rgb(tmp_path: Path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((8, 12), 77, np.uint8), mode="L").save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (12, 8)
    assert (np.asarray(im) == 77).all()


def test_rgba_drops_alpha(tmp_path: Path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (10, 6), (10, 20, 30, 0)).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (10, 6)
    assert np.asarray(im)[0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "I;16"])
def test_other_modes_become_rgb(tmp_path: Path, mode: str):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    if mode == "I;16":
        Image.fromarray(np.full((5, 7), 256 * 200, np.uint16)).save(path)
    else:
        Image.new("RGB", (7, 5), (200, 200, 200)).convert(mode).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (7, 5)
    if mode == "I;16":  # 16-bit is scaled down, not clipped to white
        assert (np.asarray(im) == 200).all()


def test_real_grayscale_coco_image(sample_images: list[Path]):
    im = load_image(sample_images[1])  # 000000000086.jpg is mode L
    assert im.mode == "RGB" and im.size == (512, 640)


@pytest.mark.parametrize(
    "content",
    [b"this is not an image", b"", None],
    ids=["garbage", "empty", "truncated"],
)
def test_unreadable_file_raises_one_line_error_naming_it(tmp_path: Path, sample_images: list[Path], content):
    path = tmp_path / "bad image.jpg"
    if content is None:
        data = sample_images[0].read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert isinstance(info.value, ValueError)


def test_missing_file_and_directory(tmp_path: Path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_iter_image_paths_expands_directories(tmp_path: Path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for name in ["b.PNG", "a.jpg", "c.jpeg", "notes.txt"]:
        (d / name).write_bytes(b"")
    (d / "sub" / "nested.jpg").write_bytes(b"")  # not recursive
    single = tmp_path / "z.weird"
    single.write_bytes(b"")

    paths = iter_image_paths([str(single), d])
    assert paths == [single, d / "a.jpg", d / "b.PNG", d / "c.jpeg"]


def test_iter_image_paths_missing_input(tmp_path: Path):
    with pytest.raises(ImageLoadError, match="missing_dir"):
        iter_image_paths([tmp_path / "missing_dir"])
    (tmp_path / "a.jpg").write_bytes(b"")
    # among existing inputs a missing one is kept, for load_image to report and the caller to skip
    assert iter_image_paths([tmp_path / "a.jpg", tmp_path / "typo.jpg"]) == [tmp_path / "a.jpg", tmp_path / "typo.jpg"]


def test_decompression_bomb_is_an_unreadable_image(tmp_path: Path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses > 2x this many pixels
    with pytest.raises(ImageLoadError, match="huge.png"):
        load_image(path)


@pytest.mark.parametrize(("mode", "values"), [
    ("I", [0, 100_000, 400_000, 2**20]),  # 32-bit: stretched from its minimum to its maximum
    ("I", [-500, 0, 300, 900]),       # negative: stretched too
    ("I", [0, 60, 120, 250]),         # only 8-bit values in a 32-bit image: kept
    ("I", [0, 1000, 30_000, 60_000]),  # 16-bit values: as 16 bit
    ("I;16B", [0, 1000, 30_000, 60_000]),
    ("F", [0.0, 0.1, 0.5, 1.0]),       # fractions of white
    ("F", [-5.0, 100.0, 1000.0, 5000.0]),
])
def test_high_depth_and_float_tiffs_keep_their_intensities(tmp_path: Path, mode: str, values: list[float]):
    """PIL's own conversion clips at 255 or at 1: such images came out black or white."""
    row = np.array(values, np.float32 if mode == "F" else np.int32)
    if mode == "I;16B":
        im = Image.frombytes(mode, (4, 2), np.tile(row, 2).astype(">u2").tobytes())
    else:
        im = Image.fromarray(np.tile(row, (2, 1)))
    path = tmp_path / "deep.tif"
    im.save(path)
    assert Image.open(path).mode == mode
    gray = np.asarray(load_image(path))[0, :, 0].astype(int)
    assert (np.diff(gray) > 0).all(), gray  # not black, ordering kept
    if mode == "I" and values[-1] <= 255:
        assert gray.tolist() == values
    if mode == "F" and values[-1] <= 1:
        assert gray.tolist() == [0, 26, 128, 255]


def test_pil_warnings_are_logged_naming_the_file(tmp_path: Path, monkeypatch, capsys):
    from dinodet.cli import printed_logs

    path = tmp_path / "large.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the limit (a warning), under twice it (an error)
    with warnings.catch_warnings(), printed_logs():
        warnings.simplefilter("error")  # a warning reaching Python's own printing fails the test
        assert load_image(path).size == (64, 64)
        load_image(path)  # said once, not once per epoch of a training run
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"dinodet: warning: {path}: Image size (4096 pixels) exceeds limit")


def test_a_fifo_and_a_symlink_loop_are_named_as_what_they_are(tmp_path: Path):
    from dinodet.data.coco import index_coco
    from dinodet.data.images import describe_unreadable

    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would block
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop2.jpg")
    (tmp_path / "loop2.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    expected = {"pipe.jpg": "not a regular file (a FIFO)", "loop.jpg": "a symbolic link loop",
                "dangling.jpg": "a broken symbolic link", "nope.jpg": "no such file"}
    for name, what in expected.items():
        assert describe_unreadable(tmp_path / name) == what
        with pytest.raises(ImageLoadError, match=re.escape(f"'{tmp_path / name}': {what}")):
            load_image(tmp_path / name)
    assert describe_unreadable(tmp_path) == "a directory"
    data = {"images": [{"id": 1, "file_name": "pipe.jpg", "width": 8, "height": 8}], "annotations": [],
            "categories": [{"id": 1, "name": "x"}]}
    report = index_coco(data, tmp_path).report
    assert report.messages == [f"{tmp_path / 'pipe.jpg'}: listed in annotations but not a regular file (a FIFO); skipped"]
