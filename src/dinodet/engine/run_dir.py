"""A training run's folder: the files a run writes there, and the rule that no run overwrites
another's results (``check_run_dir``)."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .logging import METRICS_LOG, TB_DIR
from .pictures import PER_CLASS_AP, PR_CURVE, PREDICTIONS_DIR

CHECKPOINT = "checkpoint.pt"
BEST_CHECKPOINT = "checkpoint_best.pt"
FINAL_METRICS = "metrics.json"
CURVES = "curves.png"
RESOLVED_CONFIG = "config.json"
# everything a run writes in RUN_DIR besides checkpoint.pt, none of which a new run may overwrite
RUN_OUTPUTS = (BEST_CHECKPOINT, FINAL_METRICS, METRICS_LOG, RESOLVED_CONFIG, CURVES, PR_CURVE, PER_CLASS_AP,
               PREDICTIONS_DIR, TB_DIR)

def check_run_dir(run_dir: Path, resume: bool) -> bool:
    """Whether the run in ``run_dir`` is to be resumed (``resume`` and a checkpoint.pt there).

    Raises ConfigError rather than overwrite an earlier run's results: a checkpoint.pt without
    ``resume``, or files a run writes with no checkpoint.pt to continue from.  One exception: with
    ``resume``, a run stopped before its first checkpoint (only its log, config and curves exist,
    no best checkpoint or final metrics) starts over there, as a requeued job needs."""
    if (run_dir / CHECKPOINT).is_file():
        if not resume:
            raise ConfigError(f"'{run_dir}' already holds a run ({CHECKPOINT}); pass --resume to continue it "
                              "or choose another --out")
        return True
    earlier = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    finished = [name for name in (BEST_CHECKPOINT, FINAL_METRICS) if name in earlier]
    if not earlier or (resume and not finished):
        return False
    hint = ("" if finished else f"; if it is a run stopped before its first {CHECKPOINT}, pass --resume to start "
            "it over")
    raise ConfigError(f"'{run_dir}' holds an earlier run's results ({', '.join(earlier)}) but no {CHECKPOINT} "
                      f"to resume from; choose another --out{hint}")
