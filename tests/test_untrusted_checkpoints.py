"""A checkpoint is untrusted input: broken weights, absurd sizes and a full disk are one line each.

Non-finite weights are refused at load on every path (predict, eval, fine-tuning, a run's EMA
weights) and non-finite outputs are never written as detections; a file's config is range-checked
and must describe its tensors before the real model is built (shapes first, allocation after).
"""
from __future__ import annotations

import argparse
import copy
import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL

from dinodet import checkpoint
from dinodet.checkpoint import CheckpointError, load_checkpoint, read_train_state, save_checkpoint
from dinodet.cli import main
from dinodet.compat.official_keys import to_official
from dinodet.config import apply_overrides
from dinodet.data.synthetic import make_synthetic_coco
from dinodet.inference import records
from dinodet.inference.records import coco_records
from dinodet.models import build_model
from dinodet.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_thread")
BAD_KEY = "class_head.bias"  # the tensor filled with NaN
CLASSES = ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module")
def tiny():
    cfg = apply_overrides(get_preset("tiny", num_classes=4), ["data.eval_size=64", "data.max_size=64",
                                                              "model.num_queries=20", "model.num_select=20"])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("data"), num_train=2, num_val=2, image_size=(64, 64), seed=0,
                               num_classes=4)


@pytest.fixture(scope="module")
def r50_official_state() -> dict[str, torch.Tensor]:
    """An official-format dino_r50_4scale state dict: what the official args describe."""
    cfg = get_preset("dino_r50_4scale")
    return to_official(build_model(cfg).state_dict(), cfg.model.dec_layers, len(cfg.model.backbone.return_layers))


def _broken(model: torch.nn.Module, value: float = float("nan")) -> torch.nn.Module:
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.state_dict()[BAD_KEY].fill_(value)
    return broken


def _official_file(path: Path, cfg, state: dict[str, torch.Tensor], args: dict | None = None) -> Path:
    obj = {"model": to_official(state, cfg.model.dec_layers, len(cfg.model.backbone.return_layers))}
    if args is not None:
        obj["args"] = argparse.Namespace(**args)
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("kind", ["dinodet", "safetensors", "official-args", "official-preset", "ema", "resume"])
def test_non_finite_weights_are_refused_at_load_naming_file_and_tensor(tmp_path: Path, tiny, kind: str):
    cfg, model = tiny
    bad = _broken(model, float("inf") if kind == "safetensors" else float("nan"))
    if kind in ("dinodet", "safetensors"):
        path = save_checkpoint(tmp_path / f"c.{'pt' if kind == 'dinodet' else 'safetensors'}", bad, cfg, CLASSES,
                               [1, 2, 3, 4])
    elif kind in ("ema", "resume"):
        path = save_checkpoint(tmp_path / "checkpoint.pt", model, cfg,
                               extra={"ema": {"module": bad.state_dict()}, "optimizer": {}})
    else:
        path = _official_file(tmp_path / "o.pth", cfg, bad.state_dict(), {})
    with pytest.raises(CheckpointError) as err:
        if kind == "resume":
            read_train_state(path)
        else:
            load_checkpoint(path, preset="tiny" if kind == "official-preset" else None, ema=True)
    msg = str(err.value)
    name = "class_embed.0.bias" if kind.startswith("official") else BAD_KEY
    assert msg.startswith(f"{path}: ") and name in msg and "non-finite" in msg and "\n" not in msg, msg
    assert ("EMA weights" in msg) == (kind in ("ema", "resume"))


@pytest.mark.parametrize("command", ["predict", "eval", "train"])
def test_nan_checkpoint_is_one_line_naming_the_file_for_every_command(tmp_path: Path, tiny, data: Path, capsys,
                                                                       command: str):
    cfg, model = tiny
    path = save_checkpoint(tmp_path / "nan.pt", _broken(model), cfg, CLASSES, [1, 2, 3, 4])
    out = tmp_path / "out"
    argv = {
        "predict": ["predict", str(next((data / "val2017").glob("*.jpg"))), "--checkpoint", str(path)],
        "eval": ["eval", "--data", str(data), "--checkpoint", str(path), "--no-progress"],
        "train": ["train", "--data", str(data), "--preset", "tiny", "--finetune-from", str(path), "--max-steps", "1",
                  "--no-progress", "--set", "data.train_scales=[64]", "--set", "data.max_size=64",
                  "--set", "data.crop_resize_scales=[64]", "--set", "data.crop_size=[48,64]",
                  "--set", "data.eval_size=64", "--set", "model.num_queries=20", "--set", "model.num_select=20"],
    }[command]
    assert main([*argv, "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dinodet: error:")]
    assert len(err) == 1 and err[0].startswith(f"dinodet: error: {path}: {BAD_KEY} holds non-finite"), err
    assert not list(out.rglob("metrics.json")) and not list(out.rglob("predictions.json"))


