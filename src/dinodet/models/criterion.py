"""DINO training losses (official ``SetCriterion`` semantics, names and weights).

For every prediction set (final decoder layer, each auxiliary decoder layer, the two-stage encoder
proposals, and the denoising queries of every decoder layer) three groups of losses are computed:

* labels:      ``loss_ce`` (sigmoid focal loss) and, for the final layer only, ``class_error``;
* boxes:       ``loss_bbox`` (L1), ``loss_giou`` (1 - GIoU) and the logged-only ``loss_xy`` / ``loss_hw``;
* cardinality: ``cardinality_error`` (logged only).

Matching queries are assigned with the Hungarian matcher (separately for every prediction set, like the
official code); denoising queries have a fixed assignment.  The losses of all prediction sets are
computed together (stacked [S, B, N, ...] tensors, one value per set): the same element-wise float32
operations and reductions over the same elements as the official per-set code, so the losses agree to
float32 noise, in a few dozen kernels instead of thousands.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ..boxes import box_cxcywh_to_xyxy, paired_generalized_box_iou
from ..config import LossConfig
from ..targets import Target
from .matcher import HungarianMatcher, MatchIndices

if TYPE_CHECKING:  # type-only: keeps the criterion importable independently of the model package
    from .outputs import DenoisingMeta, DINOOutput

# Names of the per-prediction-set entries, in the official order ('labels', 'boxes', 'cardinality').
LOSS_NAMES = ("loss_ce", "class_error", "loss_bbox", "loss_giou", "loss_xy", "loss_hw", "cardinality_error")
AUX_LOSS_NAMES = tuple(n for n in LOSS_NAMES if n != "class_error")
WEIGHTED_LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, num_boxes: float | Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Official DINO focal loss of S prediction sets: logits / one-hot targets [S, B, N, C] -> [S].

    Reduction per set: element-wise loss, mean over N (the QUERY axis, not the classes), sum over the
    rest, divided by num_boxes.  Callers multiply by N afterwards, which makes it a plain sum; the
    mean-then-multiply order is kept because it is what the official float32 computation does.
    """
    loss = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    return loss.mean(2).sum((1, 2)) / num_boxes


@torch.no_grad()
def _top1_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Top-1 accuracy in percent of logits [N, C] vs labels [N]; 0 when N == 0 (official ``accuracy``)."""
    if labels.numel() == 0:
        return torch.zeros([], device=logits.device)
    pred = logits.topk(1, 1, True, True)[1].t()  # topk (not argmax) to break ties the official way
    correct = pred.eq(labels.view(1, -1).expand_as(pred))
    return correct[:1].reshape(-1).float().sum(0) * (100.0 / labels.size(0))


def _dn_indices(targets: list[Target], meta: DenoisingMeta, device: torch.device) -> MatchIndices:
    """Fixed denoising assignment: positive slot g * 2 * group_size + j <-> target j, for every group g.

    Returns per image (slot indices, target indices), both int64 [num_groups * n_i], group-major.
    """
    indices = []
    for t in targets:
        n = len(t["labels"])
        tgt = torch.arange(n, device=device).repeat(meta.num_groups)
        group_start = torch.arange(meta.num_groups, device=device) * (2 * meta.group_size)
        slot = (group_start[:, None] + torch.arange(n, device=device)[None, :]).flatten()
        indices.append((slot, tgt))
    return indices


class MatchedPositions(NamedTuple):
    """Every matched (prediction, target) pair of S sets, ordered by set: int64 [T_total] tensors on the
    predictions' device, plus what the losses need besides (built on the host, copied in one go)."""

    set: Tensor  # which prediction set
    image: Tensor  # image of the batch
    query: Tensor  # query (prediction slot)
    target: Tensor  # position in the batch's concatenated targets
    num_targets: Tensor  # [B] target count per image
    set_bounds: tuple[int, ...]  # host ints: set s holds positions set_bounds[s]:set_bounds[s + 1]


