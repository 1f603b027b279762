"""Bad data is counted, reported and skipped, never fatal: a tiny broken COCO dataset built in tmp."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinodet.config import DataConfig
from dinodet.data.checks import check_dataset, format_report
from dinodet.data.coco import build_dataset
from dinodet.data.loader import build_loader, collate

CFG = DataConfig(train_scales=(48, 64), max_size=96, crop_resize_scales=(48, 64), crop_size=(32, 48),
                 eval_size=64, num_workers=0)
EXIF_ORIENTATION = 0x0112


def _rgb(w: int, h: int, value: int = 128) -> Image.Image:
    return Image.fromarray(np.full((h, w, 3), value, np.uint8))


@pytest.fixture
def broken_coco(tmp_path: Path) -> Path:
    """Images: good, RGBA, grayscale, corrupt, truncated, missing, EXIF-rotated, wrong size, negative."""
    d = tmp_path / "train2017"
    d.mkdir()
    _rgb(64, 48).save(d / "good.jpg")
    Image.fromarray(np.full((48, 64, 4), 200, np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(np.full((48, 64), 90, np.uint8), "L").save(d / "gray.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored 64x48, shown 48x64; the json describes the stored image
    _rgb(64, 48).save(d / "rotated.jpg", exif=exif)
    _rgb(32, 24).save(d / "small.jpg")  # json says 64x48
    _rgb(64, 48).save(d / "negative.jpg")
    names = ["good.jpg", "rgba.png", "gray.png", "corrupt.jpg", "truncated.jpg", "missing.jpg", "rotated.jpg",
             "small.jpg", "negative.jpg"]
    images = [{"id": i + 1, "file_name": n, "width": 64, "height": 48} for i, n in enumerate(names)]
    box = [10, 10, 20, 20]
    anns = [
        (1, 1, box), (1, 1, [5, 5, 0, 10]),          # good: one fine box, one zero-width
        (2, 2, box), (2, 1, [50, 30, 30, 30]),       # rgba: fine + extends outside (clipped)
        (3, 2, box), (3, 1, [100, 100, 10, 10]),     # gray: fine + entirely outside (dropped)
        (4, 1, box), (5, 1, box), (6, 1, box),       # corrupt, truncated, missing
        (7, 1, box), (8, 2, box),                    # rotated, wrong size
        (1, 99, box),                                # unknown category
        (1, 1, [1, 2, 3]),                           # malformed bbox
        (42, 1, box),                                # image 42 does not exist
        (2, 1, [-5, -5, -4, 10]),                    # negative width
    ]
    annotations = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": 100, "iscrowd": 0}
                   for k, (i, c, b) in enumerate(anns)]
    annotations.append({"id": 100, "image_id": 1, "category_id": 2, "bbox": [0, 0, 30, 30], "area": 900,
                        "iscrowd": 1})
    cats = [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return tmp_path


def test_index_counts_problems(broken_coco: Path):
    ds = build_dataset(str(broken_coco), "train", train=True, data_cfg=CFG)
    r = ds.report
    assert r.missing_files == 1 and len(ds) == 8
    assert r.boxes_dropped_degenerate == 2 and r.boxes_outside == 1  # zero width, negative width; entirely outside
    assert r.boxes_clipped == 1
    assert r.unknown_category == 1 and r.invalid_annotations == 1 and r.orphan_annotations == 1
    assert r.crowd_ignored == 1
    assert r.images_without_boxes == 1  # negative.jpg, kept
    assert r.boxes == 8
    assert any("missing.jpg" in m for m in r.messages) and any("category id 99" in m for m in r.messages)
    assert 6 not in ds.coco.getImgIds()  # a missing image cannot count as missed detections
    clipped = next(a for a in ds.coco.imgToAnns[2] if a["id"] == 4)
    assert clipped["bbox"] == [50, 30, 14, 18]
    assert ds.raw_target(ds.image_ids.index(2))["boxes"].tolist() == [[10, 10, 30, 30], [50, 30, 64, 48]]
    assert "missing image files" in r.summary()


def test_loading_skips_unreadable_and_fixes_frames(broken_coco: Path):
    ds = build_dataset(str(broken_coco), "train", train=False, data_cfg=CFG)
    out = {iid: ds[i] for i, iid in enumerate(ds.image_ids)}
    assert out[4] is None and out[5] is None  # corrupt, truncated
    assert ds.report.unreadable_images == 2
    assert ds[ds.image_ids.index(4)] is None and ds.report.unreadable_images == 2  # recorded once
    for iid in (1, 2, 3, 7, 8, 9):
        image, target = out[iid]
        assert target["orig_size"].tolist() == [48, 64]
        assert list(image.shape) == [3, 64, 85]  # every image is used in the annotated 64x48 frame
    assert ds.report.exif_reoriented == 1 and ds.report.size_mismatch == 1
    assert out[9][1]["boxes"].shape == (0, 4)
    batch = collate([out[i] for i in (1, 4, 2)])
    assert batch is not None and batch[0].shape[0] == 2 and len(batch[2]) == 2
    assert collate([None, None]) is None


def test_training_loop_survives(broken_coco: Path):
    ds = build_dataset(str(broken_coco), "train", train=True, data_cfg=CFG)
    torch.manual_seed(0)
    seen = 0
    for batch in build_loader(ds, batch_size=3, train=True, num_workers=0, seed=1):
        if batch is None:
            continue
        images, mask, targets = batch
        assert images.shape[0] == mask.shape[0] == len(targets)
        seen += len(targets)
    assert seen == 6


def test_check_data_finds_problems_up_front(broken_coco: Path):
    r = check_dataset(broken_coco, "coco", "train", workers=2)
    assert r.unreadable_images == 1  # corrupt.jpg; the truncated one needs a full decode
    assert r.non_rgb_images == 2 and r.exif_reoriented == 1 and r.size_mismatch == 1 and r.missing_files == 1
    full = check_dataset(broken_coco, "coco", "train", decode=True)
    assert full.unreadable_images == 2
    text = format_report(full)
    assert "corrupt.jpg" in text and "truncated.jpg" in text and "problem(s)" in text
    assert text.splitlines()[0].startswith("dataset: ") and "classes: 2" in text


def test_check_data_on_clean_coco128():
    from conftest import COCO128

    r = check_dataset(COCO128, "coco", "train")
    assert r.images == 12 and r.ok
    assert r.non_rgb_images == 1  # 000000000086.jpg is greyscale (README)
    assert format_report(r).endswith("result: OK")


def _unusable_coco(root: Path, write_files: bool) -> Path:
    """Two annotated images that are both corrupt (``write_files``) or both missing."""
    (root / "train2017").mkdir(parents=True)
    if write_files:
        for n in ("a.jpg", "b.jpg"):
            (root / "train2017" / n).write_bytes(b"\xff\xd8 not a jpeg")
    images = [{"id": i, "file_name": n, "width": 64, "height": 48} for i, n in ((1, "a.jpg"), (2, "b.jpg"))]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0}
            for i in (1, 2)]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return root


def test_no_usable_image_stops_with_one_line(tmp_path: Path, capsys):
    from dinodet.cli import main
    from dinodet.data.report import DatasetError

    missing = _unusable_coco(tmp_path / "missing", write_files=False)
    with pytest.raises(DatasetError, match="no usable image in .*instances_train2017.json"):
        build_dataset(str(missing), "train", data_cfg=CFG)

    corrupt = _unusable_coco(tmp_path / "corrupt", write_files=True)
    assert main(["check-data", "--data", str(corrupt)]) == 1  # unreadable is found by opening the files
    assert capsys.readouterr().out.rstrip().endswith("result: NO USABLE IMAGES")
    # training only finds out when loading: the first epoch without a single step stops the run
    status = main(["train", "--data", str(corrupt), "--preset", "tiny", "--out", str(tmp_path / "run"),
                   "--no-progress", "--set", "data.num_workers=0", "--set", "data.eval_size=64",
                   "--set", "data.max_size=64", "--set", "train.epochs=1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dinodet: error")]
    assert status == 2 and len(err) == 1 and "took no training step" in err[0], err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_data_problems_are_logged_with_file_names(broken_coco: Path, caplog):
    with caplog.at_level("WARNING", logger="dinodet"):
        build_dataset(str(broken_coco), "train", data_cfg=CFG)
    text = caplog.text
    assert "missing image files" in text and "missing.jpg" in text  # the count and the file
    assert "more (`dinodet check-data` lists them all)" in text


def test_iscrowd_written_as_a_string(tmp_path: Path):
    from dinodet.data.coco import index_coco

    anns = [{"id": i, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": c}
            for i, c in ((1, "0"), (2, "1"), (3, 0), (4, True))]
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}], "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}]}
    index = index_coco(data, tmp_path, check_files=False)
    assert index.report.crowd_ignored == 2 and index.report.boxes == 2  # "0" is not crowd; "1" and True are
    assert sorted(a["iscrowd"] for a in index.gt["annotations"]) == [0, 0, 1, 1]
    (tmp_path / "a.jpg").mkdir()  # a folder named like the image: said so, not "not found"
    index = index_coco(data, tmp_path)
    assert index.report.missing_files == 1
    assert f"{tmp_path / 'a.jpg'}: listed in annotations but is a folder, not an image; skipped" in index.report.messages
    # a boolean is not an id: {"image_id": true} is reported, not read as image 1
    data["annotations"] = [{**anns[0], "image_id": True}, {**anns[0], "id": 9, "category_id": True}]
    index = index_coco(data, tmp_path, check_files=False)
    assert index.report.invalid_annotations == 2 and index.report.boxes == 0


def test_an_absurd_annotated_size_skips_the_image_instead_of_allocating_it(tmp_path: Path):
    """A 64x48 image annotated as 100000x100000: resizing it to that frame would need 30 GB."""
    d = tmp_path / "train2017"
    d.mkdir()
    _rgb(64, 48).save(d / "a.jpg")
    _rgb(64, 48).save(d / "b.jpg")
    images = [{"id": 1, "file_name": "a.jpg", "width": 100_000, "height": 100_000},
              {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}]
    anns = [{"id": k, "image_id": k, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0}
            for k in (1, 2)]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    ds = build_dataset(str(tmp_path), "train", train=False, data_cfg=CFG)
    assert ds.image_ids == [2] and ds.coco.getImgIds() == [2]
    assert ds.report.invalid_annotations == 1 and ds.report.orphan_annotations == 0
    assert any("a.jpg: annotated size 100000x100000" in m for m in ds.report.messages)


def test_the_cli_shows_every_line_of_a_data_report(broken_coco: Path, capsys):
    """train/eval index the data while the CLI runs: the counts and first files reach stderr."""
    from dinodet.cli import printed_logs

    with printed_logs():
        build_dataset(str(broken_coco), "train", data_cfg=CFG)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("dinodet: warning: ") and err[0].endswith("data problems:")
    assert all(line.startswith("dinodet: warning: ") for line in err)
    assert any("missing image files" in line for line in err) and any("missing.jpg" in line for line in err)


def test_a_dataset_without_any_box_is_said_to_be_one(tmp_path: Path, caplog):
    """Labels in the wrong folder make every image a negative: each file looks fine, the whole is useless."""
    img, lbl = tmp_path / "images" / "train", tmp_path / "labels" / "train"
    img.mkdir(parents=True)
    lbl.mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        _rgb(64, 48).save(img / name)
    (lbl / "a.txt").write_text("")
    (tmp_path / "names.txt").write_text("thing\n")
    text = format_report(check_dataset(tmp_path, "yolo", "train"))
    assert text.splitlines()[-1] == "result: NO BOXES: every image is a negative, there is nothing to learn to detect"
    with caplog.at_level("WARNING", logger="dinodet"):
        build_dataset(str(tmp_path), "train", "yolo", data_cfg=CFG)
    assert f"the training split has no boxes: '{lbl}' has 2 images, all negatives" in caplog.text


def test_check_data_logs_pils_warnings(tmp_path: Path, monkeypatch, caplog):
    d = tmp_path / "train2017"
    d.mkdir()
    _rgb(64, 48).save(d / "a.jpg")
    images = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 0}]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # over the limit (a warning), under twice it (an error)
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="dinodet"):
        warnings.simplefilter("error")  # a warning reaching Python's own printing fails the test
        assert check_dataset(tmp_path, workers=2).ok
    assert "instances_train2017.json: Image size (3072 pixels) exceeds limit of 2000 pixels" in caplog.text
