"""Pictures of results as PNGs: training curves (loss and AP per epoch), precision-recall curves and
per-class AP, the confusion matrix and the error breakdown of an evaluation, and speed charts (``dinodet bench``).

Uses matplotlib's object API with the Agg canvas directly, so no GUI backend and no pyplot global
state is involved (safe in headless jobs and in threads).  matplotlib's warnings (e.g. a class name's
glyph missing from the font) are logged as dinodet warnings naming the picture.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from ..data.images import logged_warnings

LOSS_KEYS = ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou")
AP_KEYS = ("eval_AP", "eval_AP50", "eval_AP75")

_T = TypeVar("_T")
_P = ParamSpec("_P")


def _warnings_logged(plot: Callable[Concatenate[_T, Path, _P], Path]) -> Callable[Concatenate[_T, Path, _P], Path]:
    """Run ``plot(data, path, ...)`` with matplotlib's warnings re-logged naming ``path``."""
    @functools.wraps(plot)
    def run(data: _T, path: Path, /, *args: _P.args, **kwargs: _P.kwargs) -> Path:
        with logged_warnings(path):
            return plot(data, path, *args, **kwargs)
    return run


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and "epoch" in r:
            xs.append(float(r["epoch"]))
            ys.append(float(v))
    return xs, ys


@_warnings_logged
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
    return _save(fig, path)