def matched_positions(indices: list[MatchIndices], targets: list[Target], device: torch.device) -> MatchedPositions:
    """``MatchedPositions`` of the per-set matches ``indices`` (CPU tensors): assembled on the host and
    sent to ``device`` as one non-blocking copy, so the host never waits for the GPU here."""
    counts = [len(t["labels"]) for t in targets]
    offsets = [sum(counts[:b]) for b in range(len(counts))]
    cols, bounds = [], [0]
    for s, set_indices in enumerate(indices):
        for b, (src, tgt) in enumerate(set_indices):
            cols.append(torch.stack([torch.full_like(src, s), torch.full_like(src, b), src, tgt + offsets[b]]))
        bounds.append(bounds[-1] + sum(len(src) for src, _ in set_indices))
    pos = torch.cat(cols, 1) if cols else torch.empty(4, 0, dtype=torch.int64)
    flat = torch.cat([pos.flatten(), torch.tensor(counts, dtype=torch.int64)])
    if device.type == "cuda":  # page-locked source: the copy is queued and the host moves on
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    n = pos.shape[1]
    return MatchedPositions(*flat[: 4 * n].view(4, n), flat[4 * n:], tuple(bounds))


def _num_boxes(targets: list[Target], device: torch.device) -> float | Tensor:
    """Average number of target boxes per process (min 1), the normaliser of every loss; a 0-dim
    tensor when distributed (kept on the device: no host sync)."""
    n = sum(len(t["labels"]) for t in targets)
    if dist.is_available() and dist.is_initialized():
        total = torch.as_tensor([n], dtype=torch.float, device=device)
        dist.all_reduce(total)
        return torch.clamp(total / dist.get_world_size(), min=1)[0]
    return max(float(n), 1.0)


