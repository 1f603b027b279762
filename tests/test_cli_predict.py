"""``dinodet predict`` end to end (a real subprocess) and its one-line error reporting."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinodet.cli import main, printed_logs
from dinodet.inference.predict import note_compile


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dinodet", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("dinodet: warning:")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dinodet: error: ") and "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


def check_outputs(out: Path, image_dir: Path, names: list[str], threshold: float) -> list[dict]:
    """Annotated images and predictions.json are there and well-formed; returns the records."""
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted(names)
    for name in names:
        annotated, original = Image.open(out / name), Image.open(image_dir / name)
        assert annotated.size == original.size
    records = json.loads((out / "predictions.json").read_text())
    assert isinstance(records, list) and records
    sizes = {name: Image.open(image_dir / name).size for name in names}
    for r in records:
        assert set(r) == {"image_id", "file_name", "category_id", "class_name", "bbox", "score"}
        assert r["file_name"] in names
        # a random 91-slot model may pick any slot, including the unused (N/A) COCO ids
        assert isinstance(r["category_id"], int) and 0 <= r["category_id"] < 91
        x, y, w, h = r["bbox"]
        width, height = sizes[r["file_name"]]
        assert w >= 0 and h >= 0 and -width < x < 2 * width and -height < y < 2 * height
        assert threshold < r["score"] <= 1
    assert not list(out.glob(".*.tmp*"))  # the atomic write left nothing behind
    return records


def test_predict_end_to_end_with_checkpoint(
    tmp_path: Path, image_dir: Path, sample_images: list[Path], tiny_checkpoint: Path, size_args: list[str]
):
    names = [p.name for p in sample_images]
    out = tmp_path / "out"
    result = run_cli("predict", image_dir, "--checkpoint", tiny_checkpoint, "--out", out,
                     "--threshold", "0.01", "--batch-size", "2", *size_args)
    assert result.returncode == 0, result.stderr
    # the corrupt file is reported on one line and skipped; the text file is not an image suffix
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("dinodet: warning:")]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0] and "Traceback" not in result.stderr
    assert "notes.txt" not in result.stderr
    records = check_outputs(out, image_dir, names, threshold=0.01)
    assert {r["file_name"] for r in records} == set(names)  # random scores ~0.05 > 0.01
    # boxes were drawn: the annotated image differs from the original beyond JPEG noise
    a = np.asarray(Image.open(out / names[0]), dtype=np.int16)
    b = np.asarray(Image.open(image_dir / names[0]).convert("RGB"), dtype=np.int16)
    assert (np.abs(a - b).max(axis=2) > 60).mean() > 0.001


def test_predict_random_weights_in_process(tmp_path: Path, sample_images: list[Path], size_args: list[str], capsys):
    out = tmp_path / "out"
    rc = main(["predict", str(sample_images[0]), str(sample_images[2]), "--mode", "channels_last",
               "--random-weights", "--preset", "tiny", "--out", str(out), "--threshold", "0", *size_args])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "RANDOM weights" in captured.err and "meaningless" in captured.err
    assert "compiles the model" not in captured.err  # said only for compiled modes (below)
    assert sorted(p.name for p in out.glob("*.jpg")) == sorted([sample_images[0].name, sample_images[2].name])
    records = json.loads((out / "predictions.json").read_text())
    assert len(records) == 2 * 60  # threshold 0 keeps all num_select=60 detections of the tiny preset


@pytest.mark.parametrize("mode", ["compile", "compile_bf16"])
def test_compiled_modes_say_why_the_first_batches_are_slow(mode: str, capsys):
    with printed_logs():  # the CLI prints the library's note
        note_compile(mode)
    err = capsys.readouterr().err
    assert err.startswith(f"dinodet: mode '{mode}' compiles the model") and "TORCHINDUCTOR_CACHE_DIR" in err
    assert err.count("\n") == 1


def test_missing_checkpoint_subprocess(tmp_path: Path, image_dir: Path):
    result = run_cli("predict", image_dir, "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "nope.pt")
    assert not (tmp_path / "out").exists()


def _error_cases(tmp: Path, image_dir: Path, image: Path, ckpt: Path) -> dict[str, tuple[list[str], list[str]]]:
    """case -> (arguments after ``predict`` except --out/--size, fragments the error line must name)."""
    rand = ["--random-weights", "--preset", "tiny"]
    return {
        "wrong_preset": ([str(image), "--checkpoint", str(ckpt), "--preset", "dino_r50_4scale"], ["tiny.pt", "tiny"]),
        "unknown_preset": ([str(image), "--random-weights", "--preset", "bogus"], ["bogus"]),
        "unreadable_image": ([str(image_dir / "broken.jpg"), *rand], ["broken.jpg"]),
        "missing_input": ([str(tmp / "missing.jpg"), *rand], ["missing.jpg"]),
        "no_images": ([str(tmp / "empty"), *rand], ["no images", "empty"]),
        "preset_needed": ([str(image), "--random-weights"], ["--preset"]),
        "bad_device": ([str(image), *rand, "--device", "npu7"], ["npu7"]),
        "cuda_only_mode": ([str(image), *rand, "--mode", "fp16"], ["fp16", "not available on cpu"]),
        "unavailable_device": ([str(image), *rand, "--device", "mps"], ["'mps' is not available"]),
        "out_is_a_file": ([str(image), *rand, "--out", str(tmp / "file.txt")], ["file.txt", "must be a folder"]),
    }


@pytest.mark.parametrize(
    "case",
    ["wrong_preset", "unknown_preset", "unreadable_image", "missing_input", "no_images", "preset_needed",
     "bad_device", "cuda_only_mode", "unavailable_device", "out_is_a_file"],
)
def test_errors_are_one_line_exit_2(
    case: str, tmp_path: Path, image_dir: Path, sample_images: list[Path], tiny_checkpoint: Path, size_args, capsys
):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("not a folder")
    argv, fragments = _error_cases(tmp_path, image_dir, sample_images[0], tiny_checkpoint)[case]
    out = tmp_path / "out"
    rc = main(["predict", *argv, *([] if "--out" in argv else ["--out", str(out)]), *size_args])
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)
    assert not out.exists()  # a failed run leaves no (empty) output folder behind


def test_images_sharing_a_stem_all_get_results(tmp_path: Path, sample_images: list[Path], size_args):
    """cam1/x.jpg, cam2/x.jpg and cam2/x.png: three pictures and three distinct file_names."""
    from PIL import Image

    inputs = [tmp_path / "cam1" / "x.jpg", tmp_path / "cam2" / "x.jpg", tmp_path / "cam2" / "x.png",
              tmp_path / "cam2" / "solo.jpg"]
    for path, source in zip(inputs, sample_images * 4):
        path.parent.mkdir(exist_ok=True)
        Image.open(source).save(path)
    out = tmp_path / "out"
    rc = main(["predict", str(tmp_path / "cam1"), str(tmp_path / "cam2"), "--random-weights", "--preset", "tiny",
               "--threshold", "0", "--out", str(out), *size_args])
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.jpg")) == ["cam1_x.jpg", "cam2_x.jpg", "cam2_x_png.jpg", "solo.jpg"]
    names = {r["file_name"] for r in json.loads((out / "predictions.json").read_text())}
    assert names == {str(inputs[0]), str(inputs[1]), "x.png", "solo.jpg"}


def test_no_image_readable_writes_nothing(tmp_path: Path, size_args, capsys):
    broken = [tmp_path / "a.jpg", tmp_path / "b.png"]
    for path in broken:
        path.write_bytes(b"not an image")
    rc = main(["predict", *map(str, broken), "--random-weights", "--preset", "tiny", "--out", str(tmp_path / "out"),
               *size_args])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err[-1] == ("dinodet: error: none of the 2 images could be processed (see the warnings "
                                   "above); nothing written")
    assert sum("a.jpg" in line for line in err) == 1 and sum("b.png" in line for line in err) == 1
    assert not (tmp_path / "out").exists()


def test_one_bad_item_among_many_is_skipped(tmp_path: Path, sample_images: list[Path], size_args, capsys):
    """A missing input costs one image and one warning; a picture that cannot be written one warning
    (its detections are still in predictions.json)."""
    out = tmp_path / "out"
    (out / f"{sample_images[1].stem}.jpg").mkdir(parents=True)  # the annotated picture cannot be written
    rc = main(["predict", str(sample_images[0]), str(tmp_path / "typo.jpg"), str(sample_images[1]),
               "--random-weights", "--preset", "tiny", "--threshold", "0", "--out", str(out), "--overwrite",
               *size_args])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "typo.jpg" in err and f"cannot write '{out / sample_images[1].stem}.jpg'" in err
    records = json.loads((out / "predictions.json").read_text())
    assert {r["file_name"] for r in records} == {sample_images[0].name, sample_images[1].name}


def test_refuses_to_overwrite_inputs(image_dir: Path, size_args, capsys):
    before = (image_dir / "000000000009.jpg").read_bytes()
    rc = main(["predict", str(image_dir), "--random-weights", "--preset", "tiny", "--out", str(image_dir), *size_args])
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err, "overwrite", str(image_dir))
    assert (image_dir / "000000000009.jpg").read_bytes() == before


def test_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["predict", "--help"])
    assert info.value.code == 0 and "--random-weights" in capsys.readouterr().out
    assert main([]) == 2


# predictions.json holds the API's detections, in xywh, at the --size given
def test_predictions_json_equals_the_api_in_coco_xywh(tmp_path, sample_images, tiny_checkpoint, size_args):
    from dinodet.inference.detector import Detector

    out = tmp_path / "out"
    assert main(["predict", str(sample_images[0]), str(sample_images[2]), "--checkpoint", str(tiny_checkpoint),
                 "--out", str(out), "--threshold", "0.0", *size_args]) == 0
    records = json.loads((out / "predictions.json").read_text())
    det = Detector.from_checkpoint(tiny_checkpoint, size=160, max_size=256)
    for path, pred in zip((sample_images[0], sample_images[2]), det.predict([sample_images[0], sample_images[2]],
                                                                            threshold=0.0)):
        got = [r for r in records if r["file_name"] == path.name]
        assert len(got) == len(pred) == det.config.model.num_select
        x0, y0, x1, y1 = pred.boxes.unbind(-1)
        want = torch.stack([x0, y0, x1 - x0, y1 - y0], -1)
        torch.testing.assert_close(torch.tensor([r["bbox"] for r in got]), want, atol=0.006, rtol=0)
        assert [r["category_id"] for r in got] == pred.category_ids.tolist()
        torch.testing.assert_close(torch.tensor([r["score"] for r in got]), pred.scores, atol=6e-6, rtol=0)


def test_a_file_named_twice_runs_once(tmp_path: Path, sample_images: list[Path], size_args):
    image = sample_images[0]
    again = image.parent / ".." / image.parent.name / image.name  # the same file, spelled otherwise
    out = tmp_path / "out"
    assert main(["predict", str(image), str(again), "--random-weights", "--preset", "tiny", "--threshold", "0",
                 "--out", str(out), *size_args]) == 0
    assert [p.name for p in out.glob("*.jpg")] == [f"{image.stem}.jpg"]
    assert {r["file_name"] for r in json.loads((out / "predictions.json").read_text())} == {image.name}


def test_an_unwritable_out_is_found_before_the_work(tmp_path: Path, sample_images: list[Path], monkeypatch,
                                                    capsys):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    rc = main(["predict", str(sample_images[0]), "--checkpoint", str(tmp_path / "not_read.pt"),
               "--out", str(locked / "new" / "out")])
    assert rc == 2  # before the checkpoint is even looked at
    assert_one_line_error(capsys.readouterr().err, "no permission to write in", str(locked))
