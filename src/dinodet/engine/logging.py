"""Run logs: ``metrics.jsonl`` (one JSON object per epoch / evaluation), TensorBoard scalars and,
when asked for (``train --log``), MLflow and Weights & Biases.

Only rank 0 logs; on other ranks a ``RunLogger`` is created with ``enabled=False`` and every call
is a no-op, so the training loop does not branch on the rank.  TensorBoard is optional: without
the ``tensorboard`` package the scalars are skipped with one warning, the JSONL log is always
written.  MLflow (``pip install 'dinodet[mlflow]'``: mlflow-skinny) logs to a local file store in
RUN_DIR/mlruns unless a tracking URI is given; Weights & Biases (``pip install 'dinodet[wandb]'``)
runs in offline mode into RUN_DIR/wandb (``wandb sync`` uploads it later): no network is needed.
Both get the run's settings as parameters and the same scalars as TensorBoard, and a resumed run
continues the same MLflow / W&B run (their ids are kept in RUN_DIR/loggers.json).
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"
TB_DIR = "tb"
LOGGERS = ("mlflow", "wandb")  # besides TensorBoard, on request
LOGGER_IDS = "loggers.json"  # the MLflow / W&B run ids of the run, so that a resume continues them
MLFLOW_DIR = "mlruns"
WANDB_DIR = "wandb"
_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}


def check_loggers(loggers: Sequence[str]) -> None:
    """Before the slow work: every logger of ``loggers`` is known and its package installed.

    Raises:
        ConfigError: one line naming the logger and the pip command.
    """
    for name in loggers:
        if name not in LOGGERS:
            raise ConfigError(f"unknown logger '{name}' (choose from {', '.join(LOGGERS)}; TensorBoard is always on)")
        try:
            importlib.import_module(_PACKAGES[name])
        except ImportError:
            raise ConfigError(f"--log {name} needs the '{_PACKAGES[name]}' package: "
                              f"pip install 'dinodet[{name}]'") from None


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (missing file: none; a torn last line is ignored)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves at most one partial line
    return records


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/inf; null keeps each line parseable by strict readers
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Appends records to ``RUN_DIR/metrics.jsonl`` and mirrors scalars to ``RUN_DIR/tb``."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True, loggers: Sequence[str] = (), tracking_uri: str | None = None,
                 params: dict[str, Any] | None = None):
        """``resume_step``: on resume, records after this global step (written by the killed run
        after its last checkpoint) are dropped, and TensorBoard purges them too.  ``loggers``: any
        of ``LOGGERS``; ``tracking_uri``: MLflow's (default: a file store in RUN_DIR/mlruns);
        ``params``: the run's settings, given to them as parameters."""
        self.enabled = enabled
        self.path = run_dir / METRICS_LOG
        self.records: list[dict[str, Any]] = []
        self._tb = None
        self._sinks: list[Any] = []
        if not enabled:
            return
        check_loggers(loggers)
        ids_path = run_dir / LOGGER_IDS
        ids = _read_ids(ids_path) if resume_step is not None else {}
        for name in dict.fromkeys(loggers):
            sink = (_MlflowSink(run_dir, tracking_uri, params or {}, ids.get(name)) if name == "mlflow"
                    else _WandbSink(run_dir, params or {}, ids.get(name)))
            ids[name] = sink.run_id
            self._sinks.append(sink)
        if self._sinks:
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = ids_path.with_name(f".{ids_path.name}.tmp")
            tmp.write_text(json.dumps(ids), encoding="utf-8")
            tmp.replace(ids_path)
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            self.records = [r for r in read_metrics_log(self.path) if r.get("step", 0) <= resume_step]
            self._rewrite()
        if tensorboard:
            self._tb = _make_summary_writer(run_dir / TB_DIR, resume_step)

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")
        tmp.replace(self.path)

    def log_scalars(self, step: int, scalars: dict[str, float], prefix: str = "") -> None:
        """TensorBoard, MLflow and W&B only (e.g. per-step training loss)."""
        finite = {f"{prefix}{k}": float(v) for k, v in scalars.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for sink in self._sinks:
            sink.log(step, finite)
        if self._tb is None:
            return
        for k, v in finite.items():
            self._tb.add_scalar(k, v, step)

    def log_record(self, record: dict[str, Any]) -> None:
        """One epoch / evaluation summary: appended to metrics.jsonl, numeric fields to TensorBoard.

        Flat keys ``train_*`` / ``eval_*`` become TensorBoard tags ``train/*`` / ``eval/*``.
        """
        if not self.enabled:
            return
        record = {k: _json_safe(v) for k, v in record.items()}
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = int(record.get("step", 0))
        scalars = {(k.replace("_", "/", 1) if k.startswith(("train_", "eval_")) else k): float(v)
                   for k, v in record.items()
                   if k not in ("epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for sink in self._sinks:
            sink.log(step, {**scalars, "epoch": float(record.get("epoch", 0))})
        if self._tb is not None:
            for tag, v in scalars.items():
                self._tb.add_scalar(tag, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def _read_ids(path: Path) -> dict[str, str]:
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(ids, dict) else {}


def flatten_settings(settings: dict[str, Any], prefix: str = "", *, tuples_as_lists: bool = True) -> dict[str, Any]:
    """A nested settings mapping as ``{"a.b.c": value}``.

    ``tuples_as_lists``: a tuple value becomes a list, as YAML and JSON hold it (run files); False
    keeps it a tuple (MLflow parameters are its ``str``, "(480, 512)", as they always were)."""
    out: dict[str, Any] = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out.update(flatten_settings(v, f"{prefix}{k}.", tuples_as_lists=tuples_as_lists))
        else:
            out[f"{prefix}{k}"] = list(v) if tuples_as_lists and isinstance(v, tuple) else v
    return out


def _params(params: dict[str, Any]) -> dict[str, str]:
    """Nested settings as flat ``a.b: text`` parameters (MLflow's)."""
    return {k: str(v) for k, v in flatten_settings(params, tuples_as_lists=False).items()}


class _MlflowSink:
    """One MLflow run (through ``MlflowClient``: no global active-run state)."""

    def __init__(self, run_dir: Path, tracking_uri: str | None, params: dict[str, Any], run_id: str | None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the file store's deprecation notice
            from mlflow.tracking import MlflowClient

            uri = tracking_uri or (run_dir / MLFLOW_DIR).absolute().as_uri()
            if tracking_uri is None:  # MLflow 3 refuses a file store unless told (its database store
                # needs SQLAlchemy, which mlflow-skinny lacks); a file store suits one run's folder
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.client = MlflowClient(tracking_uri=uri)
            if run_id is None:
                experiment = self.client.get_experiment_by_name("dinodet")
                experiment_id = (experiment.experiment_id if experiment is not None
                                 else self.client.create_experiment("dinodet"))
                run_id = self.client.create_run(experiment_id, run_name=run_dir.absolute().name).info.run_id
                for k, v in _params(params).items():
                    self.client.log_param(run_id, k, v[:6000])  # MLflow's limit on a parameter value
        self.run_id: str = run_id
        log.info(f"MLflow run {run_id} at {uri}")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        for k, v in scalars.items():
            self.client.log_metric(self.run_id, k, v, timestamp=now, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandbSink:
    """One Weights & Biases run in offline mode (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it)."""

    def __init__(self, run_dir: Path, params: dict[str, Any], run_id: str | None):
        import wandb

        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project="dinodet", name=run_dir.absolute().name, dir=str(run_dir), mode="offline",
                              config=params, id=run_id, resume="allow" if run_id else None)
        self.run_id: str = str(self.run.id)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def _make_summary_writer(log_dir: Path, purge_step: int | None):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tensorboard's own deprecation chatter
            from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        log.warning(f"TensorBoard logging disabled ({e})")
        return None
    # purge_step drops events (step >= purge_step) a killed run logged after its last checkpoint
    return SummaryWriter(log_dir=str(log_dir), purge_step=None if purge_step is None else purge_step + 1)
