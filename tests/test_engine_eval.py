"""COCO evaluation: batch-size independence, pycocotools scoring, category mapping."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import COCO128

from dinodet.config import DataConfig
from dinodet.data.coco import build_dataset
from dinodet.engine.evaluate import (
    COCO_STATS,
    category_mapping,
    coco_metrics,
    coco_scores,
    evaluate,
    format_metrics,
    format_per_class,
    same_size_groups,
)
from dinodet.engine.pictures import PER_CLASS_AP, PR_CURVE, write_eval_pictures
from dinodet.files import record_outputs
from dinodet.inference.detector import Detector
from dinodet.inference.records import coco_records

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
    none = coco_metrics(coco, [])  # nothing detected: 0 where there is GT, -1 (n/a) where there is none
    assert none["AP"] == none["AP50"] == none["AR100"] == 0.0 and set(none.values()) <= {0.0, -1.0}
    assert "AP @[.50:.95]  1.0000" in format_metrics(m)


def test_coco_records_convert_boxes_and_map_categories():
    scores, labels = torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0, 1, 2])
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 2.0, 2.0]])
    records = coco_records(scores, labels, boxes, image_id=7, category_ids=[3, None, 9])
    assert records == [
        {"image_id": 7, "category_id": 3, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 9, "bbox": [1.0, 1.0, 1.0, 1.0], "score": pytest.approx(0.1)},
    ]


def test_coco_records_for_files_are_rounded_and_keep_category_ids():
    scores, cats = torch.tensor([0.123456789]), torch.tensor([18])
    boxes = torch.tensor([[1.23456, 2.0, 11.0, 4.5]])
    assert coco_records(scores, cats, boxes, file_name="a.jpg", rounded=True) == [
        {"file_name": "a.jpg", "category_id": 18, "bbox": [1.23, 2.0, 9.77, 2.5], "score": 0.12346}]
    with pytest.raises(ValueError, match="image_id, file_name or both"):
        coco_records(scores, cats, boxes)


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


def _perfect(coco, skip_image: int | None = None) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in coco.dataset["annotations"] if not a.get("iscrowd") and a["image_id"] != skip_image]


def test_per_class_ap_and_precision_recall_curves(mixed_sizes):
    coco = mixed_sizes.coco
    scores = coco_scores(coco, _perfect(coco))
    with_gt = {coco.cats[a["category_id"]]["name"] for a in coco.dataset["annotations"]}
    assert set(scores.per_class) == {c["name"] for c in coco.dataset["categories"]}  # every dataset class
    for name, v in scores.per_class.items():
        assert v == ({"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)} if name in with_gt
                     else {"AP": -1.0, "AP50": -1.0}), name
    assert len(scores.pr_curves["recall"]) == 101 and scores.pr_curves["recall"][-1] == 1.0
    assert scores.pr_curves["IoU=0.50"] == [pytest.approx(1.0)] * 101
    # perfect detections: every GT box on the diagonal of the confusion matrix, no background
    confusion = scores.confusion
    assert confusion["classes"] == [*scores.per_class, "background"] and (confusion["iou"], confusion["score"]) == (0.5, 0.25)
    counts = confusion["counts"]
    assert [counts[k][k] for k in range(len(counts) - 1)] == [sum(row) for row in counts[:-1]]
    assert sum(map(sum, counts)) == len(_perfect(coco)) and counts[-1][-1] == 0
    # one class's detections gone: that class scores 0, the others stay perfect, the mean curve drops
    person = next(c["id"] for c in coco.dataset["categories"] if c["name"] == "person")
    scores = coco_scores(coco, [r for r in _perfect(coco) if r["category_id"] != person])
    assert scores.per_class["person"] == {"AP": 0.0, "AP50": 0.0}
    assert scores.per_class["bowl"]["AP"] == pytest.approx(1.0)
    assert 0.0 < scores.pr_curves["IoU=0.50"][0] < 1.0
    table = format_per_class(scores.per_class)
    assert "person" in table and "0.000" in table and " -" in table  # classes without GT show "-"
    assert len(table.splitlines()) == -(-len(scores.per_class) // 3)


def test_scores_on_a_subset_of_the_images(mixed_sizes):
    coco = mixed_sizes.coco
    dropped = mixed_sizes.image_ids[0]
    records = _perfect(coco, skip_image=dropped)
    assert coco_scores(coco, records).metrics["AP"] < 0.99  # the image counts, as misses
    kept = [i for i in mixed_sizes.image_ids if i != dropped]
    assert coco_scores(coco, records, kept).metrics["AP"] == pytest.approx(1.0)


def test_unreadable_images_are_reported_and_left_out(tmp_path: Path, mixed_sizes):
    """A corrupt image file: the evaluation goes on without it and scores the others only."""
    import shutil

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(len(mixed_sizes)):
        shutil.copy(mixed_sizes.image_path(i), folder)
    broken = mixed_sizes.image_path(2).name
    (folder / broken).write_bytes(b"\xff\xd8 not a jpeg")
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(mixed_sizes.coco.dataset))
    dataset = build_dataset(tmp_path, "x", train=False, data_cfg=DataConfig(eval_size=64, max_size=96),
                            ann_file=ann, img_dir=folder)
    model = Detector.from_random("tiny", seed=0, num_classes=dataset.label_map.num_classes).model
    result = evaluate(model, dataset, dataset.label_map.category_ids, device=torch.device("cpu"),
                      batch_size=3, num_select=20)
    bad_id = dataset.image_ids[2]
    assert result.unreadable_ids == [bad_id]
    assert result.metrics["num_images"] == NUM_IMAGES - 1 and result.metrics["unreadable_images"] == 1
    assert isinstance(result.metrics["num_images"], int)
    assert bad_id not in {r["image_id"] for r in result.records}
    assert len(result.records) == (NUM_IMAGES - 1) * 20
    assert dataset.report.unreadable_images == 1
    kept = [i for i in dataset.image_ids if i != bad_id]
    assert result.metrics["AP"] == coco_scores(dataset.coco, result.records, kept).metrics["AP"]
    kept_gt = [a for a in dataset.coco.dataset["annotations"] if a["image_id"] in kept and not a.get("iscrowd")]
    assert sum(map(sum, result.confusion["counts"][:-1])) == len(kept_gt)  # the unreadable image's GT left out

    written = write_eval_pictures(result, dataset, tmp_path / "out", pictures=NUM_IMAGES, threshold=0.0)
    assert {p.name for p in written} == {PR_CURVE, PER_CLASS_AP, "val_predictions"}
    pictures = sorted(p.name for p in (tmp_path / "out" / "val_predictions").glob("*.jpg"))
    assert len(pictures) == NUM_IMAGES - 1 and f"{Path(broken).stem}.jpg" not in pictures


def test_pictures_of_an_evaluation_without_detections(tmp_path: Path, mixed_sizes):
    from dinodet.engine.evaluate import EvalResult

    coco = mixed_sizes.coco
    with_gt = {coco.cats[a["category_id"]]["name"] for a in coco.dataset["annotations"]}
    scores = coco_scores(coco, [])
    assert all(v["AP"] == (0.0 if n in with_gt else -1.0) for n, v in scores.per_class.items())
    assert scores.pr_curves["IoU=0.50"] == [0.0] * 101
    result = EvalResult(metrics=scores.metrics, per_class=scores.per_class, pr_curves=scores.pr_curves)
    written = write_eval_pictures(result, mixed_sizes, tmp_path, pictures=2)
    assert [p.name for p in written] == [PR_CURVE, PER_CLASS_AP, "val_predictions"]
    assert len(list((tmp_path / "val_predictions").glob("*.jpg"))) == 2
    (tmp_path / "val_predictions" / "from_an_earlier_run.jpg").write_bytes(b"old")
    record_outputs(tmp_path / "val_predictions", ["from_an_earlier_run.jpg"], "eval")
    (tmp_path / "val_predictions" / "users.jpg").write_bytes(b"not dinodet's")
    write_eval_pictures(result, mixed_sizes, tmp_path, pictures=1)  # dinodet's pictures show this run only
    assert sorted(p.name for p in (tmp_path / "val_predictions").glob("*.jpg")) == [
        f"{mixed_sizes.image_path(0).stem}.jpg", "users.jpg"]

    # no image scored at all (every one unreadable): nothing to plot, no error
    nothing = coco_scores(coco, [], image_ids=[])
    assert nothing.metrics["AP"] == -1.0 and set(nothing.pr_curves) == {"recall"}
    result = EvalResult(metrics=nothing.metrics, per_class=nothing.per_class, pr_curves=nothing.pr_curves)
    assert write_eval_pictures(result, mixed_sizes, tmp_path / "none", pictures=0) == []


def test_per_class_keys_tell_apart_classes_of_the_same_name(tmp_path: Path, mixed_sizes):
    data = json.loads(json.dumps(mixed_sizes.coco.dataset))
    first, second = data["categories"][:2]
    second["name"] = first["name"]
    from dinodet.data.coco import make_coco

    per_class = coco_scores(make_coco(data), []).per_class
    assert f"{first['name']} (id {first['id']})" in per_class and f"{first['name']} (id {second['id']})" in per_class
    assert len(per_class) == len(data["categories"])


def test_pictures_of_images_sharing_a_stem_are_all_kept(tmp_path: Path):
    from PIL import Image

    from dinodet.engine.pictures import write_label_pictures

    class TwoFolders:  # "a/x.jpg" and "b/x.jpg": one stem, two images
        image_ids = (11, 12)
        label_map = type("LabelMap", (), {"class_names": ["thing"]})()

        def __len__(self):
            return 2

        def image_path(self, i):
            return tmp_path / "ab"[i] / "x.jpg"

        def load_image(self, i):
            return Image.new("RGB", (20 + i, 10))

        def raw_target(self, i):
            return {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([0])}

    assert write_label_pictures(TwoFolders(), tmp_path / "out", limit=5) == 2
    widths = {p.name: Image.open(p).width for p in (tmp_path / "out").glob("*.jpg")}
    assert widths == {"x.jpg": 20, "x_12.jpg": 21}


def test_a_detection_runner_evaluates_like_its_module(mixed_sizes):
    """``evaluate`` takes an exported model's runtime (``run(images, mask, orig_sizes) -> Detections`` on
    CPU tensors) in place of a module: a runner wrapping the same model gives the same records."""
    from dinodet.engine.evaluate import DetectionRunner
    from dinodet.models.postprocess import postprocess

    model = Detector.from_random("tiny", seed=0, num_classes=mixed_sizes.label_map.num_classes).model.eval()
    calls = []

    class Runner:
        num_select = 50

        def run(self, images, mask, orig_sizes):
            calls.append((images.device.type, tuple(images.shape), bool(mask.any())))
            with torch.no_grad():
                out = model(images, mask)
            return postprocess(out.pred_logits, out.pred_boxes, orig_sizes, self.num_select)

    assert isinstance(Runner(), DetectionRunner)
    ref, got = _evaluate(model, mixed_sizes, 2), _evaluate(Runner(), mixed_sizes, 2)
    assert got.records == ref.records and got.metrics == ref.metrics
    assert len(calls) == NUM_IMAGES and all(dev == "cpu" and not padded for dev, _, padded in calls)
    assert model.training is False