@_warnings_logged
def plot_precision_recall(pr_curves: dict[str, Sequence[float]], path: Path, title: str = "") -> Path:
    """Write ``path`` (PNG): precision against recall, one line per IoU threshold (``EvalResult.pr_curves``:
    "recall" plus per-threshold precision averaged over the classes), the legend giving each line's
    area (its AP)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recall = list(pr_curves.get("recall", []))
    lines = {k: list(v) for k, v in pr_curves.items() if k != "recall"}
    if not recall or not lines:
        raise ValueError("no precision-recall data to plot (nothing was detected)")
    fig = Figure(figsize=(5.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, precision in lines.items():
        ap = sum(precision) / len(precision)  # COCO's AP: the mean over its 101 recall points
        ax.plot(recall, precision, label=f"{label} (AP {ap:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=title or "precision-recall (mean over classes)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


@_warnings_logged
def plot_per_class_ap(per_class: dict[str, dict[str, float]], path: Path, title: str = "") -> Path:
    """Write ``path`` (PNG): AP and AP50 of each class as horizontal bars, worst class at the bottom
    (``EvalResult.per_class``; classes without GT, AP -1, are left out)."""

    rows = sorted(((n, v) for n, v in per_class.items() if v.get("AP", -1) >= 0), key=lambda x: -x[1]["AP"])
    if not rows:
        raise ValueError("no class with ground truth to plot")
    fig, ax = _row_chart([n for n, _ in rows])
    ys = range(len(rows))
    ax.barh(ys, [v["AP50"] for _, v in rows], color="tab:blue", alpha=0.35, label="AP50")
    ax.barh(ys, [v["AP"] for _, v in rows], color="tab:blue", label="AP")
    for y, (_, v) in zip(ys, rows):
        ax.text(max(v["AP50"], v["AP"]), y, f" {v['AP']:.3f}", va="center", fontsize=7)
    ax.set(xlim=(0, 1.1), xlabel="AP", title=title or "AP per class")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


@_warnings_logged
def plot_confusion_matrix(confusion: dict[str, Any], path: Path, title: str = "", annotate_up_to: int = 30) -> Path:
    """Write ``path`` (PNG): the confusion matrix (``EvalResult.confusion``), each GT row normalised
    to its share (so rare and common classes read alike), with the counts written in the cells when
    there are at most ``annotate_up_to`` classes (more would not be legible)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = [list(map(int, row)) for row in confusion.get("counts", [])]
    if not counts or not any(any(row) for row in counts):
        raise ValueError("no ground truth or detection to count")
    names = list(confusion["classes"])
    shares = [[c / max(sum(row), 1) for c in row] for row in counts]
    side = min(4 + 0.35 * len(names), 24)
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the GT row")
    fontsize = 8 if len(names) <= 30 else 5
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(names)), names, fontsize=fontsize)
    if len(names) - 1 <= annotate_up_to:
        for i, row in enumerate(counts):
            for j, c in enumerate(row):
                if c:
                    ax.text(j, i, str(c), ha="center", va="center", fontsize=7,
                            color="white" if shares[i][j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="ground truth",
           title=title or f"confusion matrix (IoU {confusion['iou']:g}, score > {confusion['score']:g})")
    fig.tight_layout()
    return _save(fig, path)


@_warnings_logged
def plot_error_breakdown(breakdown: dict[str, Any], path: Path, title: str = "") -> Path:
    """Write ``path`` (PNG): the TIDE error breakdown (``engine.tide.error_breakdown``) as one bar per
    error type, its dAP (AP50 points gained by fixing it), labelled with how many errors it counts."""
    errors = breakdown.get("errors") or {}
    if not errors:
        raise ValueError("no error breakdown")
    names = list(errors)
    fig, ax = _row_chart(names)
    values = [float(errors[n]["dAP"]) for n in names]
    ax.barh(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
    for y, n in enumerate(names):
        ax.text(values[y], y, f" {values[y]:.2f} ({errors[n]['count']})", va="center", fontsize=8)
    ax.set_xlim(0, max(max(values), 1.0) * 1.3)
    ax.set(xlabel="dAP50: AP50 points gained by fixing these errors (count)",
           title=title or f"error breakdown (TIDE), AP50 {float(breakdown['AP50']):.1f}")
    ax.grid(axis="x", alpha=0.3)
    fig.set_size_inches(7, 3.2)
    fig.tight_layout()
    return _save(fig, path)


@_warnings_logged
def plot_class_counts(counts: dict[str, int], path: Path, title: str = "") -> Path:
    """Write ``path`` (PNG): training boxes per class as horizontal bars, in class order (a class
    with none stands out as an empty row)."""

    if not counts:
        raise ValueError("no classes to plot")
    fig, ax = _row_chart(list(counts))
    values = list(counts.values())
    ax.barh(range(len(values)), values, color="tab:green")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v}", va="center", fontsize=7)
    ax.set_xlim(0, max(max(values), 1) * 1.15)
    ax.set(xlabel="boxes", title=title or "boxes per class")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


@_warnings_logged
def plot_speed(records: Sequence[dict[str, Any]], path: Path, title: str = "",
               marks: dict[str, dict[str, float]] | None = None) -> Path:
    """Write ``path`` (PNG): one horizontal bar chart per task of ``dinodet bench`` records (ms per
    image / per step for each mode, labelled with the speed-up over the reference).

    ``marks``: per task, named vertical lines in ms (e.g. ``{"infer": {"official fp32": 58.8}}``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in records))
    if not tasks:
        raise ValueError("no benchmark records to plot")
    fig = Figure(figsize=(8, 0.6 + 2.6 * len(tasks)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(tasks), 1, squeeze=False)[:, 0]
    for ax, task in zip(axes, tasks):
        rows = [r for r in records if r["task"] == task]
        names = [r["mode"] for r in rows]
        ms = [float(r["ms"]) for r in rows]
        colors = ["0.6" if n == "reference" else "tab:blue" for n in names]
        ax.barh(range(len(rows)), ms, color=colors)
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()  # the reference on top, as in the table
        for i, r in enumerate(rows):
            ax.text(ms[i], i, f" {ms[i]:.1f} ({float(r['speedup']):.2f}x)", va="center", fontsize=8)
        for j, (label, value) in enumerate((marks or {}).get(task, {}).items()):
            ax.axvline(value, color=f"C{j + 1}", linestyle="--", linewidth=1, label=f"{label}: {value:g}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlim(0, max(ms + list((marks or {}).get(task, {}).values())) * 1.3)
        ax.set(xlabel="ms per image" if task == "infer" else "ms per training step", title=f"{title} {task}".strip())
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _row_chart(names: Sequence[str]) -> tuple[Any, Any]:
    """A figure tall enough for one horizontal bar per name, names on the y axis top-down."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 1.2 + 0.22 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set_yticks(range(len(names)), list(names), fontsize=8)
    ax.invert_yaxis()
    ax.margins(y=0.01)
    return fig, ax


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)  # a viewer refreshing the file never sees half an image
    return path
