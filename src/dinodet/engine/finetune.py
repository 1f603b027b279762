"""Starting a training run from another model's weights (``dinodet train --finetune-from``).

Any checkpoint works, official or dinodet.  The class-specific parameters (the class heads and the
denoising label book, whose rows are indexed by class) are carried over row by row for the classes
the checkpoint also knows, matched by category id and name, else by name (case-insensitive): a
COCO model fine-tuned on a COCO subset, or on the same classes in YOLO format (ids 0..N-1), keeps
what it learned about them.  Rows of classes it does not know keep their fresh initialisation.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from ..checkpoint import CheckpointError, load_weights_for_architecture
from ..models.dino import DINO

# Parameters whose rows are classes: [C, ...] for the heads, [labelbook + 1, D] for the label book.
CLASS_HEAD_PREFIXES = ("class_head.", "query_selection.class_head.")
LABEL_BOOK_PREFIX = "denoising.label_embed."
PLACEHOLDER_NAMES = ("n/a",)  # the unused slots of the official 91-slot COCO layout


@dataclass
class FinetuneResult:
    """What ``load_finetune_weights`` did: the classes carried over from the checkpoint (names of
    the run's classes), those starting fresh, and the tensors left entirely at initialisation."""

    carried: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    same_layout: bool = True  # the checkpoint has exactly these classes, in this order, with these ids

    def summary(self) -> str:
        """A parenthesised remark for the "fine-tuning from ..." line ("" when the classes are the same)."""
        if self.same_layout:
            return ""
        if not self.new:
            return f" (all {len(self.carried)} classes carried over from the checkpoint's class layout)"
        if not self.carried:
            return " (class heads re-initialised: none of the dataset's classes is in the checkpoint)"
        return (f" ({len(self.carried)} of {len(self.carried) + len(self.new)} classes carried over from the "
                f"checkpoint; new: {', '.join(self.new[:5])}{' ...' if len(self.new) > 5 else ''})")


def class_rows(src_names: Sequence[str], src_ids: Sequence[int], names: Sequence[str],
               ids: Sequence[int]) -> list[int | None]:
    """For each class k of (names, ids): its row in the checkpoint's class layout, or None.

    By category id when the checkpoint has that id under the same name, else by name
    (case-insensitive; placeholder slots such as the official "N/A" never match)."""
    by_id = {int(c): i for i, c in enumerate(src_ids)}
    by_name: dict[str, int] = {}
    for i, n in enumerate(src_names):
        if n.lower() not in PLACEHOLDER_NAMES:
            by_name.setdefault(n.lower(), i)
    rows: list[int | None] = []
    for name, cid in zip(names, ids):
        i = by_id.get(int(cid))
        if i is not None and src_names[i].lower() == name.lower():
            rows.append(i)
        else:
            rows.append(by_name.get(name.lower()))
    return rows


def load_finetune_weights(model: DINO, path: str | os.PathLike, class_names: list[str],
                          category_ids: list[int]) -> FinetuneResult:
    """Initialise ``model`` (built for ``class_names`` / ``category_ids``) from a checkpoint.

    Every parameter is loaded; the class-row parameters (see the module docstring) row by row when
    the classes differ.  Any other missing, unexpected or mis-shaped key means another
    architecture: CheckpointError.
    """
    from ..inference.detector import default_label_map

    weights = load_weights_for_architecture(model.cfg, model.preset_name, path)
    src = weights.state
    src_names, src_ids = default_label_map(weights.num_classes, weights.class_names, weights.category_ids)
    same_classes = src_ids == list(category_ids) and src_names == list(class_names)
    rows = list(range(len(class_names))) if same_classes else class_rows(src_names, src_ids, class_names,
                                                                         category_ids)
    result = FinetuneResult(carried=[n for n, r in zip(class_names, rows) if r is not None],
                            new=[n for n, r in zip(class_names, rows) if r is None], same_layout=same_classes)
    ours = model.state_dict()
    load: dict[str, Tensor] = {}
    for k, v in src.items():
        if k not in ours:
            raise CheckpointError(f"{path}: unexpected parameter {k} (another architecture than preset '{model.preset_name}'?)")
        if k.startswith(CLASS_HEAD_PREFIXES + (LABEL_BOOK_PREFIX,)) and not (same_classes and v.shape == ours[k].shape):
            if v.shape[1:] != ours[k].shape[1:]:
                raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)} but preset '{model.preset_name}' "
                                      f"expects {tuple(ours[k].shape)}")
            if not result.carried:
                result.reinitialised.append(k)
                continue
            load[k] = _gather_rows(v, ours[k], rows)
            continue
        if v.shape != ours[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)} but preset '{model.preset_name}' expects "
                                  f"{tuple(ours[k].shape)}")
        load[k] = v
    missing = [k for k in ours if k not in load and k not in result.reinitialised]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} "
                              f"(another architecture than preset '{model.preset_name}'?)")
    model.load_state_dict(load, strict=False)
    return result


def _gather_rows(src: Tensor, init: Tensor, rows: Sequence[int | None]) -> Tensor:
    """``init`` with row k replaced by ``src[rows[k]]`` where there is one.  The label book's extra
    last row (an index no label takes) stays as initialised."""
    out = init.clone()
    for k, r in enumerate(rows):
        if r is not None and k < out.shape[0] and r < src.shape[0]:
            out[k] = src[r]
    return out
