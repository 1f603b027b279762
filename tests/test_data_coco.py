"""COCO-format loading of coco128 (the 12 images vendored in tests/data/coco128_mini), label maps, crowd handling and the evaluation ground truth."""
from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import COCO128
from pycocotools.cocoeval import COCOeval

from dinodet.config import DataConfig
from dinodet.data.coco import DetectionDataset, build_dataset, resolve_coco_paths
from dinodet.data.labels import LabelMap
from dinodet.data.report import DatasetError

# small resolutions keep the transforms cheap; the policy itself is tested in test_data_augment.py
SMALL = DataConfig(train_scales=(96, 128), max_size=192, crop_resize_scales=(96, 128), crop_size=(64, 96),
                   eval_size=128, num_workers=0)
ANN = COCO128 / "annotations" / "instances_train2017.json"


@pytest.fixture(scope="module")
def coco128_json() -> dict:
    return json.loads(ANN.read_text())


@pytest.fixture(scope="module")
def coco128_train() -> DetectionDataset:
    return build_dataset(str(COCO128), "train", "coco", train=True, data_cfg=SMALL)


def self_eval_ap(coco_gt) -> list[float]:
    """COCOeval of the ground truth against itself (non-crowd boxes as detections, score 1)."""
    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
           for a in coco_gt.dataset["annotations"] if not a["iscrowd"]]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(res)
        ev = COCOeval(coco_gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats[:3]]


def test_coco128_layout_is_found():
    ann, img_dir = resolve_coco_paths(COCO128, "train")
    assert ann == ANN and img_dir == COCO128 / "images" / "train2017"
    with pytest.raises(DatasetError, match="annotations of split 'val' not found"):
        resolve_coco_paths(COCO128, "val")


def test_coco128_counts_and_label_map(coco128_train: DetectionDataset, coco128_json: dict):
    ds = coco128_train
    assert len(ds) == 12
    r = ds.report
    assert (r.images, r.boxes, r.images_without_boxes) == (12, 72, 1)  # tests/data/README.md
    assert r.ok and r.num_classes == 80
    lm = ds.label_map
    assert lm.num_classes == 80
    assert lm.category_ids == sorted(c["id"] for c in coco128_json["categories"])
    assert lm.index_of(1) == 0 and lm.index_of(90) == 79 and lm.class_names[0] == "person"
    assert ds.image_ids == sorted(im["id"] for im in coco128_json["images"])
    # the evaluation GT has the dataset's own ids
    assert sorted(ds.coco.getImgIds()) == ds.image_ids
    assert sorted(ds.coco.getCatIds()) == lm.category_ids
    assert len(ds.coco.dataset["annotations"]) == 72


def test_coco128_targets(coco128_train: DetectionDataset, coco128_json: dict):
    ds = coco128_train
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco128_json["images"]}
    per_image = Counter(a["image_id"] for a in coco128_json["annotations"])
    torch.manual_seed(0)
    for i in range(len(ds)):
        image, target = ds[i]
        iid = int(target["image_id"])
        assert iid == ds.image_ids[i]
        assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0
        assert target["orig_size"].tolist() == list(sizes[iid])
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert target["size"].tolist() == list(image.shape[1:])
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert boxes.shape == (labels.shape[0], 4)
        assert labels.shape[0] <= per_image[iid]  # the random crop may drop some
        assert ((labels >= 0) & (labels < 80)).all()
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        assert (xyxy >= -1e-5).all() and (xyxy <= 1 + 1e-5).all() and (boxes[:, 2:] > 0).all()


def test_eval_targets_keep_all_boxes_and_labels(coco128_json: dict):
    ds = build_dataset(str(COCO128), "train", "coco", train=False, data_cfg=SMALL)
    first = coco128_json["images"][0]["id"]
    i = ds.image_ids.index(first)
    image, target = ds[i]
    anns = sorted((a for a in coco128_json["annotations"] if a["image_id"] == first), key=lambda a: a["id"])
    assert target["labels"].tolist() == [ds.label_map.index_of(a["category_id"]) for a in anns]
    h, w = target["orig_size"].tolist()
    expected = torch.tensor([[(a["bbox"][0] + a["bbox"][2] / 2) / w, (a["bbox"][1] + a["bbox"][3] / 2) / h,
                              a["bbox"][2] / w, a["bbox"][3] / h] for a in anns])
    torch.testing.assert_close(target["boxes"], expected, atol=1e-5, rtol=0)
    assert min(image.shape[1:]) == 128  # eval_size