def test_non_finite_detections_are_never_written(caplog):
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([0.9, nan, 0.7, 0.6])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 5.0, 5.0], [nan, 0.0, 5.0, 5.0], [0.0, 0.0, inf, 5.0]])
    labels = torch.tensor([1, 2, 3, 4])
    records._warn_non_finite.cache_clear()
    with caplog.at_level(logging.WARNING, logger="dinodet"):
        kept = coco_records(scores, labels, boxes, image_id=1)
        coco_records(scores, labels, boxes, file_name="a.jpg", rounded=True)
    assert kept == [{"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "score": pytest.approx(0.9)}]
    json.loads(json.dumps(kept, allow_nan=False))  # valid JSON for other tools
    warned = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warned) == 1  # once, not once per image


# ----------------------------------------------------------------------------- sizes from files


def _no_real_build(real):
    """build_model that fails unless it builds on the meta device (a skeleton, no memory)."""
    def build(cfg):
        if torch.empty(0).device.type != "meta":
            raise AssertionError("a real model was built before the file's shapes were checked")
        return real(cfg)
    return build


@pytest.mark.parametrize("key, value, message", [
    ("dim_feedforward", 10**9, "model.dim_feedforward must be in [1, 65536]"),
    ("hidden_dim", 524288, "model.hidden_dim must be in [1, 4096]"),
    ("hidden_dim", 128, "level_embed has shape (4, 64) but the model expects (4, 128)"),  # in range, not the tensors
    ("dim_feedforward", 4096, "but the model expects (4096, 64)"),
    ("num_classes", 80, "class_head.weight has shape (4, 64) but the model expects (80, 64)"),
])
def test_a_dinodet_config_that_does_not_describe_its_tensors_is_refused_before_building(
        tmp_path: Path, tiny, monkeypatch, key: str, value: int, message: str):
    cfg, model = tiny
    path = save_checkpoint(tmp_path / "c.pt", model, cfg)
    obj = torch.load(path, weights_only=True)
    stored = json.loads(obj["config"])
    stored["model"][key] = value
    obj["config"] = json.dumps(stored)
    torch.save(obj, path)
    monkeypatch.setattr(checkpoint, "build_model", _no_real_build(checkpoint.build_model))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("args, message", [
    ({"dim_feedforward": 1e9}, "model.dim_feedforward must be in [1, 65536]"),
    ({"hidden_dim": 524288}, "model.hidden_dim must be in [1, 4096]"),
    ({"enc_layers": 10**6}, "model.enc_layers must be in [0, 64]"),
    ({"hidden_dim": 4096}, "but the model expects"),  # in range, but not what the file holds
    ({"num_queries": 9000}, "but the model expects"),
])
def test_official_args_that_do_not_describe_the_tensors_are_refused_before_building(
        tmp_path: Path, r50_official_state, monkeypatch, args: dict, message: str):
    official_args = json.loads((OFFICIAL / "DINO_4scale.args.json").read_text())
    path = tmp_path / "o.pth"
    torch.save({"model": r50_official_state, "args": argparse.Namespace(**{**official_args, **args})}, path)
    monkeypatch.setattr(checkpoint, "build_model", _no_real_build(checkpoint.build_model))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), err.value


def test_absurd_sizes_fail_fast_in_little_memory(tmp_path: Path, tiny, data: Path):
    """The issue's bar, in a fresh process: exit 2 with one line, peak memory under 2 GB, under 10 s."""
    cfg, model = tiny
    path = save_checkpoint(tmp_path / "c.pt", model, cfg)
    obj = torch.load(path, weights_only=True)
    stored = json.loads(obj["config"])
    stored["model"]["dim_feedforward"] = 10**9
    obj["config"] = json.dumps(stored)
    torch.save(obj, path)
    image = str(next((data / "val2017").glob("*.jpg")))
    script = (
        "import json, time\n"
        "from dinodet.cli import main\n"
        "import dinodet.inference.predict, dinodet.checkpoint  # the imports are not the time to bound\n"
        "t = time.perf_counter()\n"
        f"codes = [main(['predict', {image!r}, '--checkpoint', {str(path)!r}, '--out', {str(tmp_path / 'a')!r}]),\n"
        f"         main(['predict', {image!r}, '--random-weights', '--preset', 'tiny', '--size', '100000', '--max-size', '100000',\n"
        f"               '--out', {str(tmp_path / 'b')!r}])]\n"
        # VmHWM: this process's own peak (ru_maxrss would start at the forking pytest's size)
        "peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "print(json.dumps([codes, time.perf_counter() - t, peak]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    codes, seconds, max_rss_kb = json.loads(result.stdout.splitlines()[-1])
    assert codes == [2, 2]
    errors = result.stderr.splitlines()
    assert len(errors) == 2 and all(e.startswith("dinodet: error: ") for e in errors), errors
    assert "model.dim_feedforward must be in [1, 65536]" in errors[0] and str(path) in errors[0]
    assert "--size must be <= 8192, got 100000" in errors[1]
    assert seconds < 10 and max_rss_kb < 2 * 1024 * 1024, (seconds, max_rss_kb)  # VmHWM: KiB


# ----------------------------------------------------------------------------- disk full


TORCH_WRITE_FAILED = ("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: "
                      "file write failed")


@pytest.mark.parametrize("free, code, text", [(0, errno.ENOSPC, "No space left on device"),
                                              (10**12, errno.EIO, "writing the checkpoint failed")])
def test_a_failed_checkpoint_write_is_an_os_error_naming_the_file(tmp_path: Path, tiny, monkeypatch, free, code,
                                                                   text):
    cfg, model = tiny

    def full_disk(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise RuntimeError(TORCH_WRITE_FAILED)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": free})())
    with pytest.raises(OSError) as err:
        save_checkpoint(tmp_path / "checkpoint.pt", model, cfg)
    assert (err.value.errno, err.value.filename) == (code, str(tmp_path / "checkpoint.pt"))
    assert err.value.strerror.startswith(text)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_disk_full_while_training_is_one_line(tmp_path: Path, data: Path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError(TORCH_WRITE_FAILED)))
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 0})())
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--preset", "tiny", "--out", str(run), "--max-steps", "1",
                 "--no-progress", "--set", "data.train_scales=[64]", "--set", "data.max_size=64",
                 "--set", "data.crop_resize_scales=[64]", "--set", "data.crop_size=[48,64]",
                 "--set", "data.eval_size=64", "--set", "model.num_queries=20", "--set", "model.num_select=20"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("dinodet: error:")]
    assert len(lines) == 1 and lines[0].startswith("dinodet: error: No space left on device: '"), err
    assert str(run) in lines[0]
