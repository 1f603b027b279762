"""What other tools expect of ``dinodet predict``'s outputs: image ids that ``COCO.loadRes`` and COCOeval
accept (from ``--image-info``), class names, the ``--classes`` / ``--max-det`` / ``--agnostic-nms``
selection, ``--one-label-per-query``, and the YOLO labels / CSV of ``--save-txt`` / ``--save-csv``."""
from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert, box_iou

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


# --------------------------------------------------------------------------- --save-txt / --save-csv


def test_save_txt_and_csv_hold_the_detections_of_predictions_json(tmp_path: Path, one_thread):
    out = tmp_path / "out"
    records = predict(out, "--save-txt", "--save-csv", "--max-det", "5", images=IMAGES[:2])
    by_file = {name: [r for r in records if r["file_name"] == name] for name in (IMAGES[0].name, IMAGES[1].name)}
    for image in IMAGES[:2]:
        w, h = Image.open(image).size
        lines = [ln.split() for ln in (out / "labels" / f"{image.stem}.txt").read_text().splitlines()]
        assert len(lines) == 5
        for line, record in zip(lines, by_file[image.name]):
            x, y, bw, bh = record["bbox"]
            cx, cy, nw, nh = map(float, line[1:5])
            assert (cx * w, cy * h, nw * w, nh * h) == pytest.approx((x + bw / 2, y + bh / 2, bw, bh), abs=0.02)
            assert float(line[5]) == pytest.approx(record["score"], abs=1e-5) and int(line[0]) >= 0
    with (out / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "frame", "x", "y", "width", "height", "score", "category_id", "class_name"]
    assert [(r["file"], [float(r[k]) for k in ("x", "y", "width", "height")], float(r["score"]),
             int(r["category_id"]), r["class_name"], r["frame"]) for r in rows] == \
        [(r["file_name"], r["bbox"], r["score"], r["category_id"], r["class_name"], "") for r in records]
    # both are the run's own outputs: a second run replaces them; a user's label file is never touched
    assert "predictions.csv" in json.loads((out / ".dinodet-outputs.json").read_text())["files"]
    predict(out, "--save-txt", "--save-csv", "--max-det", "1", images=IMAGES[:2])
    assert len((out / "labels" / f"{IMAGES[0].stem}.txt").read_text().splitlines()) == 1
    user = tmp_path / "user"
    (user / "labels").mkdir(parents=True)
    (user / "labels" / f"{IMAGES[0].stem}.txt").write_text("mine")
    rc = main(["predict", str(IMAGES[0]), *TINY, "--out", str(user), "--save-txt"])
    assert rc == 2 and (user / "labels" / f"{IMAGES[0].stem}.txt").read_text() == "mine"


def test_save_txt_and_csv_for_video_frames(tmp_path: Path, one_thread):
    av = pytest.importorskip("av", reason="video tests need PyAV: pip install 'dinodet[video]'")
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(3):
            frame = np.full((64, 96, 3), 40 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "out"
    assert main(["predict", str(video), *TINY, "--out", str(out), "--save-txt", "--save-csv", "--max-det", "2"]) == 0
    assert sorted(p.name for p in (out / "labels").glob("*.txt")) == ["clip_0.txt", "clip_1.txt", "clip_2.txt"]
    with (out / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["frame"] for r in rows] == ["0", "0", "1", "1", "2", "2"] and {r["file"] for r in rows} == {str(video)}
    lines = [json.loads(ln) for ln in (out / "clip.jsonl").read_text().splitlines()]
    assert [float(r["score"]) for r in rows] == [d["score"] for ln in lines for d in ln["detections"]]


# ------------------------------------------------------------- --agnostic-nms / --one-label-per-query


def test_agnostic_nms_leaves_no_two_overlapping_boxes(tmp_path: Path, one_thread):
    def max_iou(records: list[dict]) -> float:
        boxes = box_convert(torch.tensor([r["bbox"] for r in records]), "xywh", "xyxy")
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        return float(iou.max())

    plain = predict(tmp_path / "a", images=IMAGES[:1])
    assert max_iou(plain) > 0.6  # the official top-k: one query may give the same box several classes
    kept = predict(tmp_path / "b", "--agnostic-nms", "0.6", images=IMAGES[:1])
    assert 0 < len(kept) < len(plain) and max_iou(kept) <= 0.6
    assert [r["score"] for r in kept] == sorted((r["score"] for r in kept), reverse=True)
    assert {json.dumps(r) for r in kept} <= {json.dumps(r) for r in plain}  # a subset, values unchanged


def test_agnostic_nms_api_keeps_the_higher_score_whatever_the_class():
    from dinodet.inference.detector import Prediction
    from dinodet.inference.predict import agnostic_nms

    pred = Prediction(boxes=torch.tensor([[0.0, 0, 10, 10], [0.5, 0, 10, 10], [20, 20, 30, 30]]),
                      scores=torch.tensor([0.9, 0.8, 0.7]), labels=torch.tensor([1, 2, 2]),
                      category_ids=torch.tensor([1, 2, 2]), class_names=["a", "b", "b"], image_size=(40, 40))
    kept = agnostic_nms(pred, 0.5)
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7]) and kept.class_names == ["a", "b"]


def test_one_label_per_query_keeps_each_querys_best_class():
    from dinodet.models.postprocess import postprocess

    logits = torch.full((1, 3, 4), -9.0)
    logits[0, 0, 1], logits[0, 0, 2] = 3.0, 2.0  # query 0: two classes above the others
    logits[0, 1, 3], logits[0, 2, 0] = 1.0, 0.5
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]])
    sizes = torch.tensor([[100, 200]])
    official = postprocess(logits, boxes, sizes, num_select=3)
    assert official.labels.tolist() == [[1, 2, 3]]  # query 0 twice
    assert torch.equal(official.boxes[0, 0], official.boxes[0, 1])
    one = postprocess(logits, boxes, sizes, num_select=3, one_label_per_query=True)
    assert one.labels.tolist() == [[1, 3, 0]]
    assert one.scores[0].tolist() == pytest.approx(torch.sigmoid(torch.tensor([3.0, 1.0, 0.5])).tolist())
    assert torch.allclose(one.boxes[0, 1], torch.tensor([30.0, 15.0, 50.0, 25.0]))  # query 1, in pixels


def test_one_label_per_query_cli_gives_one_box_per_query(tmp_path: Path, capsys, one_thread):
    records = predict(tmp_path / "a", "--one-label-per-query", images=IMAGES[:1])
    boxes = [tuple(r["bbox"]) for r in records]
    assert len(boxes) == len(set(boxes))
    rc = main(["predict", str(IMAGES[0]), "--model", "m.onnx", "--out", str(tmp_path / "b"), "--one-label-per-query"])
    assert rc == 2 and "--one-label-per-query applies to the PyTorch backend" in capsys.readouterr().err
