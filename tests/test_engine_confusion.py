"""Confusion matrix: greedy IoU matching on a hand-made image, COCO accumulation, its chart, and
the files of eval --out and of a training run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinodet.config import ConfigError, apply_overrides
from dinodet.data.coco import build_dataset, make_coco
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.engine.confusion import CONFUSION_MATRIX, coco_confusion, confusion_matrix, write_confusion_chart
from dinodet.engine.eval_checkpoint import CheckpointEvaluation, write_eval_outputs
from dinodet.engine.evaluate import EvalResult, coco_scores
from dinodet.engine.run_dir import RUN_OUTPUTS
from dinodet.engine.train import TrainOptions, train
from dinodet.files import dinodet_outputs
from dinodet.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_thread")

BG = 2  # background's row and column with two classes


def test_hand_made_image_counts_every_kind_of_outcome():
    gt_boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
    gt_labels = [0, 1, 0]
    dets = [  # box, label, score
        ([0, 0, 10, 10], 0, 0.90),   # correct: GT 0 as class 0
        ([0, 0, 10, 9], 1, 0.95),    # duplicate on GT 0 (IoU 0.9 < 1.0: loses despite its score): background FP
        ([20, 20, 30, 30], 0, 0.70),  # wrong class: GT class 1 predicted as 0
        ([60, 60, 70, 70], 1, 0.60),  # nothing there: background FP
        ([40, 40, 50, 50], 0, 0.25),  # not above the score threshold: GT 2 is missed
    ]
    boxes, labels, scores = zip(*dets)
    counts = confusion_matrix(gt_boxes, gt_labels, boxes, labels, scores, num_classes=2)
    assert counts.tolist() == [[1, 0, 1],   # GT 0: one right, one missed
                               [1, 0, 0],   # GT 1: taken for class 0
                               [0, 2, 0]]   # background: the duplicate and the FP, both class 1
    assert counts[:BG].sum() == len(gt_boxes)  # every GT counted once
    assert counts[:, :BG].sum() == sum(s > 0.25 for s in scores)  # every kept detection once


def test_iou_threshold_and_empty_images():
    # IoU 0.45 with the GT: not a match at 0.5 (a miss and a FP), a match at 0.4
    gt, det = [[0, 0, 10, 10]], [[0, 0, 10, 4.5]]
    assert confusion_matrix(gt, [1], det, [1], [0.9], 2).tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert confusion_matrix(gt, [1], det, [1], [0.9], 2, iou=0.4).tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert confusion_matrix([], [], [], [], [], 2).tolist() == [[0] * 3] * 3
    assert confusion_matrix([], [], det, [0], [0.3], 2)[BG].tolist() == [1, 0, 0]
    assert confusion_matrix(gt, [0], [], [], [], 2)[:, BG].tolist() == [1, 0, 0]


def test_a_detection_goes_to_the_gt_box_of_highest_iou():
    gt = [[5, 0, 15, 10], [0, 0, 10, 10]]
    det = [[2, 0, 12, 10]]  # IoU 0.54 with the first GT (class 1), 0.67 with the second (class 0)
    assert confusion_matrix(gt, [1, 0], det, [1], [0.9], 2).tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 0]]


def _coco() -> dict:
    return {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"},
                   {"id": 2, "width": 100, "height": 100, "file_name": "b.jpg"}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [10, 10, 10, 10], "area": 100, "iscrowd": 0},
        ],
    }


def test_coco_confusion_leaves_out_crowd_boxes_and_other_images():
    coco = make_coco(_coco())
    records = [  # xywh, dataset category ids; classes in sorted id order: dog (3), cat (7)
        {"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.9},   # dog taken for a cat
        {"image_id": 1, "category_id": 7, "bbox": [50, 50, 20, 20], "score": 0.9},  # on the crowd box: a FP
        {"image_id": 2, "category_id": 7, "bbox": [10, 10, 10, 10], "score": 0.8},  # right
    ]
    result = coco_confusion(coco, records, ["dog", "cat"])
    assert result == {"iou": 0.5, "score": 0.25, "classes": ["dog", "cat", "background"],
                      "counts": [[0, 1, 0], [0, 1, 0], [0, 1, 0]]}
    only_2 = coco_confusion(coco, records, ["dog", "cat"], image_ids=[2], score=0.85)
    assert only_2["counts"] == [[0, 0, 0], [0, 0, 1], [0, 0, 0]] and only_2["score"] == 0.85


def test_chart_is_written_and_nothing_to_count_is_no_chart(tmp_path: Path):
    coco = make_coco(_coco())
    confusion = coco_confusion(coco, [], ["dog", "cat"])
    assert write_confusion_chart(confusion, tmp_path) == [tmp_path / CONFUSION_MATRIX]
    with Image.open(tmp_path / CONFUSION_MATRIX) as image:
        assert image.format == "PNG"
    empty = {**confusion, "counts": np.zeros((3, 3), dtype=int).tolist()}
    assert write_confusion_chart(empty, tmp_path / "none") == []
    assert not (tmp_path / "none").exists()


def test_chart_of_many_classes(tmp_path: Path):
    from dinodet.engine.plots import plot_confusion_matrix

    num_classes = 80  # too many to write the counts in the cells
    counts = np.eye(num_classes + 1, dtype=int).tolist()
    names = [f"class {k}" for k in range(num_classes)] + ["background"]
    path = plot_confusion_matrix({"iou": 0.5, "score": 0.25, "classes": names, "counts": counts},
                                 tmp_path / CONFUSION_MATRIX)
    assert path.is_file()


def test_eval_out_and_training_write_the_matrix_and_never_a_users_file(tmp_path: Path):
    root = make_synthetic_coco(tmp_path / "shapes", num_train=4, num_val=2, image_size=(64, 64), seed=0)
    val = build_dataset(root, "val", train=False)
    scores = coco_scores(val.coco, [])
    result = EvalResult(metrics=scores.metrics, per_class=scores.per_class, pr_curves=scores.pr_curves,
                        confusion=scores.confusion)
    evaluation = CheckpointEvaluation(result=result, dataset=val, split="val", checkpoint="c.pt", mode="exact",
                                      ema_weights=False)
    out = tmp_path / "eval"
    assert out / CONFUSION_MATRIX in write_eval_outputs(evaluation, out, pictures=0)
    assert json.loads((out / "metrics.json").read_text())["confusion_matrix"] == scores.confusion
    assert CONFUSION_MATRIX in dinodet_outputs(out)
    users = tmp_path / "users"
    users.mkdir()
    (users / CONFUSION_MATRIX).write_bytes(b"the user's")
    with pytest.raises(ConfigError, match=CONFUSION_MATRIX):
        write_eval_outputs(evaluation, users, pictures=0)
    assert (users / CONFUSION_MATRIX).read_bytes() == b"the user's"

    # the end of a (one-step) training run
    cfg = apply_overrides(get_preset("tiny"), [
        "data.train_scales=[64]", "data.max_size=64", "data.eval_size=64", "data.num_workers=0",
        "data.crop_resize_scales=[64]", "data.crop_size=[32,64]", "model.num_queries=20", "model.num_select=20",
        "train.epochs=1", "train.batch_size=4"])
    tr = build_dataset(root, "train", train=False, data_cfg=cfg.data)
    va = build_dataset(root, "val", train=False, data_cfg=cfg.data, label_map=tr.label_map)
    train(cfg, tr, va, TrainOptions(run_dir=tmp_path / "run", progress=False, tensorboard=False, pictures=0))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["confusion_matrix"]["classes"] == [*tr.label_map.class_names, "background"]
    assert (tmp_path / "run" / CONFUSION_MATRIX).is_file() and CONFUSION_MATRIX in RUN_OUTPUTS
