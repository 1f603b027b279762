"""Tiled inference (``--tile``, ``inference.tiling.TilingDetector``): small objects in a large image.

The construction is deterministic: a stand-in detector that, like the model, sees its input shrunk
to a fixed size (64 px on the long side, box-filtered) and finds the bright squares there.  An 8-px
square in a 1024x768 image covers at most a quarter of one 16-px cell of the shrunk image (grey
64, under the detector's threshold of 128), so it is always missed; in a 256-px tile each cell is
4 px, the square fills 2x2 cells whole and is always found.  Squares sit on multiples of 4 and the
tiles (overlap 64) start on multiples of 4, so every tile sees a square on the same grid: the boxes
are exact and the copies from overlapping tiles coincide, which the NMS merge must fold into one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from dinodet.cli import main
from dinodet.inference.detector import Detector, Prediction
from dinodet.inference.tiling import TilingDetector

pytest.importorskip("supervision", reason="tiling needs supervision: pip install 'dinodet[video]'")

SIDE = 8
SQUARES = [(100, 100), (220, 220), (500, 300), (700, 600), (952, 700)]  # (x0, y0); (220, 220) is in 4 tiles
PHOTO = Path(__file__).parent / "data" / "coco128_mini" / "images" / "train2017" / "000000000009.jpg"
TINY = ["--random-weights", "--preset", "tiny", "--size", "64", "--max-size", "96", "--threshold", "0"]


class ShrinkingSquareFinder:
    """Finds bright squares in its input shrunk to 64 px on the long side: a model's limited resolution."""

    class_names = ("square",)
    input_side = 64

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, images: list[np.ndarray], threshold: float = 0.3, batch_size: int = 1) -> list[Prediction]:
        self.calls += 1
        return [self._find(np.asarray(image)) for image in images]

    def _find(self, image: np.ndarray) -> Prediction:
        h, w = image.shape[:2]
        scale = self.input_side / max(h, w)
        small_w, small_h = round(w * scale), round(h * scale)
        small = np.asarray(Image.fromarray(image).convert("L").resize((small_w, small_h), Image.Resampling.BOX))
        regions, _ = ndimage.label(small >= 128)
        boxes = [[s[1].start * w / small_w, s[0].start * h / small_h, s[1].stop * w / small_w, s[0].stop * h / small_h]
                 for s in ndimage.find_objects(regions)]
        n = len(boxes)
        return Prediction(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(n, 4), scores=torch.full((n,), 0.9),
                          labels=torch.zeros(n, dtype=torch.int64), category_ids=torch.ones(n, dtype=torch.int64),
                          class_names=["square"] * n, image_size=(h, w))


def scene() -> np.ndarray:
    image = np.zeros((768, 1024, 3), dtype=np.uint8)
    for x, y in SQUARES:
        image[y:y + SIDE, x:x + SIDE] = 255
    return image


def test_small_objects_are_found_with_tiles_and_missed_without() -> None:
    finder = ShrinkingSquareFinder()
    assert len(finder.predict([scene()])[0]) == 0  # untiled: every square is below the model's resolution
    tiled = TilingDetector(finder, tile=256, overlap=0.25).predict([scene()], threshold=0.3, batch_size=4)[0]
    assert sorted(map(tuple, tiled.boxes.tolist())) == [(x, y, x + SIDE, y + SIDE) for x, y in SQUARES]
    assert tiled.image_size == (768, 1024) and tiled.class_names == ["square"] * len(SQUARES)
    # 20 tiles of 256 px (5 x 4, batches of 4) plus the whole image: 6 calls
    assert finder.calls == 1 + 6


def test_an_image_within_one_tile_gives_the_untiled_detections(one_thread: None) -> None:
    detector = Detector.from_random("tiny", size=64, max_size=96)
    photo = Image.open(PHOTO).convert("RGB")  # 640x480
    direct = detector.predict([photo], threshold=0.0)[0]
    tiled = TilingDetector(detector, tile=640).predict([photo], threshold=0.0)[0]
    assert torch.equal(tiled.boxes, direct.boxes) and torch.equal(tiled.scores, direct.scores)
    assert torch.equal(tiled.labels, direct.labels) and tiled.class_names == direct.class_names


def test_cli_tile_gives_boxes_in_full_image_pixels(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   one_thread: None) -> None:
    out = tmp_path / "out"
    assert main(["predict", str(PHOTO), *TINY, "--out", str(out), "--tile", "256", "--no-save-images"]) == 0
    records = json.loads((out / "predictions.json").read_text())
    # tiles start at 0, 192 and 384 (x) / 0 and 224 (y): boxes from the far tiles land beyond one tile
    assert records and max(r["bbox"][0] + r["bbox"][2] for r in records) > 400
    assert all(-50 < r["bbox"][0] < 640 and -50 < r["bbox"][1] < 480 for r in records)
    capsys.readouterr()
    rc = main(["predict", str(PHOTO), *TINY, "--out", str(tmp_path / "bad"), "--tile", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "--tile must be >= 32" in err and "RANDOM weights" not in err
