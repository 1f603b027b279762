"""Roboflow COCO, Pascal VOC and CVAT layouts: the vendored coco128_mini rewritten in each (by the
writers below) must give the COCO json's images, boxes and classes; ``--format auto`` finds each;
malicious XML is refused in one line; VOC ``difficult`` boxes are ignored as VOC ignores them."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import COCO128

from dinodet.cli import main
from dinodet.data.checks import check_dataset
from dinodet.data.coco import build_dataset, build_index
from dinodet.data.layouts import detect_format
from dinodet.data.report import DatasetError
from dinodet.data.splits import DataSpec, eval_split, split_exists

COCO_JSON = COCO128 / "annotations" / "instances_train2017.json"
IMAGES = COCO128 / "images" / "train2017"
VAL_COUNT = 4  # the last 4 images (by file name) form the val split of the rewritten layouts

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<annotation><filename>&lol3;</filename></annotation>
"""
XXE = """<?xml version="1.0"?>
<!DOCTYPE annotations [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<annotations><image id="0" name="&xxe;" width="1" height="1"/></annotations>
"""


def _coco() -> dict:
    return json.loads(COCO_JSON.read_text())


def _splits(coco: dict) -> dict[str, list[dict]]:
    images = sorted(coco["images"], key=lambda im: im["file_name"])
    return {"train": images[:-VAL_COUNT], "val": images[-VAL_COUNT:]}


def _boxes(coco: dict) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        out.setdefault(a["image_id"], []).append(a)
    return out


def write_roboflow(root: Path) -> Path:
    """A Roboflow COCO export: ``train/`` and ``valid/``, ids from 0, the dataset's placeholder class."""
    coco = _coco()
    boxes = _boxes(coco)
    cats = [{"id": 0, "name": "things", "supercategory": "none"}]
    cats += [{"id": c["id"], "name": c["name"], "supercategory": "things"} for c in coco["categories"]]
    for folder, images in zip(("train", "valid"), _splits(coco).values()):
        (root / folder).mkdir(parents=True)
        out_images, out_anns = [], []
        for new_id, im in enumerate(images):
            shutil.copy(IMAGES / im["file_name"], root / folder / im["file_name"])
            out_images.append({**im, "id": new_id})
            out_anns += [{**a, "id": len(out_anns), "image_id": new_id} for a in boxes.get(im["id"], [])]
        (root / folder / "_annotations.coco.json").write_text(
            json.dumps({"images": out_images, "annotations": out_anns, "categories": cats}))
    return root


def write_voc(root: Path, difficult: set[int] = frozenset()) -> Path:
    """A Pascal VOC tree (1-based pixel boxes); annotation ids in ``difficult`` get ``<difficult>1``."""
    coco = _coco()
    names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes = _boxes(coco)
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    for split, images in _splits(coco).items():
        stems = []
        for im in images:
            stem = Path(im["file_name"]).stem
            stems.append(stem)
            shutil.copy(IMAGES / im["file_name"], root / "JPEGImages" / im["file_name"])
            ann = ET.Element("annotation")
            ET.SubElement(ann, "filename").text = im["file_name"]
            size = ET.SubElement(ann, "size")
            for tag, v in (("width", im["width"]), ("height", im["height"]), ("depth", 3)):
                ET.SubElement(size, tag).text = str(v)
            for a in boxes.get(im["id"], []):
                x, y, w, h = a["bbox"]
                obj = ET.SubElement(ann, "object")
                ET.SubElement(obj, "name").text = names[a["category_id"]]
                ET.SubElement(obj, "difficult").text = "1" if a["id"] in difficult else "0"
                bb = ET.SubElement(obj, "bndbox")
                for tag, v in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
                    ET.SubElement(bb, tag).text = repr(float(v))
            ET.ElementTree(ann).write(root / "Annotations" / f"{stem}.xml")
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


