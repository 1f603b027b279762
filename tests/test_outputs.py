"""dinodet never replaces or deletes a user's files in an output folder (only those its manifest
says it wrote, or with --overwrite), names undecodable file names without crashing, and checks an
export's --out before exporting: predict, eval, check-data and export through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dinodet.cli import main
from dinodet.files import OUTPUTS_MANIFEST

RANDOM = ["--random-weights", "--preset", "tiny", "--size", "64", "--max-size", "64"]


def _one_error(err: str, *fragments: str) -> None:
    lines = [ln for ln in err.splitlines() if not ln.startswith("dinodet: warning:")]
    assert len(lines) == 1 and lines[0].startswith("dinodet: error: ") and "Traceback" not in err, err
    assert all(f in lines[0] for f in fragments), err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data_and_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4-class synthetic COCO dataset (2 train, 2 val images: 000001.jpg, 000002.jpg) and a tiny
    random checkpoint of its classes."""
    from dinodet.checkpoint import save_checkpoint
    from dinodet.config import apply_overrides
    from dinodet.data.synthetic import make_synthetic_coco
    from dinodet.models import build_model
    from dinodet.presets import get_preset

    root = tmp_path_factory.mktemp("outputs")
    data = make_synthetic_coco(root / "data", num_train=2, num_val=2, image_size=(64, 64), seed=0, num_classes=4)
    cfg = apply_overrides(get_preset("tiny", num_classes=4), ["data.eval_size=64", "data.max_size=64",
                                                              "model.num_queries=20", "model.num_select=20"])
    ckpt = save_checkpoint(root / "c.pt", build_model(cfg), cfg, ["circle", "square", "triangle", "cross"],
                           [1, 2, 3, 4])
    return data, ckpt


