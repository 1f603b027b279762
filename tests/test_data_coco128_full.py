"""The full coco128 (../shared/data/coco128, skipped where absent) rewritten as a Roboflow export,
Pascal VOC and CVAT XML: each reads as its 128 images and the same 929 boxes per class as the COCO
json, trains two steps and evaluates; coco -> voc -> coco and coco -> yolo -> coco give the json's
boxes back.  Slow (copies and reads 128 images several times): deselected by default."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import test_data_layouts as layouts
from conftest import REPO_ROOT
from test_data_convert import _assert_same, _content

from dinodet.cli import main
from dinodet.data.coco import build_dataset
from dinodet.data.convert import convert_dataset

COCO128_FULL = REPO_ROOT.parent / "shared" / "data" / "coco128"
SMALL = ["--set", "data.train_scales=[64]", "--set", "data.max_size=64", "--set", "data.crop_resize_scales=[64]",
         "--set", "data.crop_size=[32,64]", "--set", "data.eval_size=64", "--set", "model.num_queries=10",
         "--set", "model.num_select=10", "--set", "data.num_workers=0"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (COCO128_FULL / "annotations").is_dir(), reason=f"{COCO128_FULL} not found")]


@pytest.fixture(scope="module")
def expected() -> Counter:
    data = json.loads((COCO128_FULL / "annotations" / "instances_train2017.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    return Counter(names[a["category_id"]] for a in data["annotations"])


@pytest.mark.parametrize("fmt", ["roboflow", "voc", "cvat"])
def test_layout_of_the_full_coco128_reads_trains_and_evaluates(fmt: str, tmp_path: Path, expected: Counter,
                                                                monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(layouts, "COCO_JSON", COCO128_FULL / "annotations" / "instances_train2017.json")
    monkeypatch.setattr(layouts, "IMAGES", COCO128_FULL / "images" / "train2017")
    root = layouts.WRITERS[fmt](tmp_path / fmt)
    assert sum(expected.values()) == 929
    assert main(["check-data", "--data", str(root)]) == 0
    out = capsys.readouterr().out
    train = build_dataset(root, "train", "auto", train=False)
    val = build_dataset(root, "val", "auto", train=False, label_map=train.label_map)
    assert len(train) + len(val) == 128 and "[train]" in out and "[val]" in out
    per_class = Counter(train.label_map.class_names[k] for ds in (train, val) for k in ds.index.labels.tolist())
    assert per_class == expected
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--preset", "tiny", "--out", str(run), "--max-steps", "2",
                 "--pictures", "0", "--no-progress", *SMALL]) == 0
    assert main(["eval", "--data", str(root), "--checkpoint", str(run / "checkpoint.pt"), "--out",
                 str(tmp_path / "eval"), "--pictures", "0", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "val" and set(metrics["error_breakdown"]["errors"]) >= {"missed", "background"}


@pytest.mark.parametrize("via", ["voc", "yolo"])
def test_convert_round_trip_of_the_full_coco128(via: str, tmp_path: Path) -> None:
    convert_dataset(COCO128_FULL, via, tmp_path / via, format="coco", progress=False)
    back = convert_dataset(tmp_path / via, "coco", tmp_path / "back", progress=False)
    assert back.images == {"train": 128} and back.boxes == {"train": 929}
    _assert_same(_content(COCO128_FULL, "train"), _content(tmp_path / "back", "train"))
