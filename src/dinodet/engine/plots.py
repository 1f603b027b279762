"""Training curves (loss and AP per epoch) as a PNG.

Uses matplotlib's object API with the Agg canvas directly, so no GUI backend and no pyplot global
state is involved (safe in headless jobs and in threads).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

LOSS_KEYS = ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou")
AP_KEYS = ("eval_AP", "eval_AP50", "eval_AP75")


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and "epoch" in r:
            xs.append(float(r["epoch"]))
            ys.append(float(v))
    return xs, ys


def plot_curves(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write ``path`` (PNG): training losses (left, log scale) and COCO AP (right) per epoch.

    ``records`` are metrics.jsonl records; ``epoch`` counts completed epochs (fractional for a run
    stopped mid-epoch by --max-steps).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_ap = fig.subplots(1, 2)
    for key in LOSS_KEYS:
        xs, ys = _series(records, key)
        if xs:
            ax_loss.plot(xs, ys, marker="o", label=key.removeprefix("train_"))
    if any(ax_loss.get_lines()):
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=8)
    ax_loss.set(title="training loss", xlabel="epoch")
    for key in AP_KEYS:
        xs, ys = _series(records, key)
        if xs:
            ax_ap.plot(xs, ys, marker="o", label=key.removeprefix("eval_"))
    if any(ax_ap.get_lines()):
        ax_ap.legend(fontsize=8)
    ax_ap.set(title="COCO AP (eval)", xlabel="epoch", ylim=(0, 1))
    for ax in (ax_loss, ax_ap):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)  # a viewer refreshing the file never sees half an image
    return path
