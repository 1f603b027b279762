"""``dinodet train / eval / check-data / demo`` through the command line.

The end-to-end run is a real subprocess on 12 coco128 images (tiny preset, 96 px, 2 steps); argument errors
and the small demo run go through ``main()`` in-process to save the interpreter start-up.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COCO128

from dinodet.cli import main

SMALL = ["--set", "data.train_scales=[96]", "--set", "data.max_size=128", "--set", "data.crop_resize_scales=[96]",
         "--set", "data.crop_size=[64,96]", "--set", "data.eval_size=96", "--set", "model.num_queries=20",
         "--set", "model.num_select=20"]
HEADLINE = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 spinning threads on a shared 2-core box are slower
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "dinodet", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


def check_metrics(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    for key in HEADLINE:
        value = metrics[key]
        assert isinstance(value, float) and (0.0 <= value <= 1.0 or value == -1.0), (key, value)
    return metrics


def one_line_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("dinodet: warning:")]
    assert len(err) == 1 and err[0].startswith("dinodet: error: "), err
    return err[0]


@pytest.mark.slow
def test_train_then_eval_on_coco128(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_cli("train", "--data", COCO128, "--preset", "tiny", "--out", run_dir, "--max-steps", "2",
                     "--batch-size", "2", "--no-progress", *SMALL)
    assert result.returncode == 0, result.stderr
    assert "no 'val' split" in result.stderr  # coco128 has only train2017: evaluated on it, with a warning
    assert "AP @.50" in result.stdout
    for name in ("checkpoint.pt", "checkpoint_best.pt", "metrics.jsonl", "curves.png", "config.json", "tb",
                 "pr_curve.png", "per_class_ap.png"):
        assert (run_dir / name).exists(), name
    assert len(list((run_dir / "val_predictions").glob("*.jpg"))) == 8  # --pictures' default
    metrics = check_metrics(run_dir / "metrics.json")
    assert metrics["step"] == 2 and metrics["num_images"] == 12
    assert isinstance(metrics["num_images"], int)  # counts are written as counts, not 12.0
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and "train_loss" in records[-1] and "eval_AP" in records[-1]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["num_classes"] == 80 and config["model"]["dn_labelbook_size"] is None

    out = tmp_path / "eval"
    result = run_cli("eval", "--data", COCO128, "--checkpoint", run_dir / "checkpoint.pt", "--batch-size", "4",
                     "--out", out, "--no-progress", "--pictures", "3")
    assert result.returncode == 0, result.stderr
    assert "AP @[.50:.95]" in result.stdout and "AP per class:" in result.stdout
    ev = check_metrics(out / "metrics.json")
    assert ev["split"] == "train"
    assert len(ev["per_class"]) == 80 and ev["per_class"]["person"]["AP"] >= 0.0
    assert (out / "pr_curve.png").is_file() and (out / "per_class_ap.png").is_file()
    assert len(list((out / "train_predictions").glob("*.jpg"))) == 3
    assert ev["AP"] == metrics["AP"]  # same weights, same images: the training run's final evaluation
    detections = json.loads((out / "predictions.json").read_text())
    coco_ids = {c["id"] for c in json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())["categories"]}
    assert detections and {d["category_id"] for d in detections} <= coco_ids  # the dataset's own ids

    # the trained checkpoint carries its label map into the prediction API
    from dinodet.inference.detector import Detector

    det = Detector.from_checkpoint(run_dir / "checkpoint_best.pt", size=96, max_size=128)
    pred = det.predict(COCO128 / "images" / "train2017" / "000000000009.jpg", threshold=0.0)[0]
    assert set(pred.category_ids.tolist()) <= coco_ids and "person" in det.class_names


def test_demo_small_run(tmp_path: Path, capsys):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = main(["demo", "--out", str(tmp_path / "demo"), "--no-progress",
                       "--set", "demo.num_train=4", "--set", "demo.num_val=2", "--set", "demo.image_size=64",
                       "--set", "train.epochs=1", "--set", "data.train_scales=[64]", "--set", "data.max_size=64",
                       "--set", "data.crop_resize_scales=[64]", "--set", "data.crop_size=[32,64]",
                       "--set", "data.eval_size=64"])
    finally:
        torch.set_num_threads(torch_threads)
    assert status == 0
    run_dir = tmp_path / "demo"
    metrics = check_metrics(run_dir / "metrics.json")
    assert metrics["num_images"] == 2
    assert len(list((run_dir / "val_predictions").glob("*.jpg"))) == 2
    assert (run_dir / "curves.png").is_file() and (run_dir / "data" / "annotations").is_dir()
    assert (run_dir / "per_class_ap.png").is_file()
    assert "AP @.50" in capsys.readouterr().out


def test_check_data_prints_the_report(capsys):
    assert main(["check-data", "--data", str(COCO128)]) == 0
    out = capsys.readouterr().out
    assert "[train]" in out and "12 images" in out and "result: OK" in out


def test_check_data_draws_the_labels(tmp_path: Path, capsys):
    import numpy as np
    from PIL import Image

    from dinodet.data.coco import build_dataset
    from dinodet.visualize import class_color

    assert main(["check-data", "--data", str(COCO128), "--out", str(tmp_path), "--pictures", "2"]) == 0
    assert "2 images with their boxes" in capsys.readouterr().out
    pictures = sorted((tmp_path / "train_labels").glob("*.jpg"))
    dataset = build_dataset(COCO128, "train", train=False)
    assert [p.stem for p in pictures] == [dataset.image_path(i).stem for i in range(2)]
    # the first box's left edge is drawn in its class colour (up to JPEG noise)
    target = dataset.raw_target(0)
    x0, y0, _, y1 = (round(v) for v in target["boxes"][0].tolist())
    edge = np.asarray(Image.open(pictures[0]))[(y0 + y1) // 2 - 5:(y0 + y1) // 2 + 5, x0].astype(float)
    color = class_color(dataset.label_map.class_names[int(target["labels"][0])])
    assert np.abs(edge.mean(axis=0) - color).max() < 40
    chart = Image.open(tmp_path / "train_classes.png")
    assert chart.height > 80 * 20  # a row per COCO class


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--data", "D", "--out", "R"], "--preset NAME is required"),
    (["train", "--data", str(COCO128), "--preset", "tiny", "--out", "R", "--set", "train.nope=1"],
     "unknown config key: train.nope"),
    (["train", "--data", str(COCO128), "--preset", "nope", "--out", "R"], "unknown preset 'nope'"),
    (["train", "--data", "D", "--preset", "tiny", "--out", "R", "--epochs", "0"], "--epochs must be >= 1"),
    (["train", "--data", "/nonexistent/data", "--preset", "tiny", "--out", "R"], "/nonexistent/data"),
    (["train", "--data", str(COCO128), "--preset", "tiny", "--out", "R", "--set", "train.amp=fp8"], "train.amp"),
    (["train", "--data", str(COCO128), "--preset", "tiny", "--out", "R", "--set", "train.lr=abc"],
     "train.lr must be a number"),
    (["eval", "--data", str(COCO128), "--checkpoint", "/nonexistent.pt"], "checkpoint not found"),
    (["eval", "--data", str(COCO128), "--checkpoint", "x.pt", "--mode", "fp16"], "'fp16' is not available on cpu"),
    (["eval", "--data", str(COCO128), "--checkpoint", "x.pt", "--out", str(COCO128 / "coco128.yaml")],
     "must be a folder"),  # found before the checkpoint is even read
    (["eval", "--data", "D", "--checkpoint", "x.pt", "--pictures", "-1"], "--pictures must be >= 0"),
    (["train", "--data", "D", "--preset", "tiny", "--out", "R", "--picture-threshold", "2"],
     "--picture-threshold must be in [0, 1]"),
    (["check-data", "--data", "/nonexistent/data"], "/nonexistent/data"),
    (["demo", "--out", "R", "--set", "demo.nope=3"], "unknown config key: demo.nope"),
    (["demo", "--out", "R", "--set", "model.nope=3"], "unknown config key: model.nope"),
    (["demo", "--out", "R", "--set", "demo.picture_threshold=abc"], "demo.picture_threshold must be a number"),
    (["demo", "--out", "R", "--set", "demo.max_pictures=x"], "demo.max_pictures must be an integer"),
])
def test_user_errors_are_one_line(capsys, tmp_path: Path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    assert fragment in one_line_error(capsys, *argv)


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--data", "D", "--preset", "tiny", "--out", "afile"], "--out 'afile' is a file; it must be a folder"),
    (["demo", "--out", "afile"], "--out 'afile' is a file"),
    (["train", "--data", "D", "--out", "empty", "--resume"], "nothing to resume, no empty/checkpoint.pt"),
    (["train", "--data", "data.yaml", "--preset", "tiny", "--out", "R"],
     "'data.yaml' is a file; --data takes the dataset folder (for this YOLO data file: --data . --format yolo)"),
    (["check-data", "--data", "ann/instances_train2017.json"], "for COCO data: --data ann"),
    (["check-data", "--data", "yolo", "--format", "coco"], "(the folder looks like a YOLO dataset: add --format yolo)"),
    (["check-data", "--data", "yolo"], "no class names found in 'yolo'"),  # --format auto: read as YOLO
    (["eval", "--data", "D", "--checkpoint", "empty"], "empty: a folder, not a checkpoint file"),
    (["eval", "--data", "D", "--checkpoint", "photo.jpg"], "photo.jpg: not a PyTorch checkpoint (a JPEG image)"),
    (["eval", "--data", "D", "--checkpoint", "model.onnx"], "an ONNX model; `dinodet predict --model` runs it"),
    (["eval", "--data", "D", "--checkpoint", "tiny.pt", "--preset", "bogus"], "unknown preset 'bogus'"),
    (["eval", "--data", "D", "--checkpoint", "x.pt", "--out", "run"], "--out 'run' holds a training run"),
])
def test_user_mistakes_with_files_are_one_line(capsys, tmp_path: Path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    for folder in ("D", "empty", "run", "ann", "yolo/labels/train"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "data.yaml").write_text("names: [a]\n")
    (tmp_path / "ann" / "instances_train2017.json").write_text("{}")
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"PK\x03\x04")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    if "tiny.pt" in argv:
        from dinodet.checkpoint import save_checkpoint
        from dinodet.models import build_model
        from dinodet.presets import get_preset

        save_checkpoint(tmp_path / "tiny.pt", build_model(get_preset("tiny")), get_preset("tiny"))
    assert fragment in one_line_error(capsys, *argv)


def test_demo_never_replaces_a_dataset_it_did_not_generate(capsys, tmp_path: Path):
    mine = tmp_path / "data" / "train2017" / "mine.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"user data")
    assert main(["demo", "--out", str(tmp_path), "--set", "demo.num_train=2"]) == 2
    msg = capsys.readouterr().err.splitlines()[-1]  # after the "generating ..." line
    assert msg.startswith("dinodet: error: ") and "did not generate" in msg and str(tmp_path / "data") in msg
    assert mine.read_bytes() == b"user data" and len(list(mine.parent.iterdir())) == 1


def test_eval_of_a_best_checkpoint_says_it_holds_ema_weights(tmp_path: Path, capsys):
    """checkpoint_best.pt of an EMA run stores the EMA weights as its weights (and says so)."""
    from dinodet.checkpoint import save_checkpoint
    from dinodet.config import apply_overrides
    from dinodet.data.synthetic import make_synthetic_coco
    from dinodet.models import build_model
    from dinodet.presets import get_preset

    data = make_synthetic_coco(tmp_path / "data", num_train=2, num_val=2, image_size=(64, 64), seed=0, num_classes=4)
    cfg = apply_overrides(get_preset("tiny", num_classes=4), ["data.eval_size=64", "data.max_size=64",
                                                              "model.num_queries=20", "model.num_select=20"])
    best = save_checkpoint(tmp_path / "checkpoint_best.pt", build_model(cfg), cfg,
                           ["circle", "square", "triangle", "cross"], [1, 2, 3, 4], extra={"ema_weights": True})
    assert main(["eval", "--data", str(data), "--checkpoint", str(best), "--out", str(tmp_path / "ev"),
                 "--no-progress", "--set", "model.num_queries=5", "--set", "model.num_select=10"]) == 0
    out = capsys.readouterr()
    assert "(EMA weights)" in out.out
    assert "warning: model.num_queries: the checkpoint's model is evaluated as built; ignored" in out.err
    assert "model.num_select" not in out.err  # the top-k size does apply
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["ema_weights"] is True


def test_under_torchrun_only_rank_0_warns_and_a_peer_failure_is_one_line(capsys, tmp_path: Path, monkeypatch):
    import logging

    import dinodet.cli as cli

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    levels = []

    def peer_gone(args):  # what a collective raises when rank 0 has exited
        levels.append(logging.getLogger("dinodet").level)
        logging.getLogger("dinodet.data").warning("said once per job")  # by rank 0, not here
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")

    monkeypatch.setattr(cli, "_run_check_data", peer_gone)
    monkeypatch.setattr(logging.getLogger("dinodet"), "level", logging.NOTSET)  # restored after the test
    assert main(["check-data", "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("dinodet: error: process 1: another process of the job stopped")
    assert levels == [logging.ERROR]  # while the command runs, data warnings come from rank 0 alone
    assert logging.getLogger("dinodet").level == logging.NOTSET  # and the logger is left as it was
    assert main(["demo", "--out", str(tmp_path)]) == 2  # the demo is one process
    assert "runs in one process" in capsys.readouterr().err


def test_unknown_backbone_is_one_error_line(capsys, tmp_path: Path):
    assert main(["train", "--data", str(COCO128), "--preset", "tiny", "--out", str(tmp_path), "--set",
                 'model.backbone.name="resnet9"']) == 2
    err = capsys.readouterr().err.splitlines()  # after the "training 'tiny' on ..." line
    assert err[-1].startswith("dinodet: error: model config: unknown ResNet 'resnet9'") and "Traceback" not in err


def test_train_refuses_an_existing_run_without_resume(capsys, tmp_path: Path):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    msg = one_line_error(capsys, "train", "--data", str(COCO128), "--preset", "tiny", "--out", str(tmp_path))
    assert "--resume" in msg


def test_slurm_needs_submitit(capsys, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    msg = one_line_error(capsys, "train", "--data", str(COCO128), "--preset", "tiny", "--out", str(tmp_path),
                         "--slurm")
    assert "submitit" in msg


def test_slurm_submission_with_a_stand_in_submitit(capsys, tmp_path: Path, monkeypatch):
    """What would reach SLURM: executor parameters, the command without --slurm*, and a
    requeue that adds --resume (submitit itself is not installed here)."""
    import types

    submitted = {}

    class Executor:
        def __init__(self, folder):
            submitted["folder"] = folder

        def update_parameters(self, **params):
            submitted["params"] = params

        def submit(self, job):
            submitted["job"] = job
            return types.SimpleNamespace(job_id="1234")

    class DelayedSubmission:
        def __init__(self, fn):
            self.fn = fn

    fake = types.ModuleType("submitit")
    fake.AutoExecutor = Executor
    fake.helpers = types.SimpleNamespace(DelayedSubmission=DelayedSubmission)
    monkeypatch.setitem(sys.modules, "submitit", fake)
    argv = ["train", "--data", str(COCO128), "--preset", "tiny", "--out", str(tmp_path), "--device", "cuda",
            "--slurm", "--slurm-nodes", "2", "--slurm-gpus-per-node", "4", "--slurm-partition", "gpu"]
    assert main(argv) == 0
    assert "submitted SLURM job 1234" in capsys.readouterr().out
    assert submitted["folder"] == str(tmp_path / "slurm")
    p = submitted["params"]
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"], p["slurm_partition"]) == (2, 4, 4, "gpu")
    job = submitted["job"]
    assert job.argv == argv[:9]
    assert job.checkpoint().fn.argv == [*argv[:9], "--resume"]


def test_missing_backbone_checkpoint_is_one_clear_line(tmp_path: Path):
    missing = tmp_path / "swin_large_patch4_window12_384_22k.pth"
    result = run_cli("train", "--data", COCO128, "--preset", "tiny", "--out", tmp_path / "run", "--max-steps", "1",
                     "--backbone-checkpoint", missing, "--no-progress", *SMALL)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dinodet: error:")]
    assert len(lines) == 1 and str(missing) in lines[0] and "not found" in lines[0]


# eval --set model.num_select=10 is applied (2 val images x 10 detections)
def test_eval_num_select_override_is_applied(tmp_path, capsys):
    from dinodet.checkpoint import save_checkpoint
    from dinodet.config import apply_overrides
    from dinodet.data.synthetic import make_synthetic_coco
    from dinodet.models import build_model
    from dinodet.presets import get_preset

    data = make_synthetic_coco(tmp_path / "data", num_train=2, num_val=2, image_size=(64, 64), seed=0, num_classes=4)
    cfg = apply_overrides(get_preset("tiny", num_classes=4), ["data.eval_size=64", "data.max_size=64",
                                                              "model.num_queries=20", "model.num_select=20"])
    ckpt = save_checkpoint(tmp_path / "c.pt", build_model(cfg), cfg, ["circle", "square", "triangle", "cross"],
                           [1, 2, 3, 4])
    assert main(["eval", "--data", str(data), "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev"),
                 "--no-progress", "--pictures", "0", "--set", "model.num_select=10"]) == 0
    assert len(json.loads((tmp_path / "ev" / "predictions.json").read_text())) == 2 * 10

    # an unreadable image: one prefixed warning line, left out of the scores, the rest evaluated
    capsys.readouterr()
    broken = next((data / "val2017").glob("*.jpg"))
    broken.write_bytes(b"not an image")
    seen_by_root: list[logging.LogRecord] = []  # an application that configured its own logging
    root_handler = logging.Handler()
    root_handler.emit = seen_by_root.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(root_handler)
    try:
        assert main(["eval", "--data", str(data), "--checkpoint", str(ckpt), "--no-progress"]) == 0
    finally:
        logging.getLogger().removeHandler(root_handler)
    captured = capsys.readouterr()
    assert captured.err.count(f"dinodet: warning: cannot read image '{broken}'") == 1
    assert not [r for r in seen_by_root if r.name.startswith("dinodet")]  # said once, not twice
    assert logging.getLogger("dinodet").propagate and not logging.getLogger("dinodet").handlers  # restored
    assert f"1 of 2 images could not be read and are left out of the scores: {broken.name}" in captured.err
    assert "dinodet: 1 images of 'val', 20 detections" in captured.out
    for image in (data / "val2017").glob("*.jpg"):  # none readable: an error, not AP 0
        image.write_bytes(b"not an image")
    assert main(["eval", "--data", str(data), "--checkpoint", str(ckpt), "--no-progress"]) == 2
    assert "dinodet: error: no image of 'val'" in capsys.readouterr().err


# the train flags reach the config (what config.json and the run use)
def test_train_flags_become_config_values(tmp_path):
    from dinodet.engine.run_config import train_run_config

    cfg, label_map = train_run_config("tiny", tmp_path, overrides=["train.lr=3e-4"], epochs=3, batch_size=5,
                                      amp="bf16", backbone_checkpoint="r18.pth")
    assert label_map is None
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.amp, cfg.train.lr) == (3, 5, "bf16", 3e-4)
    assert cfg.model.backbone.checkpoint == "r18.pth"
