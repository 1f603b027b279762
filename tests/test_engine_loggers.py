"""``train --log mlflow`` / ``--log wandb``: the run's settings and scalars reach them, a resumed run
continues the same MLflow / W&B run, and a missing package is one line naming the pip command.

The real packages are not in the test extra (see the test docstrings): stand-in modules injected
through ``sys.modules`` record the calls dinodet makes on their APIs."""
from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

import pytest
from conftest import COCO128

from dinodet.cli import main
from dinodet.config import ConfigError
from dinodet.engine.logging import LOGGER_IDS, RunLogger, check_loggers


class _Client:
    """Stand-in of ``mlflow.tracking.MlflowClient`` (the calls dinodet makes)."""

    calls: typing.ClassVar[list[tuple]] = []

    def __init__(self, tracking_uri: str):
        self.calls.append(("uri", tracking_uri))

    def get_experiment_by_name(self, name: str):
        return None

    def create_experiment(self, name: str) -> str:
        return "7"

    def create_run(self, experiment_id: str, run_name: str):
        self.calls.append(("create_run", experiment_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="run42"))

    def log_param(self, run_id: str, key: str, value: str) -> None:
        self.calls.append(("param", key, value))

    def log_metric(self, run_id: str, key: str, value: float, timestamp: int, step: int) -> None:
        self.calls.append(("metric", run_id, key, value, step))

    def set_terminated(self, run_id: str) -> None:
        self.calls.append(("end", run_id))


class _WandbRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False
        self.id = kwargs.get("id") or "w1"

    def log(self, data: dict, step: int) -> None:
        self.logged.append((step, data))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> list[_WandbRun]:
    mlflow, tracking, wandb = (types.ModuleType(n) for n in ("mlflow", "mlflow.tracking", "wandb"))
    tracking.MlflowClient = _Client
    mlflow.tracking = tracking
    runs: list[_WandbRun] = []
    wandb.init = lambda **kw: runs.append(_WandbRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", tracking)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    _Client.calls = []
    return runs


def test_scalars_and_settings_reach_mlflow_and_wandb(tmp_path: Path, stand_ins: list[_WandbRun]) -> None:
    logger = RunLogger(tmp_path, tensorboard=False, loggers=("mlflow", "wandb"), params={"train": {"lr": 1e-4}})
    logger.log_scalars(20, {"loss": 1.5, "lr": 1e-4}, prefix="train_step/")
    logger.log_record({"epoch": 1, "step": 40, "train_loss": 1.25, "eval_AP": 0.5, "note": "x"})
    logger.close()
    calls = _Client.calls
    assert calls[0] == ("uri", (tmp_path / "mlruns").absolute().as_uri())  # a local file store by default
    assert ("param", "train.lr", "0.0001") in calls
    assert ("metric", "run42", "train_step/loss", 1.5, 20) in calls
    assert ("metric", "run42", "eval/AP", 0.5, 40) in calls and ("metric", "run42", "train/loss", 1.25, 40) in calls
    assert calls[-1] == ("end", "run42")
    (run,) = stand_ins
    assert run.kwargs["mode"] == "offline" and run.kwargs["dir"] == str(tmp_path)  # never the network
    assert run.kwargs["config"] == {"train": {"lr": 1e-4}}
    assert run.logged[1] == (40, {"train/loss": 1.25, "eval/AP": 0.5, "epoch": 1.0}) and run.finished
    assert (tmp_path / LOGGER_IDS).is_file()

    _Client.calls = []
    resumed = RunLogger(tmp_path, tensorboard=False, resume_step=40, loggers=("mlflow", "wandb"),
                        tracking_uri="http://tracking:5000")
    resumed.close()
    assert _Client.calls[0] == ("uri", "http://tracking:5000")
    assert not [c for c in _Client.calls if c[0] == "create_run"]  # the same MLflow run continues
    assert stand_ins[-1].kwargs["id"] == "w1" and stand_ins[-1].kwargs["resume"] == "allow"


def test_missing_package_is_one_line_naming_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"--log wandb needs the 'wandb' package: pip install 'dinodet\[wandb\]'"):
        check_loggers(["wandb"])
    with pytest.raises(ConfigError, match="unknown logger 'comet'"):
        check_loggers(["comet"])
    assert main(["train", "--data", str(COCO128), "--preset", "tiny", "--out", str(tmp_path / "r"),
                 "--log", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dinodet: error: --log wandb needs the 'wandb' package: pip install 'dinodet[wandb]'"]
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # refused before any work
