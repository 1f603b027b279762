"""What other tools expect of ``dinodet predict``'s predictions.json: image ids that ``COCO.loadRes``
and COCOeval accept (from ``--image-info``), class names, and the ``--classes`` / ``--max-det`` selection."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dinodet.cli import main

DATA = Path(__file__).parent / "data" / "coco128_mini"
ANNOTATIONS = DATA / "annotations" / "instances_train2017.json"
IMAGES = [DATA / "images" / "train2017" / name for name in ("000000000009.jpg", "000000000025.jpg", "000000000030.jpg")]
TINY = ["--random-weights", "--preset", "tiny", "--size", "64", "--max-size", "96", "--threshold", "0",
        "--no-save-images"]


def predict(out: Path, *args: str | Path, images: list[Path] = IMAGES) -> list[dict]:
    rc = main(["predict", *map(str, images), *TINY, "--out", str(out), *map(str, args)])
    assert rc == 0
    return json.loads((out / "predictions.json").read_text())


def test_image_info_gives_ids_that_cocoeval_scores(tmp_path: Path):
    records = predict(tmp_path / "out", "--image-info", ANNOTATIONS)
    ids = {img["file_name"]: img["id"] for img in json.loads(ANNOTATIONS.read_text())["images"]}
    assert records and all(r["image_id"] == ids[r["file_name"]] for r in records)
    assert set(records[0]) == {"image_id", "file_name", "category_id", "class_name", "bbox", "score"}
    gt = COCO(str(ANNOTATIONS))
    evaluator = COCOeval(gt, gt.loadRes(str(tmp_path / "out" / "predictions.json")), "bbox")
    evaluator.params.imgIds = sorted({r["image_id"] for r in records})
    evaluator.evaluate()
    evaluator.accumulate()
    assert len(evaluator.evalImgs) > 0


def test_without_image_info_ids_are_1_to_n_in_input_order(tmp_path: Path):
    records = predict(tmp_path / "out", images=IMAGES[:2])
    assert {r["file_name"]: r["image_id"] for r in records} == {IMAGES[0].name: 1, IMAGES[1].name: 2}


def test_an_image_missing_from_image_info_is_a_warning_and_left_out(tmp_path: Path, capsys):
    stranger = tmp_path / "stranger.jpg"
    shutil.copy(IMAGES[0], stranger)
    records = predict(tmp_path / "out", "--image-info", ANNOTATIONS, images=[IMAGES[1], stranger])
    assert {r["file_name"] for r in records} == {IMAGES[1].name}
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "are not in" in ln]
    assert len(warnings) == 1 and "1 image(s)" in warnings[0] and "stranger.jpg" in warnings[0]


def test_classes_by_name_and_id_and_max_det(tmp_path: Path):
    records = predict(tmp_path / "a", "--classes", "person,3", images=IMAGES[:2])
    assert records and {(r["category_id"], r["class_name"]) for r in records} <= {(1, "person"), (3, "car")}
    capped = predict(tmp_path / "b", "--max-det", "2", images=IMAGES[:2])
    assert Counter(r["image_id"] for r in capped) == {1: 2, 2: 2}


def test_an_unknown_class_name_is_one_line(tmp_path: Path, capsys):
    rc = main(["predict", str(IMAGES[0]), *TINY, "--out", str(tmp_path / "out"), "--classes", "persn"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("dinodet: warning:")]
    assert rc == 2 and len(err) == 1 and "unknown class name(s) 'persn'" in err[0] and "person" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [(["--max-det", "0"], "--max-det must be >= 1"),
                                            (["--image-info", "missing.json"], "--image-info 'missing.json'")])
def test_bad_selection_or_image_info_fails_before_the_model(tmp_path: Path, capsys, args, fragment):
    rc = main(["predict", str(IMAGES[0]), *TINY, "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and "RANDOM weights" not in err  # no model was built