class SetCriterion(nn.Module):
    """Computes every official DINO loss for a ``DINOOutput``.

    ``forward`` returns the unweighted loss dict (79 entries for 6 decoder layers, official names and
    order); ``weight_dict`` holds the official weights and ``total_loss`` the weighted sum used for
    backprop.  Denoising losses are computed only in training mode (``self.training``, as officially)
    when the output carries denoising predictions; otherwise they are zeros.
    """

    def __init__(
        self, num_classes: int, matcher: HungarianMatcher, loss_cfg: LossConfig, num_decoder_layers: int = 6
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.cfg = loss_cfg
        self.num_decoder_layers = num_decoder_layers
        self.weight_dict = self._build_weight_dict()
        self._weight_vectors: dict[tuple, Tensor] = {}

    def _build_weight_dict(self) -> dict[str, float]:
        cfg = self.cfg
        base = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
        with_dn = {**base, **{f"{k}_dn": v for k, v in base.items()}}
        weights = dict(with_dn)
        if cfg.aux_loss:
            for i in range(self.num_decoder_layers - 1):
                weights.update({f"{k}_{i}": v for k, v in with_dn.items()})
        # Two-stage proposals: same weights scaled by interm_loss_coef (no denoising counterpart).
        weights.update({f"{k}_interm": v * cfg.interm_loss_coef for k, v in base.items()})
        return weights

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """Sum of loss * weight over the weighted names (the official weighted sum, as one stacked
        product rather than ~40 scalar operations and their backward).

        Raises KeyError for a weighted-looking name without a weight (e.g. a decoder depth that does
        not match ``num_decoder_layers``), instead of silently dropping it.
        """
        names = []
        for name in losses:
            if name in self.weight_dict:
                names.append(name)
            elif name.startswith(WEIGHTED_LOSS_NAMES):
                raise KeyError(f"loss '{name}' has no weight (num_decoder_layers={self.num_decoder_layers}?)")
        assert names, "no weighted loss in the loss dict"
        values = torch.stack([losses[n] for n in names])
        key = (values.device, values.dtype, tuple(names))
        weights = self._weight_vectors.get(key)
        if weights is None:  # built once per loss layout: a host->device copy every step would wait
            weights = self._weight_vectors[key] = torch.tensor([self.weight_dict[n] for n in names],
                                                               dtype=values.dtype, device=values.device)
        return (values * weights).sum()

    # ---------------------------------------------------------------- per-prediction-set losses
    # Every loss is computed for S prediction sets at once (logits [S, B, N, C], boxes [S, B, N, 4],
    # one MatchIndices per set) and returned as an [S] vector per name: a training step has 13 sets
    # (7 matched, 6 denoising), and set-by-set losses cost thousands of tiny kernel launches on a GPU.
    # Per set the values are those of the official per-set computation (same element-wise operations,
    # reductions over the same elements).

    def loss_labels(
        self, logits: Tensor, labels: Tensor, pos: MatchedPositions, num_boxes: float | Tensor,
        log_set: int | None = None,
    ) -> dict[str, Tensor]:
        """Focal loss over all B x N x C logits of each set (unmatched queries are all-zero targets);
        ``log_set`` adds the logged ``class_error`` of that set.  logits [S, B, N, C], labels [T] (the
        batch's targets concatenated) -> {name: [S]} (class_error: 0-dim)."""
        matched_labels = labels[pos.target]
        onehot = torch.zeros_like(logits)
        onehot[pos.set, pos.image, pos.query, matched_labels] = 1
        losses = {"loss_ce": sigmoid_focal_loss(logits, onehot, num_boxes, self.cfg.focal_alpha,
                                                self.cfg.focal_gamma) * logits.shape[2]}
        if log_set is not None:  # positions are ordered by set: a slice, not a mask (no host sync)
            sel = slice(pos.set_bounds[log_set], pos.set_bounds[log_set + 1])
            losses["class_error"] = 100 - _top1_accuracy(logits[log_set][pos.image[sel], pos.query[sel]],
                                                         matched_labels[sel])
        return losses

    def loss_boxes(
        self, boxes: Tensor, target_boxes: Tensor, pos: MatchedPositions, num_boxes: float | Tensor
    ) -> dict[str, Tensor]:
        """L1 and GIoU losses of the matched boxes of each set; boxes [S, B, N, 4] cxcywh, target_boxes
        [T, 4] (the batch's targets concatenated) -> {name: [S]}."""
        src = boxes[pos.set, pos.image, pos.query]
        tgt = target_boxes.to(src)[pos.target]
        num_sets = boxes.shape[0]
        l1 = F.l1_loss(src, tgt, reduction="none")  # [T, 4]
        l1_sets = src.new_zeros(num_sets, 4).index_add(0, pos.set, l1)  # [S, 4] per-set column sums
        one_minus_giou = 1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        losses = {"loss_bbox": l1_sets.sum(1) / num_boxes,
                  "loss_giou": src.new_zeros(num_sets).index_add(0, pos.set, one_minus_giou) / num_boxes}
        with torch.no_grad():  # logged only
            losses["loss_xy"] = l1_sets[:, :2].sum(1) / num_boxes
            losses["loss_hw"] = l1_sets[:, 2:].sum(1) / num_boxes
        return losses

    @torch.no_grad()
    def loss_cardinality(self, logits: Tensor, num_targets: Tensor) -> dict[str, Tensor]:
        """Logged only: mean |#queries whose argmax is not the last class - #targets| per set (a DETR
        legacy: with 91 COCO classes the last index is a real category, so this is not a real
        'no-object').  logits [S, B, N, C], num_targets [B] -> {name: [S]}."""
        num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(2)  # [S, B]
        return {"cardinality_error": (num_pred.float() - num_targets.float()).abs().mean(1)}

    def _set_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: list[Target],
        indices: list[MatchIndices],
        num_boxes: float | Tensor,
        log_set: int | None = None,
    ) -> dict[str, Tensor]:
        """All losses of S prediction sets, in the official key order: {name: [S]} (class_error of
        set ``log_set``: 0-dim)."""
        pos = matched_positions(indices, targets, logits.device)
        losses = self.loss_labels(logits, torch.cat([t["labels"] for t in targets]), pos, num_boxes, log_set)
        losses.update(self.loss_boxes(boxes, torch.cat([t["boxes"] for t in targets]), pos, num_boxes))
        losses.update(self.loss_cardinality(logits, pos.num_targets))
        return losses

    # ---------------------------------------------------------------- full criterion

    def forward(self, out: DINOOutput, targets: list[Target]) -> dict[str, Tensor]:
        """out: model output (L decoder layers); targets: per image {'labels' [n], 'boxes' [n, 4]}.

        Returns {name: 0-dim float tensor} with the official names, in the official order:
        denoising (final), final layer, then per aux layer i (its losses, then its denoising losses),
        then '_interm'.
        """
        device = out.logits.device
        targets = [{"labels": t["labels"].to(device), "boxes": t["boxes"].to(device)} for t in targets]
        num_layers = out.logits.shape[0]
        num_boxes = _num_boxes(targets, device)
        meta = out.dn_meta
        use_dn = (
            self.training and meta is not None and out.dn_logits is not None
            and out.dn_boxes is not None and meta.pad_size > 0
        )

        # matched sets: the decoder layers (all, or only the last without aux loss), then the proposals;
        # all matched up front with one device->host copy.  Row k of every loss vector is set k.
        first = 0 if self.cfg.aux_loss else num_layers - 1
        layers = range(first, num_layers)
        # sliced: indexing with a Python list of layers would copy that list to the device
        logits = torch.cat([out.logits[first:], out.interm_logits[None]])
        boxes = torch.cat([out.boxes[first:], out.interm_boxes[None]])
        indices = self.matcher.match_stacked(logits, boxes, targets)
        final_row, interm_row = len(layers) - 1, len(layers)
        matched = self._set_losses(logits, boxes, targets, indices, num_boxes, log_set=final_row)

        if use_dn:
            assert meta is not None and out.dn_logits is not None and out.dn_boxes is not None
            dn_indices = _dn_indices(targets, meta, torch.device("cpu"))  # host, like the matcher's
            dn = self._set_losses(out.dn_logits, out.dn_boxes, targets, [dn_indices] * num_layers,
                                  num_boxes * meta.num_groups)
        else:  # official: zeros when no denoising queries (eval, or no target in the batch)
            dn = {name: torch.zeros(num_layers, device=device) for name in AUX_LOSS_NAMES}

        def row(k: int, dn_layer: int | None = None) -> dict[str, Tensor]:
            found = {name: matched[name][k] for name in AUX_LOSS_NAMES}
            if k == final_row:  # official order: class_error right after loss_ce
                found = {"loss_ce": found.pop("loss_ce"), "class_error": matched["class_error"], **found}
            if dn_layer is not None:
                found.update({f"{name}_dn": dn[name][dn_layer] for name in AUX_LOSS_NAMES})
            return found

        losses = {f"{name}_dn": dn[name][num_layers - 1] for name in AUX_LOSS_NAMES}
        losses.update(row(final_row))
        for k, i in enumerate(layers[:-1]):
            losses.update({f"{name}_{i}": v for name, v in row(k, dn_layer=i).items()})
        losses.update({f"{name}_interm": v for name, v in row(interm_row).items()})
        return losses


def build_criterion(num_classes: int, loss_cfg: LossConfig, num_decoder_layers: int = 6) -> SetCriterion:
    """Matcher + criterion from a LossConfig (official costs / weights)."""
    matcher = HungarianMatcher(
        loss_cfg.cost_class, loss_cfg.cost_bbox, loss_cfg.cost_giou, loss_cfg.focal_alpha, loss_cfg.focal_gamma
    )
    return SetCriterion(num_classes, matcher, loss_cfg, num_decoder_layers)
