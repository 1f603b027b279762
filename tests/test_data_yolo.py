"""YOLO-format loading: coco128's txt labels against its COCO json, names files, layouts, bad lines."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import COCO128
from PIL import Image
from test_data_coco import SMALL, self_eval_ap

from dinodet.config import DataConfig
from dinodet.data.coco import build_dataset
from dinodet.data.report import DatasetError
from dinodet.data.yolo import label_dir_for, read_names, resolve_yolo_paths


@pytest.fixture(scope="module")
def coco128_yolo():
    return build_dataset(str(COCO128), "train", "yolo", train=False, data_cfg=SMALL)


def test_coco128_yolo_matches_coco_json(coco128_yolo):
    ds = coco128_yolo
    data = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    # README: the json is derived from these labels, so counts must agree image by image
    assert len(ds) == 12 and ds.report.boxes == 72 and ds.report.images_without_boxes == 1
    assert ds.report.orphan_annotations == 0 and ds.report.ok
    assert ds.image_ids == sorted(im["id"] for im in data["images"])  # numeric file names = COCO ids
    yolo_counts = Counter(a["image_id"] for a in ds.coco.dataset["annotations"])
    json_counts = Counter(a["image_id"] for a in data["annotations"])
    assert yolo_counts == json_counts
    # YOLO category id = class index; names from names.txt
    assert ds.label_map.category_ids == list(range(80))
    assert ds.label_map.class_names[:3] == ["person", "bicycle", "car"]
    coco_name = {c["id"]: c["name"] for c in data["categories"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in ds.coco.dataset["images"]}
    assert sizes == {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    # same boxes (json rounded to 0.01 px) and the same class names, image by image
    for iid in (9, 30, 86):
        ya = sorted(ds.coco.imgToAnns[iid], key=lambda a: a["bbox"])
        ja = sorted((a for a in data["annotations"] if a["image_id"] == iid), key=lambda a: a["bbox"])
        assert [ds.label_map.class_names[a["category_id"]] for a in ya] == [coco_name[a["category_id"]] for a in ja]
        np.testing.assert_allclose([a["bbox"] for a in ya], [a["bbox"] for a in ja], atol=0.02)


def test_coco128_yolo_ground_truth_evaluates(coco128_yolo):
    assert self_eval_ap(coco128_yolo.coco) == [1.0, 1.0, 1.0]
    _, target = coco128_yolo[0]
    assert target["boxes"].shape[0] == target["labels"].shape[0] > 0


def test_yaml_names_and_split_dirs(tmp_path: Path):
    (tmp_path / "data.yaml").write_text("path: .\ntrain: imgs/tr\nval: imgs/va\nnames:\n  0: cat\n  1: dog\n")
    (tmp_path / "imgs" / "tr").mkdir(parents=True)
    assert read_names(tmp_path / "data.yaml") == ["cat", "dog"]
    images, labels, names_file = resolve_yolo_paths(tmp_path, "train")
    assert images == tmp_path / "imgs" / "tr" and labels == images and names_file == tmp_path / "data.yaml"
    (tmp_path / "list.yaml").write_text("names: ['a', 'b c']\n")
    assert read_names(tmp_path / "list.yaml") == ["a", "b c"]
    (tmp_path / "block.yaml").write_text("names:\n  - x\n  - y  # comment\nnc: 2\n")
    assert read_names(tmp_path / "block.yaml") == ["x", "y"]
    assert label_dir_for(Path("/d/images/train2017")) == Path("/d/labels/train2017")
    assert label_dir_for(Path("/d/train/images")) == Path("/d/train/labels")


def test_roboflow_layout_polygons_and_bad_lines(tmp_path: Path):
    img_dir, lbl_dir = tmp_path / "valid" / "images", tmp_path / "valid" / "labels"
    img_dir.mkdir(parents=True)
    lbl_dir.mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    for name in ("x1.png", "x2.png", "x3.png"):
        Image.new("RGB", (100, 50)).save(img_dir / name)
    (lbl_dir / "x1.txt").write_text(
        "0 0.5 0.5 0.2 0.4\n"          # ok
        "1 0.1 0.1 0.3 0.1 0.3 0.5\n"  # polygon -> box (0.1..0.3, 0.1..0.5)
        "1 0.5 0.5 0.2\n"              # too few fields
        "a b c d e\n"                  # not numbers
        "7 0.5 0.5 0.1 0.1\n"          # class 7 not in names
        "0 0.95 0.5 0.2 0.2\n")        # extends past the right edge -> clipped
    (lbl_dir / "x2.txt").write_text("")  # empty label file: a negative
    (lbl_dir / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    ds = build_dataset(str(tmp_path), "val", "yolo", train=False, data_cfg=DataConfig(eval_size=50, max_size=100))
    r = ds.report
    assert (r.images, r.boxes, r.images_without_boxes) == (3, 3, 2)
    assert (r.invalid_annotations, r.unknown_category, r.boxes_clipped, r.orphan_annotations) == (2, 1, 1, 1)
    # file names are not numbers: ids 1..N in name order
    assert ds.image_ids == [1, 2, 3]
    boxes = sorted(a["bbox"] for a in ds.coco.imgToAnns[1])
    np.testing.assert_allclose(boxes, [[10, 5, 20, 20], [40, 15, 20, 20], [85, 20, 15, 10]], atol=1e-4)


def _yolo_split(root: Path, split_dir: str, n: int = 1, labels: bool = True) -> None:
    """``root/split_dir/images/*.png`` (+ ``labels/*.txt`` with one box each)."""
    (root / split_dir / "images").mkdir(parents=True)
    if labels:
        (root / split_dir / "labels").mkdir()
    for i in range(n):
        Image.new("RGB", (40, 30)).save(root / split_dir / "images" / f"im{i}.png")
        if labels:
            (root / split_dir / "labels" / f"im{i}.txt").write_text("\ufeff0 0.5 0.5 0.5 0.5\n")  # with a BOM


def test_roboflow_data_yaml_and_a_yaml_from_another_machine(tmp_path: Path):
    from dinodet.data.splits import DataSpec, split_exists

    # Roboflow's data.yaml names the folders beside it as '../train/images' (Ultralytics strips '../')
    rf = tmp_path / "rf"
    _yolo_split(rf, "train", 2)
    _yolo_split(rf, "valid")
    (rf / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['thing']\n")
    assert resolve_yolo_paths(rf, "val")[:2] == (rf / "valid" / "images", rf / "valid" / "labels")
    ds = build_dataset(str(rf), "train", "yolo", train=False, data_cfg=SMALL)
    assert len(ds) == 2 and ds.report.boxes == 2 and ds.report.ok  # the BOM does not cost line 1
    # 'path:' of the machine the YAML was written on: the YAML's own folder is the base here
    colab = tmp_path / "colab"
    _yolo_split(colab, "images/train")  # colab/images/train/images: fine, any 'images' folder works
    (colab / "data.yaml").write_text("path: /content/datasets/x\ntrain: images/train/images\nnames: ['thing']\n")
    assert resolve_yolo_paths(colab, "train")[0] == colab / "images" / "train" / "images"
    # a split the YAML names but that is not there is an error, not a missing split
    (rf / "data.yaml").write_text("train: ../train/images\nval: ../validation/images\nnames: ['thing']\n")
    with pytest.raises(DatasetError, match="'val: ../validation/images' is not a directory"):
        split_exists(DataSpec(str(rf), "yolo"), "val")
    assert not split_exists(DataSpec(str(rf), "yolo"), "test")  # not named, not there: simply absent


def test_missing_label_folder_is_an_error(tmp_path: Path):
    _yolo_split(tmp_path, "train", labels=False)
    (tmp_path / "train" / "annotations").mkdir()  # labels under another name
    (tmp_path / "names.txt").write_text("thing\n")
    with pytest.raises(DatasetError, match=r"no label folder '.*train/labels'"):
        build_dataset(str(tmp_path), "train", "yolo", data_cfg=SMALL)


def test_split_folders_come_from_the_data_yaml_even_with_names_txt():
    # coco128 has names.txt (the names) and coco128.yaml, whose 'val:' is the training images
    images, labels, names = resolve_yolo_paths(COCO128, "val")
    assert (images, labels, names.name) == (COCO128 / "images" / "train2017", COCO128 / "labels" / "train2017",
                                            "names.txt")


# YOLO labels are relative to the upright (EXIF-rotated) image
def test_yolo_labels_use_the_exif_upright_size(tmp_path):
    from dinodet.config import DataConfig
    from dinodet.data.coco import build_dataset

    img, lbl = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    img.mkdir(parents=True)
    lbl.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80x40, shown 40x80
    Image.new("RGB", (80, 40)).save(img / "a.jpg", exif=exif)
    (lbl / "a.txt").write_text("0 0.5 0.25 0.5 0.25\n")
    (tmp_path / "names.txt").write_text("thing\n")
    ds = build_dataset(str(tmp_path), "train", "yolo", train=False, data_cfg=DataConfig(eval_size=80, max_size=80))
    im = ds.coco.dataset["images"][0]
    assert (im["width"], im["height"]) == (40, 80)
    np.testing.assert_allclose(ds.coco.dataset["annotations"][0]["bbox"], [10, 10, 20, 20], atol=1e-4)
    assert ds.report.size_mismatch == 0


def test_label_problems_name_the_label_file_and_line(tmp_path: Path):
    img, lbl = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    img.mkdir(parents=True)
    lbl.mkdir(parents=True)
    Image.new("RGB", (40, 20)).save(img / "a.jpg")
    (lbl / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0 0.2\n0 1.8 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n"
                               "0 20 10 8 4\n")  # line 5: pixels, not fractions of the image
    (tmp_path / "names.txt").write_text("thing\n")
    ds = build_dataset(str(tmp_path), "train", "yolo", train=False, data_cfg=SMALL)
    r = ds.report
    assert (r.boxes, r.boxes_dropped_degenerate, r.boxes_outside, r.unknown_category) == (1, 1, 1, 1)
    assert any(m.startswith(f"{lbl / 'a.txt'}: line 2: box") and "has no area" in m for m in r.messages)
    assert any(m.startswith(f"{lbl / 'a.txt'}: line 3: box") and "lies outside" in m for m in r.messages)
    assert f"{lbl / 'a.txt'}: line 4: class 7 (1 boxes) is beyond the 1 class names; skipped" in r.messages
    assert r.invalid_annotations == 1
    assert f"{lbl / 'a.txt'}: line 5: values above 1 (pixels?): YOLO boxes are fractions of the image size; " \
           "skipped" in r.messages
    assert all("dinodet_source" not in a for a in ds.coco.dataset["annotations"])  # not in the ground truth


@pytest.mark.parametrize(("file", "content", "fragment"), [
    ("data.yaml", "names: []\n", "'names:' is empty"),
    ("data.yaml", "names: {}\n", "'names:' is empty"),
    ("data.yaml", "names: [a, b\ntrain: x\n", "is not valid YAML"),  # said, not "no class names found"
    ("data.yaml", "names: [caf\xe9]\n".encode("latin-1"), "not UTF-8"),
    ("names.txt", "caf\xe9\n".encode("latin-1"), "not UTF-8"),
])
def test_bad_names_files_are_one_clear_error(tmp_path: Path, file: str, content, fragment: str):
    from dinodet.data.yolo import find_names_file

    path = tmp_path / file
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError, match=fragment) as err:
        read_names(find_names_file(tmp_path))
    assert file in str(err.value)


def test_a_folder_where_a_label_file_should_be_is_reported(tmp_path: Path):
    img, lbl = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    img.mkdir(parents=True)
    (lbl / "a.txt").mkdir(parents=True)
    Image.new("RGB", (40, 20)).save(img / "a.jpg")
    (tmp_path / "names.txt").write_text("thing\n")
    ds = build_dataset(str(tmp_path), "train", "yolo", train=False, data_cfg=SMALL)
    assert ds.report.invalid_annotations == 1 and len(ds) == 1
    assert any(m.startswith(f"{lbl / 'a.txt'}: a folder where the label file should be") for m in ds.report.messages)


def test_lines_that_may_not_be_boxes_or_polygons_are_reported(tmp_path: Path):
    """'cls cx cy w h a b' is read as a triangle (as Ultralytics does), a pose line as its box: both said."""
    from dinodet.data.checks import check_dataset, format_report

    img, lbl = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    img.mkdir(parents=True)
    lbl.mkdir(parents=True)
    Image.new("RGB", (100, 50)).save(img / "a.jpg")
    (lbl / "a.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n"                        # a box: fine
        "0 0.5 0.5 0.2 0.2 0.9 0.1\n"                # 7 values: a triangle, or a box with 2 extra columns
        "0 0.5 0.5 0.4 0.4 0.4 0.4 2 0.6 0.6 1\n"    # pose: box + 2 keypoints (x y visibility)
        "0 0.5 0.5 0.2 0.4 0.45 0.4 2\n"             # pose with one keypoint (an odd count of coordinates)
        "0 0.1 0.1 0.2 0.2 0.3\n")                   # odd count, not a pose: skipped
    (tmp_path / "names.txt").write_text("thing\n")
    ds = build_dataset(str(tmp_path), "train", "yolo", train=False, data_cfg=SMALL)
    r = ds.report
    assert (r.boxes, r.ambiguous_label_lines, r.invalid_annotations) == (4, 3, 1)
    label = lbl / "a.txt"
    assert (f"{label}: line 2: 7 values read as a 3-point polygon (a triangle's bounding box); if it is "
            "'class cx cy w h' with 2 extra values, remove them") in r.messages
    assert (f"{label}: line 3: 11 values read as a pose label ('class cx cy w h' + 2 keypoints 'x y visibility'): "
            "its box is used, the keypoints ignored") in r.messages
    assert any(m.startswith(f"{label}: line 4: 8 values read as a pose label") for m in r.messages)
    assert any(m.startswith(f"{label}: line 5: 6 values: neither") for m in r.messages)
    boxes = sorted(a["bbox"] for a in ds.coco.dataset["annotations"])
    # the triangle's bounding box, the pose lines' own boxes (not the hull of box and keypoints), the box
    np.testing.assert_allclose(boxes, [[20, 5, 70, 20], [30, 15, 40, 20], [40, 15, 20, 20], [40, 20, 20, 10]],
                               atol=1e-4)
    text = format_report(check_dataset(tmp_path, "yolo", "train"))
    assert "       3 label lines read as a triangle or a pose label (check them: a box with extra values?)" in text
    assert "result: 4 problem(s)" in text