@pytest.fixture
def users_folder(tmp_path: Path) -> Path:
    """A folder holding a user's own files, named as dinodet's outputs are."""
    out = tmp_path / "out"
    for name in ("IMG_002.jpg", "predictions.json", "metrics.json", "val_predictions/mine.jpg",
                 "val_predictions/000001.jpg", "train_labels/000001.jpg", "train_labels/mine.jpg"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(f"the user's own {name}".encode())
    return out


def test_predict_and_eval_refuse_to_replace_a_users_files(tmp_path: Path, users_folder: Path,
                                                          data_and_checkpoint, capsys):
    data, ckpt = data_and_checkpoint
    before = _snapshot(users_folder)
    Image.new("RGB", (40, 30), "white").save(tmp_path / "IMG_002.png")
    Image.new("RGB", (40, 30), "white").save(tmp_path / "other.png")
    eval_args = ["eval", "--data", str(data), "--checkpoint", str(ckpt), "--no-progress", "--pictures", "2",
                 "--out", str(users_folder)]

    # predict: its picture IMG_002.jpg, then its predictions.json, are the user's: refused up front
    assert main(["predict", str(tmp_path / "IMG_002.png"), *RANDOM, "--out", str(users_folder)]) == 2
    _one_error(capsys.readouterr().err, f"--out '{users_folder}' holds 'IMG_002.jpg', which dinodet did not write",
               "--overwrite")
    assert main(["predict", str(tmp_path / "other.png"), *RANDOM, "--out", str(users_folder)]) == 2
    _one_error(capsys.readouterr().err, "'predictions.json', which dinodet did not write")
    # eval: metrics.json is the user's, refused before the checkpoint is loaded
    assert main(eval_args) == 2
    _one_error(capsys.readouterr().err, "'metrics.json', which dinodet did not write")
    assert _snapshot(users_folder) == before


def test_eval_and_check_data_pictures_leave_a_users_files_alone(users_folder: Path, data_and_checkpoint):
    data, ckpt = data_and_checkpoint
    before = _snapshot(users_folder)
    eval_args = ["eval", "--data", str(data), "--checkpoint", str(ckpt), "--no-progress", "--pictures", "2",
                 "--out", str(users_folder)]
    # check-data writes beside the user's pictures, never over or instead of them
    assert main(["check-data", "--data", str(data), "--split", "train", "--out", str(users_folder),
                 "--pictures", "2"]) == 0
    assert {k: v for k, v in _snapshot(users_folder).items() if k in before} == before
    labels = sorted(p.name for p in (users_folder / "train_labels").glob("*.jpg"))
    assert labels == ["000001.jpg", "000001_1.jpg", "000002.jpg", "mine.jpg"]  # the picture took another name
    # eval into a folder whose only user files are pictures: they stay, the run goes on
    for name in ("metrics.json", "predictions.json"):
        (users_folder / name).unlink()
    assert main(eval_args) == 0
    after = _snapshot(users_folder)
    assert {k: after[k] for k in before if k not in ("metrics.json", "predictions.json")} == {
        k: v for k, v in before.items() if k not in ("metrics.json", "predictions.json")}
    assert "val_predictions/000001_1.jpg" in after and json.loads(after["metrics.json"])["split"] == "val"


def test_a_folder_dinodet_wrote_is_reused_and_overwrite_replaces(tmp_path: Path, users_folder: Path,
                                                                 data_and_checkpoint, capsys):
    data, ckpt = data_and_checkpoint
    image = tmp_path / "IMG_002.png"
    Image.new("RGB", (40, 30), "white").save(image)
    out = tmp_path / "fresh"
    for _ in range(2):  # a second run into dinodet's own files needs no --overwrite
        assert main(["predict", str(image), *RANDOM, "--out", str(out)]) == 0
        assert main(["eval", "--data", str(data), "--checkpoint", str(ckpt), "--no-progress", "--pictures", "1",
                     "--out", str(out)]) == 0
        assert main(["check-data", "--data", str(data), "--out", str(out), "--pictures", "1"]) == 0
    assert sorted(p.name for p in (out / "val_predictions").iterdir()) == [OUTPUTS_MANIFEST, "000001.jpg"]
    manifest = json.loads((out / OUTPUTS_MANIFEST).read_text())["files"]
    assert manifest["IMG_002.jpg"] == "predict" and manifest["metrics.json"] == "eval"
    assert manifest["train_classes.png"] == "check-data"
    capsys.readouterr()
    # --overwrite: the user's files are replaced (and are dinodet's from then on)
    assert main(["predict", str(image), *RANDOM, "--out", str(users_folder), "--overwrite"]) == 0
    assert Image.open(users_folder / "IMG_002.jpg").size == (40, 30)
    assert json.loads((users_folder / "predictions.json").read_text()) == []  # not the user's text any more
    assert main(["predict", str(image), *RANDOM, "--out", str(users_folder)]) == 0


def test_pictures_of_an_earlier_run_go_but_a_users_stay(tmp_path: Path, data_and_checkpoint):
    data, ckpt = data_and_checkpoint
    out = tmp_path / "ev"
    args = ["eval", "--data", str(data), "--checkpoint", str(ckpt), "--no-progress", "--out", str(out)]
    assert main([*args, "--pictures", "2"]) == 0
    (out / "val_predictions" / "mine.jpg").write_bytes(b"mine")
    assert main([*args, "--pictures", "1"]) == 0
    assert sorted(p.name for p in (out / "val_predictions").glob("*.jpg")) == ["000001.jpg", "mine.jpg"]
    assert (out / "val_predictions" / "mine.jpg").read_bytes() == b"mine"


def _run_utf8(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # a strict UTF-8 stdout
    return subprocess.run([sys.executable, "-m", "dinodet", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", errors="surrogateescape", env=env, timeout=300)


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse non-UTF-8 names")
def test_predict_prints_file_names_that_are_not_utf8_escaped(tmp_path: Path):
    folder = tmp_path / os.fsdecode(b"in\xff")
    folder.mkdir()
    Image.new("RGB", (40, 30), "white").save(folder / os.fsdecode(b"\xfe.png"))
    out = tmp_path / os.fsdecode(b"out\xff")
    result = _run_utf8("predict", folder, *RANDOM, "--out", out)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "predictions.json" in result.stdout and "out\\xff" in result.stdout
    assert (out / os.fsdecode(b"\xfe.jpg")).is_file()


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse non-UTF-8 names")
def test_check_data_prints_file_names_that_are_not_utf8_escaped(tmp_path: Path, data_and_checkpoint):
    """Its report (stdout) names a broken image of an undecodable name."""
    data, _ = data_and_checkpoint
    train = data / "train2017"
    coco = json.loads((data / "annotations" / "instances_train2017.json").read_text())
    odd = tmp_path / "odd"
    (odd / "annotations").mkdir(parents=True)
    (odd / "train2017").mkdir()
    for image in coco["images"]:
        (odd / "train2017" / image["file_name"]).write_bytes((train / image["file_name"]).read_bytes())
    (odd / "train2017" / os.fsdecode(b"\xff.jpg")).write_bytes(b"not an image")
    coco["images"].append({**coco["images"][0], "id": 99, "file_name": os.fsdecode(b"\xff.jpg")})
    (odd / "annotations" / "instances_train2017.json").write_text(json.dumps(coco))
    result = _run_utf8("check-data", "--data", odd, "--decode")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "\\xff.jpg" in result.stdout


def test_export_checks_its_out_before_loading(tmp_path: Path, capsys):
    pytest.importorskip("onnx")
    from dinodet.deploy.export import to_onnx
    from dinodet.errors import ConfigError

    folder = tmp_path / "model.onnx"
    folder.mkdir()
    missing = tmp_path / "never_read.pt"
    with pytest.raises(ConfigError, match="model.onnx' is a folder"):
        to_onnx(missing, folder)  # the checkpoint would be the error if it were loaded first
    assert main(["export", "--checkpoint", str(missing), "--out", str(folder)]) == 2
    captured = capsys.readouterr()
    _one_error(captured.err, "model.onnx' is a folder")
    assert "exporting" not in captured.err
