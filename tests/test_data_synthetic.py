"""The synthetic shapes dataset: deterministic, valid COCO, loadable, cached, never clobbering."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from test_data_coco import SMALL, self_eval_ap

from dinodet.data.coco import build_dataset
from dinodet.data.synthetic import SHAPES, make_synthetic_coco

KW = dict(num_train=24, num_val=8, image_size=(96, 128), seed=3, num_classes=5)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("a") / "shapes", **KW)


def test_deterministic_from_seed(synth: Path, tmp_path: Path):
    again = make_synthetic_coco(tmp_path / "b", **KW)
    assert _digest(again) == _digest(synth)
    other = make_synthetic_coco(tmp_path / "c", **{**KW, "seed": 4})
    assert _digest(other) != _digest(synth)


def test_annotations_are_valid_coco(synth: Path):
    for split, n in (("train", 24), ("val", 8)):
        coco = COCO(str(synth / "annotations" / f"instances_{split}2017.json"))
        assert len(coco.getImgIds()) == n and all((synth / f"{split}2017" / im["file_name"]).is_file()
                                                  for im in coco.dataset["images"])
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES[:5])
        for iid in coco.getImgIds():
            anns = coco.imgToAnns[iid]
            assert 1 <= len(anns) <= 5
            for a in anns:
                x, y, w, h = a["bbox"]
                assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 96
                # size range 12%..45% of the short side (96); rotated shapes stay near that
                assert 0.1 * 96 <= max(w, h) <= 0.5 * 96 + 1
        assert self_eval_ap(coco) == [1.0, 1.0, 1.0]
    classes = {a["category_id"] for a in json.loads((synth / "annotations" / "instances_train2017.json").read_text())["annotations"]}
    assert classes == {1, 2, 3, 4, 5}


def test_loads_as_dataset(synth: Path):
    train = build_dataset(str(synth), "train", train=True, data_cfg=SMALL)
    val = build_dataset(str(synth), "val", train=False, data_cfg=SMALL, label_map=train.label_map)
    assert train.label_map.num_classes == 5 and train.report.ok and val.report.ok
    assert len(train) == 24 and len(val) == 8 and train.report.images_without_boxes == 0
    image, target = val[0]
    assert image.shape[0] == 3 and target["boxes"].shape[0] >= 1


def test_reuse_and_refuse_to_clobber(synth: Path, tmp_path: Path):
    stamp = (synth / "annotations" / "instances_train2017.json").stat().st_mtime_ns
    assert make_synthetic_coco(synth, **KW) == synth
    assert (synth / "annotations" / "instances_train2017.json").stat().st_mtime_ns == stamp  # reused
    foreign = tmp_path / "foreign"
    (foreign / "train2017").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        make_synthetic_coco(foreign, **KW)
    make_synthetic_coco(foreign, overwrite=True, **{**KW, "num_train": 2, "num_val": 1})
    assert len(list((foreign / "train2017").iterdir())) == 2
    assert not [p for p in foreign.iterdir() if p.name.startswith(".synthetic-")]  # temp folder cleaned up
    # a swap interrupted after the marker turned "incomplete" is ours: regenerated without overwrite
    (foreign / "synthetic.json").write_text(json.dumps({"incomplete": True}))
    make_synthetic_coco(foreign, **{**KW, "num_train": 3, "num_val": 1})
    assert len(list((foreign / "train2017").iterdir())) == 3
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_coco(tmp_path / "bad", num_classes=9)


def test_kept_data_is_not_regenerated_with_other_parameters(tmp_path: Path):
    """A resumed demo run keeps its data: other parameters are an error, the same ones reuse it."""
    root = make_synthetic_coco(tmp_path / "d", num_train=2, num_val=1, image_size=(32, 32))
    stamp = (root / "annotations" / "instances_train2017.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"other parameters \(num_train 2 -> 3\)"):
        make_synthetic_coco(root, num_train=3, num_val=1, image_size=(32, 32), keep=True)
    assert make_synthetic_coco(root, num_train=2, num_val=1, image_size=(32, 32), keep=True) == root
    assert (root / "annotations" / "instances_train2017.json").stat().st_mtime_ns == stamp
