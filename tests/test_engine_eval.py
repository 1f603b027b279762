"""COCO evaluation: batch-size independence, pycocotools scoring, category mapping."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinodet.config import DataConfig
from dinodet.data.coco import build_dataset
from dinodet.engine.evaluate import (
    COCO_STATS,
    category_mapping,
    coco_metrics,
    coco_records,
    evaluate,
    format_metrics,
    same_size_groups,
)
from dinodet.inference import Detector

COCO128 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128"
NUM_IMAGES = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory: pytest.TempPathFactory):
    """The first coco128 images (several sizes and aspect ratios) as a small COCO split."""
    gt = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    images = gt["images"][:NUM_IMAGES]
    ids = {im["id"] for im in images}
    subset = {**gt, "images": images, "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
    ann = tmp_path_factory.mktemp("mixed") / "instances.json"
    ann.write_text(json.dumps(subset))
    data_cfg = DataConfig(eval_size=96, max_size=128, num_workers=0)
    return build_dataset(COCO128, "train", train=False, data_cfg=data_cfg, ann_file=ann,
                         img_dir=COCO128 / "images" / "train2017")


def _evaluate(model, dataset, batch_size: int):
    return evaluate(model, dataset, dataset.label_map.category_ids, device=torch.device("cpu"),
                    batch_size=batch_size, num_select=50)


def test_ap_does_not_depend_on_the_eval_batch_size(mixed_sizes):
    assert len({tuple(mixed_sizes[i][0].shape) for i in range(len(mixed_sizes))}) >= 3  # padding would happen
    model = Detector.from_random("tiny", seed=0, num_classes=mixed_sizes.label_map.num_classes).model
    one, four = _evaluate(model, mixed_sizes, 1), _evaluate(model, mixed_sizes, 4)
    assert one.records == four.records  # bit-identical detections, so identical AP
    assert one.metrics == four.metrics
    assert len(one.records) == NUM_IMAGES * 50
    assert {r["image_id"] for r in one.records} == set(mixed_sizes.image_ids)


def test_coco_metrics_perfect_predictions_and_none(mixed_sizes):
    coco = mixed_sizes.coco
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in coco.dataset["annotations"] if not a.get("iscrowd")]
    m = coco_metrics(coco, perfect)
    assert set(m) == set(COCO_STATS)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    assert all(-1.0 <= v <= 1.0 for v in m.values())
    assert coco_metrics(coco, []) == dict.fromkeys(COCO_STATS, 0.0)
    assert "AP @[.50:.95]  1.0000" in format_metrics(m)


def test_coco_records_convert_boxes_and_map_categories():
    scores, labels = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0, 1, 2])
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 2.0, 2.0]])
    records = coco_records(scores, labels, boxes, image_id=7, category_ids=[3, None, 9])
    assert records == [
        {"image_id": 7, "category_id": 3, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 9, "bbox": [1.0, 1.0, 1.0, 1.0], "score": pytest.approx(0.1)},
    ]


def test_same_size_groups_keep_order():
    items = [(torch.zeros(3, h, w), {}) for h, w in [(4, 6), (6, 4), (4, 6), (5, 5), (6, 4)]]
    assert same_size_groups(items) == [[0, 2], [1, 4], [3]]


def test_category_mapping_by_id_then_by_name():
    # a model trained on this dataset, or the official COCO layout on COCO-format data: by id
    mapping, how = category_mapping(["cat", "dog"], [17, 18], ["dog"], [18])
    assert (mapping, how) == ([17, 18], "id")
    # YOLO-format data (ids 0..) with a COCO-id model: by name; unknown classes dropped
    mapping, how = category_mapping(["N/A", "person", "bicycle"], [0, 1, 2], ["Bicycle", "person"], [0, 1])
    assert (mapping, how) == ([None, 1, 0], "name")
    with pytest.raises(ValueError, match="none of the model's classes"):
        category_mapping(["a"], [1], ["b"], [2])
