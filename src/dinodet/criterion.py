"""DINO training losses (official ``SetCriterion`` semantics, names and weights).

For every prediction set (final decoder layer, each auxiliary decoder layer, the two-stage encoder
proposals, and the denoising queries of every decoder layer) three groups of losses are computed:

* labels:      ``loss_ce`` (sigmoid focal loss) and, for the final layer only, ``class_error``;
* boxes:       ``loss_bbox`` (L1), ``loss_giou`` (1 - GIoU) and the logged-only ``loss_xy`` / ``loss_hw``;
* cardinality: ``cardinality_error`` (logged only).

Matching queries are assigned with the Hungarian matcher (separately for every prediction set, like the
official code); denoising queries have a fixed assignment.  All reductions and the order of the float32
operations follow the official implementation so losses agree to float32 noise.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import box_cxcywh_to_xyxy, generalized_box_iou
from .config import LossConfig
from .matcher import HungarianMatcher, MatchIndices, Target

if TYPE_CHECKING:  # type-only: keeps the criterion importable independently of the model package
    from .models.outputs import DenoisingMeta, DINOOutput

# Names of the per-prediction-set entries, in the official order ('labels', 'boxes', 'cardinality').
LOSS_NAMES = ("loss_ce", "class_error", "loss_bbox", "loss_giou", "loss_xy", "loss_hw", "cardinality_error")
AUX_LOSS_NAMES = tuple(n for n in LOSS_NAMES if n != "class_error")
WEIGHTED_LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")


def sigmoid_focal_loss(
    logits: Tensor, targets: Tensor, num_boxes: float | Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Official DINO focal loss: logits / one-hot targets [B, N, C] -> 0-dim tensor.

    Reduction: element-wise loss, mean over dim 1 (the QUERY axis, not the classes), sum over the
    rest, divided by num_boxes.  Callers multiply by N afterwards, which makes it a plain sum; the
    mean-then-multiply order is kept because it is what the official float32 computation does.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss.mean(1).sum() / num_boxes


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
        """Sum of loss * weight over the weighted names, in the loss dict's order (as the official loop).

        Raises KeyError for a weighted-looking name without a weight (e.g. a decoder depth that does
        not match ``num_decoder_layers``), instead of silently dropping it.
        """
        total: Tensor | int = 0
        for name, value in losses.items():
            if name in self.weight_dict:
                total = total + value * self.weight_dict[name]
            elif name.startswith(WEIGHTED_LOSS_NAMES):
                raise KeyError(f"loss '{name}' has no weight (num_decoder_layers={self.num_decoder_layers}?)")
        assert isinstance(total, Tensor), "empty loss dict"
        return total

    # ---------------------------------------------------------------- per-prediction-set losses

    def loss_labels(
        self, logits: Tensor, targets: list[Target], indices: MatchIndices, num_boxes: float | Tensor, log: bool
    ) -> dict[str, Tensor]:
        """Focal loss over all B x N x C logits (unmatched queries are all-zero targets); logits [B, N, C]."""
        batch_idx, src_idx = _src_permutation_idx(indices, logits.device)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, matched_labels] = 1
        loss_ce = sigmoid_focal_loss(logits, onehot, num_boxes, self.cfg.focal_alpha, self.cfg.focal_gamma)
        losses = {"loss_ce": loss_ce * logits.shape[1]}
        if log:
            losses["class_error"] = 100 - _top1_accuracy(logits[batch_idx, src_idx], matched_labels)
        return losses

    def loss_boxes(
        self, boxes: Tensor, targets: list[Target], indices: MatchIndices, num_boxes: float | Tensor
    ) -> dict[str, Tensor]:
        """L1 and GIoU losses of the matched boxes; boxes [B, N, 4] cxcywh."""
        batch_idx, src_idx = _src_permutation_idx(indices, boxes.device)
        src = boxes[batch_idx, src_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        l1 = F.l1_loss(src, tgt, reduction="none")
        # Pairwise GIoU then the diagonal, like the official code (N is at most a few hundred).
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        losses = {"loss_bbox": l1.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}
        with torch.no_grad():  # logged only
            losses["loss_xy"] = l1[..., :2].sum() / num_boxes
            losses["loss_hw"] = l1[..., 2:].sum() / num_boxes
        return losses

    @torch.no_grad()
    def loss_cardinality(self, logits: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        """Logged only: mean |#queries whose argmax is not the last class - #targets| (a DETR legacy:
        with 91 COCO classes the last index is a real category, so this is not a real 'no-object')."""
        num_targets = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(num_pred.float(), num_targets.float())}

    def _set_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: list[Target],
        indices: MatchIndices,
        num_boxes: float | Tensor,
        log: bool = False,
    ) -> dict[str, Tensor]:
        """All losses of one prediction set, in the official key order."""
        losses = self.loss_labels(logits, targets, indices, num_boxes, log)
        losses.update(self.loss_boxes(boxes, targets, indices, num_boxes))
        losses.update(self.loss_cardinality(logits, targets))
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
        dn_indices: MatchIndices = []
        dn_num_boxes = num_boxes
        if use_dn:
            assert meta is not None
            dn_indices = _dn_indices(targets, meta, device)
            dn_num_boxes = num_boxes * meta.num_groups

        def dn_losses(layer: int) -> dict[str, Tensor]:
            if not use_dn:  # official: zeros when no denoising queries (eval, or no target in the batch)
                zero = torch.zeros([], device=device)
                return {f"{name}_dn": zero.clone() for name in AUX_LOSS_NAMES}
            assert out.dn_logits is not None and out.dn_boxes is not None
            losses = self._set_losses(out.dn_logits[layer], out.dn_boxes[layer], targets, dn_indices, dn_num_boxes)
            return {f"{k}_dn": v for k, v in losses.items()}

        # every prediction set is matched up front: one device->host copy for all of them
        aux_layers = list(range(num_layers - 1)) if self.cfg.aux_loss else []
        sets = ([(out.logits[-1], out.boxes[-1])] + [(out.logits[i], out.boxes[i]) for i in aux_layers]
                + [(out.interm_logits, out.interm_boxes)])
        final_indices, *aux_indices, interm_indices = self.matcher.match_sets(sets, targets)

        losses = dn_losses(num_layers - 1)
        losses.update(self._set_losses(out.logits[-1], out.boxes[-1], targets, final_indices, num_boxes, log=True))
        for i, indices in zip(aux_layers, aux_indices):
            layer_losses = self._set_losses(out.logits[i], out.boxes[i], targets, indices, num_boxes)
            layer_losses.update(dn_losses(i))
            losses.update({f"{k}_{i}": v for k, v in layer_losses.items()})

        interm = self._set_losses(out.interm_logits, out.interm_boxes, targets, interm_indices, num_boxes)
        losses.update({f"{k}_interm": v for k, v in interm.items()})
        return losses


def _src_permutation_idx(indices: MatchIndices, device: torch.device) -> tuple[Tensor, Tensor]:
    """(batch index, query index), each int64 [total matched], for advanced indexing of [B, N, ...]."""
    batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx.to(device), src_idx.to(device)


def build_criterion(num_classes: int, loss_cfg: LossConfig, num_decoder_layers: int = 6) -> SetCriterion:
    """Matcher + criterion from a LossConfig (official costs / weights)."""
    matcher = HungarianMatcher(
        loss_cfg.cost_class, loss_cfg.cost_bbox, loss_cfg.cost_giou, loss_cfg.focal_alpha, loss_cfg.focal_gamma
    )
    return SetCriterion(num_classes, matcher, loss_cfg, num_decoder_layers)
