"""``dinodet convert``: coco -> voc -> coco and coco -> yolo -> coco give the same images, classes and
boxes (within 1e-6 pixel), crowd boxes survive VOC as ``difficult``, bad items are reported and
left out, and an output folder that is not new is refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import COCO128

from dinodet.cli import main
from dinodet.data.coco import build_index
from dinodet.data.convert import convert_dataset
from dinodet.data.layouts import detect_format
from dinodet.errors import ConfigError

TOLERANCE = 1e-6  # pixels: the writers' 12 significant digits


@pytest.fixture(scope="module")
def coco_two_splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """coco128_mini as a train split (8 images, one box made crowd, one image whose file is missing)
    and a val split (the last 4 images)."""
    root = tmp_path_factory.mktemp("coco2")
    data = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    images = sorted(data["images"], key=lambda im: im["file_name"])
    split_of = {im["id"]: ("val" if k >= len(images) - 4 else "train") for k, im in enumerate(images)}
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        ims = [im for im in images if split_of[im["id"]] == split]
        for im in ims:
            shutil.copy(COCO128 / "images" / "train2017" / im["file_name"], root / "images" / split)
        anns = [a for a in data["annotations"] if split_of[a["image_id"]] == split]
        if split == "train":
            anns[0] = {**anns[0], "iscrowd": 1}
            ims = [*ims, {"id": 999999, "file_name": "missing.jpg", "width": 64, "height": 64}]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({**data, "images": ims, "annotations": anns}))
    return root


def _content(root: Path, split: str) -> dict[str, list[tuple]]:
    """Per image file name: its sorted (class name, crowd, x, y, w, h), as training reads them."""
    index = build_index(root, split, "auto")
    names = dict(zip(index.label_map.category_ids, index.label_map.class_names))
    out: dict[str, list[tuple]] = {im["file_name"]: [] for im in index.gt["images"]}
    by_id = {im["id"]: im["file_name"] for im in index.gt["images"]}
    for a in index.gt["annotations"]:
        out[by_id[a["image_id"]]].append((names[a["category_id"]], int(a["iscrowd"]), *map(float, a["bbox"])))
    return {k: sorted(v) for k, v in out.items()}


def _assert_same(a: dict[str, list[tuple]], b: dict[str, list[tuple]]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert [x[:2] for x in a[name]] == [x[:2] for x in b[name]], name
        for x, y in zip(a[name], b[name]):
            assert max(abs(u - v) for u, v in zip(x[2:], y[2:])) < TOLERANCE, (name, x, y)


@pytest.mark.parametrize("via", ["voc", "yolo"])
def test_round_trip_keeps_images_classes_and_boxes(coco_two_splits: Path, tmp_path: Path, via: str) -> None:
    middle = convert_dataset(coco_two_splits, via, tmp_path / via, progress=False)
    assert detect_format(tmp_path / via) == via
    assert middle.images == {"train": 8, "val": 4}  # the missing image reported and left out
    assert any("missing.jpg" in m for m in middle.reports["train"].messages)
    back = convert_dataset(tmp_path / via, "coco", tmp_path / "back", progress=False)
    assert back.images == middle.images
    for split in ("train", "val"):
        original, returned = _content(coco_two_splits, split), _content(tmp_path / "back", split)
        if via == "yolo":  # YOLO has no crowd flag: that box is left out
            original = {k: [b for b in v if not b[1]] for k, v in original.items()}
        _assert_same(original, returned)
    crowd = sum(b[1] for v in _content(tmp_path / "back", "train").values() for b in v)
    assert crowd == (1 if via == "voc" else 0)  # VOC keeps it as a difficult object


def test_coco_to_coco_keeps_ids(coco_two_splits: Path, tmp_path: Path) -> None:
    convert_dataset(coco_two_splits, "coco", tmp_path / "c", splits=["val"], progress=False)
    src = json.loads((coco_two_splits / "annotations" / "instances_val.json").read_text())
    out = json.loads((tmp_path / "c" / "annotations" / "instances_val.json").read_text())
    assert [c["id"] for c in out["categories"]] == sorted(c["id"] for c in src["categories"])
    assert sorted(im["id"] for im in out["images"]) == sorted(im["id"] for im in src["images"])
    assert not (tmp_path / "c" / "annotations" / "instances_train.json").exists()


def test_refuses_used_or_nested_out(coco_two_splits: Path, tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an empty folder"):
        convert_dataset(coco_two_splits, "voc", tmp_path / "used")
    with pytest.raises(ConfigError, match="inside --data"):
        convert_dataset(coco_two_splits, "voc", coco_two_splits / "voc")
    with pytest.raises(ConfigError, match="--to must be"):
        convert_dataset(coco_two_splits, "cityscapes", tmp_path / "new")


def test_cli_convert(coco_two_splits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--data", str(coco_two_splits), "--to", "yolo", "--out", str(tmp_path / "y"),
                 "--split", "val", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "coco -> yolo" in out and "val: 4 images" in out
    assert (tmp_path / "y" / "data.yaml").is_file()
    assert main(["convert", "--data", str(coco_two_splits), "--to", "voc", "--out", str(tmp_path / "v"),
                 "--split", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dinodet: error:") and "'nope'" in err[0]
