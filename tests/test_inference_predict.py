"""``dinodet.inference.predict``: prediction over files into a folder (the workflow behind
``dinodet predict``), without a model: a stand-in detector keeps these fast."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dinodet.data.transforms import check_resize
from dinodet.errors import ConfigError, ImageLoadError
from dinodet.files import check_out_folder
from dinodet.inference.predict import (
    DetectorOptions,
    gather_images,
    output_names,
    predict_chunk,
    predict_to_folder,
)


class OneBox:
    """A detector that finds one box covering the left half of every image."""

    def predict(self, images, threshold, batch_size):
        return [SimpleNamespace(boxes=torch.tensor([[0.0, 0.0, im.width / 2, im.height]]), class_names=["thing"],
                                scores=torch.tensor([0.123456789]), category_ids=torch.tensor([7]))
                for im in images]


def _images(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (8, 6)).save(folder / n)
    return [folder / n for n in names]


def test_a_failing_batch_is_retried_image_by_image(tmp_path: Path, caplog):
    class Fussy:  # fails on any batch holding the 7-pixel-wide image
        def predict(self, images, threshold, batch_size):
            if any(im.width == 7 for im in images):
                raise RuntimeError("CUDA out of memory (simulated)\nmore detail")
            return [im.width for im in images]

    chunk = [(tmp_path / f"{w}.jpg", Image.new("RGB", (w, 5))) for w in (5, 7, 9)]
    with caplog.at_level(logging.WARNING, logger="dinodet"):
        got = predict_chunk(Fussy(), chunk, 0.3, skip_failures=True)
    assert [(path.name, pred) for (path, _), pred in got] == [("5.jpg", 5), ("9.jpg", 9)]
    err = caplog.text
    assert err.count("cannot predict") == 1 and "7.jpg': CUDA out of memory (simulated); skipped" in err
    with pytest.raises(RuntimeError):  # a lone image: the error is the run's
        predict_chunk(Fussy(), chunk[1:2], 0.3, skip_failures=False)


def test_predict_to_folder_writes_pictures_and_rounded_records(tmp_path: Path, caplog):
    a, _ = _images(tmp_path / "in", "a.jpg", "b.png")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="dinodet"):
        summary = predict_to_folder(OneBox(), [tmp_path / "in", a], tmp_path / "out")  # a.jpg named twice: once
    assert (summary.images, summary.done, summary.skipped) == (3, 2, 1) and "broken.jpg" in caplog.text
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jpg")) == ["a.jpg", "b.jpg"]
    records = json.loads(summary.predictions.read_text())
    assert records == summary.records and records[0] == {"image_id": 1, "file_name": "a.jpg", "category_id": 7,
                                                         "class_name": "thing", "bbox": [0.0, 0.0, 4.0, 6.0], "score": 0.12346}


def test_nothing_processed_is_an_error_and_leaves_no_folder(tmp_path: Path):
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    (tmp_path / "y.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="none of the 2 images could be processed"):
        predict_to_folder(OneBox(), [tmp_path / "x.jpg", tmp_path / "y.jpg"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match="no images found"):
        gather_images([tmp_path / "empty"])


def test_output_names_keep_shared_stems_apart_and_inputs_safe(tmp_path: Path):
    paths = [Path("cam1/0001.jpg"), Path("cam2/0001.jpg"), Path("x/a.jpg"), Path("x/a.png")]
    outputs = output_names(paths, tmp_path)
    assert [o.picture for o in outputs.values()] == ["cam1_0001.jpg", "cam2_0001.jpg", "x_a.jpg", "x_a_png.jpg"]
    assert outputs[paths[0]].file_name == "cam1/0001.jpg" and outputs[paths[2]].file_name == "a.jpg"
    (image,) = _images(tmp_path, "z.jpg")
    with pytest.raises(ConfigError, match="would overwrite the input image"):
        output_names([image], tmp_path)


def test_check_out_folder_and_resize_rule(tmp_path: Path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        check_out_folder(tmp_path / "f")
    with pytest.raises(ConfigError, match="'.*f' is a file, not a folder"):
        check_out_folder(tmp_path / "f" / "sub")
    check_out_folder(tmp_path / "new" / "deeper")  # to be created: fine
    check_resize(None, None)
    check_resize(800, 800)
    with pytest.raises(ConfigError, match="need --size <= --max-size, got --size 900 and --max-size 800"):
        check_resize(900, 800, ("--size", "--max-size"))
    with pytest.raises(ConfigError, match="max_size must be >= 1, got 0"):
        check_resize(None, 0)


def test_a_picture_that_cannot_be_written_keeps_its_detections(tmp_path: Path, caplog):
    """JPEG stops at 65,500 pixels a side: the picture is a warning, its records go to predictions.json."""
    wide = tmp_path / "in" / "wide.png"
    wide.parent.mkdir()
    Image.new("RGB", (65_600, 16)).save(wide)
    with caplog.at_level(logging.WARNING, logger="dinodet"):
        summary = predict_to_folder(OneBox(), [wide], tmp_path / "out")
    assert "cannot write" in caplog.text and "wide.jpg" in caplog.text and "predictions.json" in caplog.text
    assert (summary.done, len(summary.records)) == (1, 1) and summary.records[0]["file_name"] == "wide.png"
    assert json.loads(summary.predictions.read_text()) == summary.records
    assert not (tmp_path / "out" / "wide.jpg").exists()


def test_a_users_file_is_refused_before_the_detector_is_built(tmp_path: Path):
    (image,) = _images(tmp_path / "in", "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.jpg").write_bytes(b"the user's")

    class NeverBuilt(DetectorOptions):
        def build(self):
            raise AssertionError("built before the outputs were checked")

    with pytest.raises(ConfigError, match="holds 'a.jpg', which dinodet did not write"):
        predict_to_folder(NeverBuilt(), [image], tmp_path / "out")
    assert (tmp_path / "out" / "a.jpg").read_bytes() == b"the user's"
    summary = predict_to_folder(OneBox(), [image], tmp_path / "out", overwrite=True)
    assert summary.done == 1 and Image.open(tmp_path / "out" / "a.jpg").size == (8, 6)