def write_cvat(root: Path) -> Path:
    """A CVAT for images 1.1 export with ``Train`` and ``Validation`` subsets."""
    coco = _coco()
    names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes = _boxes(coco)
    (root / "images").mkdir(parents=True)
    top = ET.Element("annotations")
    ET.SubElement(top, "version").text = "1.1"
    labels = ET.SubElement(ET.SubElement(ET.SubElement(top, "meta"), "task"), "labels")
    for c in coco["categories"]:
        ET.SubElement(ET.SubElement(labels, "label"), "name").text = c["name"]
    n = 0
    for subset, images in zip(("Train", "Validation"), _splits(coco).values()):
        for im in images:
            shutil.copy(IMAGES / im["file_name"], root / "images" / im["file_name"])
            el = ET.SubElement(top, "image", id=str(n), name=im["file_name"], subset=subset,
                               width=str(im["width"]), height=str(im["height"]))
            n += 1
            for a in boxes.get(im["id"], []):
                x, y, w, h = a["bbox"]
                ET.SubElement(el, "box", label=names[a["category_id"]], occluded="0",
                              xtl=repr(x), ytl=repr(y), xbr=repr(x + w), ybr=repr(y + h))
    ET.ElementTree(top).write(root / "annotations.xml")
    return root


WRITERS = {"roboflow": write_roboflow, "voc": write_voc, "cvat": write_cvat}


def _targets(root: Path, fmt: str, split: str, label_map=None) -> dict[str, tuple[list[str], np.ndarray]]:
    """File name -> (class names, training boxes x1y1x2y2) of a split."""
    ds = build_dataset(root, split, fmt, train=False, label_map=label_map)
    out = {}
    for i in range(len(ds)):
        t = ds.raw_target(i)
        out[ds.image_path(i).name] = ([ds.label_map.class_names[k] for k in t["labels"].tolist()], t["boxes"].numpy())
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[list[str], np.ndarray]]:
    return _targets(COCO128, "coco", "train")


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_layout_matches_the_coco_json(tmp_path: Path, fmt: str, reference):
    root = WRITERS[fmt](tmp_path / fmt)
    assert detect_format(root) == fmt
    spec = DataSpec(str(root), "auto")
    assert split_exists(spec, "train") and split_exists(spec, "val") and not split_exists(spec, "test")
    assert eval_split(spec) == "val"

    reports = [check_dataset(root, "auto", split) for split in ("train", "val")]
    assert all(r.ok for r in reports), [r.messages for r in reports]
    assert sum(r.images for r in reports) == len(reference) == 12
    assert sum(r.boxes for r in reports) == sum(len(b) for _, b in reference.values())

    train = build_dataset(root, "train", "auto", train=False)
    assert train.label_map.num_classes == 80 if fmt != "voc" else len({n for ns, _ in reference.values() for n in ns})
    got = {**_targets(root, "auto", "train"), **_targets(root, "auto", "val", train.label_map)}
    assert sorted(got) == sorted(reference)
    per_class = Counter(n for names, _ in got.values() for n in names)
    assert per_class == Counter(n for names, _ in reference.values() for n in names)
    for name, (classes, boxes) in reference.items():
        assert got[name][0] == classes, name
        np.testing.assert_allclose(got[name][1], boxes, atol=1e-3)


def test_split_flags_name_the_splits(tmp_path: Path):
    root = write_cvat(tmp_path / "cvat")
    spec = DataSpec(str(root), "cvat", train_split="Validation", val_split="Train")
    assert eval_split(spec) == "Train"
    assert build_index(root, "validation", "cvat").report.images == VAL_COUNT  # any case
    with pytest.raises(DatasetError, match="subsets: 'Train', 'Validation'"):
        build_index(root, "test", "cvat")


def _ap50(gt, dets: list[dict]) -> float:
    """AP@.5 of detections placed exactly on the given ground-truth boxes."""
    from pycocotools.cocoeval import COCOeval

    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return float(ev.stats[1])


