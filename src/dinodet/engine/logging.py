"""Run logs: ``metrics.jsonl`` (one JSON object per epoch / evaluation) and TensorBoard scalars.

Only rank 0 logs; on other ranks a ``RunLogger`` is created with ``enabled=False`` and every call
is a no-op, so the training loop does not branch on the rank.  TensorBoard is optional: without
the ``tensorboard`` package the scalars are skipped with one warning, the JSONL log is always
written.
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"
TB_DIR = "tb"


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
                 tensorboard: bool = True):
        """``resume_step``: on resume, records after this global step (written by the killed run
        after its last checkpoint) are dropped, and TensorBoard purges them too."""
        self.enabled = enabled
        self.path = run_dir / METRICS_LOG
        self.records: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
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
        """TensorBoard only (e.g. per-step training loss)."""
        if self._tb is None:
            return
        for k, v in scalars.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"{prefix}{k}", v, step)

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
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k in ("epoch", "step") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                tag = k.replace("_", "/", 1) if k.startswith(("train_", "eval_")) else k
                self._tb.add_scalar(tag, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


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