def test_crowd_excluded_from_targets_but_kept_for_eval():
    ds = build_dataset(str(COCO128), "train", "coco", train=False, data_cfg=SMALL,
                       ann_file="annotations/instances_train2017_coco_original.json")
    assert ds.report.crowd_ignored == 2
    assert ds.report.boxes == 72  # 74 annotations minus 2 crowd
    anns = ds.coco.dataset["annotations"]
    assert len(anns) == 74 and sum(a["iscrowd"] for a in anns) == 2
    assert all("segmentation" not in a for a in anns)  # bbox-only GT
    assert sum(int(ds.raw_target(i)["labels"].numel()) for i in range(len(ds))) == 72
    assert self_eval_ap(ds.coco) == [1.0, 1.0, 1.0]


def test_given_label_map_reports_unknown_categories():
    full = LabelMap.from_categories(json.loads(ANN.read_text())["categories"])
    keep = [i for i, cid in enumerate(full.category_ids) if cid != 1]  # drop 'person'
    lm = LabelMap([full.class_names[i] for i in keep], [full.category_ids[i] for i in keep])
    ds = build_dataset(str(COCO128), "train", "coco", train=False, data_cfg=SMALL, label_map=lm)
    n_person = sum(1 for a in json.loads(ANN.read_text())["annotations"] if a["category_id"] == 1)
    assert ds.label_map is lm and ds.label_map.num_classes == 79
    assert ds.report.unknown_category == n_person and ds.report.boxes == 72 - n_person
    assert any("category id 1 " in m for m in ds.report.messages)
    assert 1 not in ds.coco.getCatIds()
    assert all(a["category_id"] != 1 for a in ds.coco.dataset["annotations"])


def test_label_map_roundtrip_and_errors():
    lm = LabelMap(["cat", "dog"], [17, 3])
    assert lm.num_classes == 2 and lm.index_of(3) == 1 and lm.get_index(5) is None and 17 in lm
    assert LabelMap.from_dict(json.loads(json.dumps(lm.to_dict()))) == lm
    assert LabelMap.from_names(["a", "b", "c"]).category_ids == [0, 1, 2]
    with pytest.raises(KeyError, match="category id 5"):
        lm.index_of(5)
    with pytest.raises(ValueError, match="appears twice"):
        LabelMap(["a", "b"], [1, 1])
    with pytest.raises(ValueError, match="2 names but 1"):
        LabelMap(["a", "b"], [1])


def test_unusable_dataset_raises_clear_error(tmp_path: Path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot parse annotation file"):
        build_dataset(str(tmp_path), "train")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        build_dataset(str(tmp_path), "train", format="labelme")  # voc is a layout now
    with pytest.raises(DatasetError, match="dataset root not found"):
        build_dataset(str(tmp_path / "nope"), "train")


@pytest.mark.parametrize("text", ["{\"images\": " + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000])
def test_pathological_json_is_one_clear_error(tmp_path: Path, text: str):
    from dinodet.data.coco import load_json
    from dinodet.data.report import DatasetError

    path = tmp_path / "instances_train2017.json"
    path.write_text(text)
    with pytest.raises(DatasetError, match="cannot parse annotation file .*instances_train2017.json"):
        load_json(path)


def test_a_negative_area_is_replaced_by_the_box_area(tmp_path: Path):
    """COCOeval files a box by its "area"; a negative one fits no area range and would be ignored."""
    data = json.loads(ANN.read_text())
    first = data["annotations"][0]
    first["area"] = -5.0
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    ds = build_dataset(str(COCO128), "train", "coco", train=False, data_cfg=SMALL, ann_file=ann,
                       img_dir=COCO128 / "images" / "train2017")
    kept = next(a for a in ds.coco.dataset["annotations"] if a["id"] == first["id"])
    w, h = first["bbox"][2:]
    assert kept["area"] == pytest.approx(w * h)