def test_voc_difficult_is_out_of_training_and_ignored_in_eval(tmp_path: Path):
    coco = _coco()
    target = coco["annotations"][0]
    split = "train" if target["image_id"] in {im["id"] for im in _splits(coco)["train"]} else "val"
    ds = build_dataset(write_voc(tmp_path / "voc", difficult={target["id"]}), split, "voc", train=False)
    plain = build_dataset(write_voc(tmp_path / "plain"), split, "voc", train=False)
    assert ds.report.crowd_ignored == 1 and ds.report.boxes == plain.report.boxes - 1  # not a training box
    hard = [a for a in ds.coco.dataset["annotations"] if a["iscrowd"]]
    assert len(hard) == 1 and hard[0]["image_id"] == target["image_id"]
    easy = [a for a in ds.coco.dataset["annotations"] if not a["iscrowd"]]
    # detecting the difficult box neither helps nor costs; had it not been difficult, missing it would cost
    assert _ap50(ds.coco, easy) == _ap50(ds.coco, easy + hard)
    assert _ap50(plain.coco, easy) < _ap50(plain.coco, easy + hard)


@pytest.mark.parametrize("payload", [BILLION_LAUGHS, XXE], ids=["billion-laughs", "xxe"])
def test_malicious_xml_is_refused_in_one_line(tmp_path: Path, capsys, payload: str):
    cvat = tmp_path / "cvat"
    (cvat / "images").mkdir(parents=True)
    (cvat / "annotations.xml").write_text(payload)
    assert main(["check-data", "--data", str(cvat)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("dinodet: warning:")]
    assert len(err) == 1 and "annotations.xml" in err[0] and "refused" in err[0], err
    assert "lollol" not in err[0] and "root:" not in err[0]

    voc = write_voc(tmp_path / "voc")
    bad = sorted((voc / "Annotations").glob("*.xml"))[0]
    bad.write_text(payload)
    report = check_dataset(voc, "auto", "train")
    lines = [m for m in report.messages if bad.name in m]
    assert len(lines) == 1 and "refused" in lines[0] and report.invalid_annotations == 1
    assert report.images == 12 - VAL_COUNT - 1


def test_per_item_problems_are_reported_and_skipped(tmp_path: Path):
    root = write_cvat(tmp_path / "cvat")
    text = (root / "annotations.xml").read_text()
    first = text.index("<box ")
    text = text[:first] + '<box label="unicorn" xtl="1" ytl="1" xbr="5" ybr="5" occluded="0" />' \
        + '<box label="person" xtl="a" ytl="1" xbr="5" ybr="5" /><polygon label="person" points="1,1;2,2;3,1" />' \
        + text[first:]
    (root / "annotations.xml").write_text(text)
    (root / "images" / sorted(p.name for p in (root / "images").iterdir())[0]).unlink()
    report = check_dataset(root, "cvat", "train")
    assert report.unknown_category == 1 and report.invalid_annotations == 1 and report.missing_files == 1
    assert any("unicorn" in m for m in report.messages) and any("1 polygon ignored" in m for m in report.messages)


def test_auto_keeps_coco_and_yolo(tmp_path: Path):
    assert detect_format(COCO128) == "coco"  # it has YOLO labels too: COCO wins, as the old default
    yolo = tmp_path / "yolo"
    shutil.copytree(COCO128, yolo, ignore=shutil.ignore_patterns("annotations"))
    assert detect_format(yolo) == "yolo"
    assert build_index(yolo, "train", "auto").report.boxes == build_index(COCO128, "train").report.boxes
    (tmp_path / "empty").mkdir()
    assert detect_format(tmp_path / "empty") is None


def test_train_one_step_on_voc(tmp_path: Path):
    from test_cli_train import SMALL

    root = write_voc(tmp_path / "voc")
    assert main(["train", "--data", str(root), "--preset", "tiny", "--out", str(tmp_path / "run"), "--max-steps",
                 "1", "--batch-size", "2", "--pictures", "0", "--no-progress", "--val-split", "val", *SMALL]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["AP"] <= 1.0 or metrics["AP"] == -1.0
