"""Hungarian matching between predicted queries and ground-truth boxes (official DINO costs)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..boxes import box_cxcywh_to_xyxy, generalized_box_iou
from ..targets import Target

MatchIndices = list[tuple[Tensor, Tensor]]  # per image: (query indices, target indices), int64 CPU


class NonFiniteCostError(ValueError):
    """The predictions (hence the matching costs) contain NaN/inf, e.g. after the training diverged."""


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising

        cost_class * focal class cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)

    per image; queries left unassigned are background.  Each image gets min(Q, n_i) pairs.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.gamma = gamma

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, boxes: Tensor, targets: list[Target]) -> Tensor:
        """Matching cost of every query of every image against every target of the batch.

        logits [B, Q, C], boxes [B, Q, 4] cxcywh -> [B, Q, T] with T = total targets in the batch
        (targets concatenated in image order; only image b's own columns are used for image b).
        Computed on the logits' device, as one batch, in the official operation order so the float32
        values (and therefore the assignment) are the official ones.
        """
        bs, num_queries = logits.shape[:2]
        prob = logits.flatten(0, 1).sigmoid()  # [B*Q, C]
        out_bbox = boxes.flatten(0, 1)  # [B*Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox)

        # Focal-loss-shaped class cost: the focal loss of predicting the target class as positive minus
        # that of predicting it as negative.  The +1e-8 inside the logs is the official guard against 0.
        alpha, gamma = self.focal_alpha, self.gamma
        neg_cost = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
        pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
        cost_class = pos_cost[:, tgt_ids] - neg_cost[:, tgt_ids]

        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))

        # Same summation order as the official code (float32 addition is not associative).
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.view(bs, num_queries, -1)

    @torch.no_grad()
    def forward(self, logits: Tensor, boxes: Tensor, targets: list[Target]) -> MatchIndices:
        """logits [B, Q, C], boxes [B, Q, 4] cxcywh, len(targets) == B.

        Returns per image (query_idx int64 [k], target_idx int64 [k]) on the CPU, k = min(Q, n_i),
        sorted by query index (scipy's order).
        """
        return self.match_stacked(logits[None], boxes[None], targets)[0]

    @torch.no_grad()
    def match_sets(self, sets: Sequence[tuple[Tensor, Tensor]], targets: list[Target]) -> list[MatchIndices]:
        """``forward`` for several prediction sets against the same targets (e.g. every decoder
        layer and the encoder proposals) with a single device->host copy: the assignment itself
        runs on the CPU, and each copy is a wait for the device."""
        if len({(tuple(lg.shape), tuple(bx.shape)) for lg, bx in sets}) == 1:
            return self.match_stacked(torch.stack([lg for lg, _ in sets]), torch.stack([bx for _, bx in sets]), targets)
        if not any(len(t["boxes"]) for t in targets):
            return self._unmatched(len(sets), targets)
        costs = [self.cost_matrix(logits, boxes, targets) for logits, boxes in sets]
        return self._assign(costs, torch.cat([c.flatten() for c in costs]), targets)

    @torch.no_grad()
    def match_stacked(self, logits: Tensor, boxes: Tensor, targets: list[Target]) -> list[MatchIndices]:
        """``match_sets`` for S sets of one shape, already stacked: logits [S, B, Q, C], boxes [S, B, Q, 4].
        One cost computation over all of them (element-wise the same float32 operations, so the same
        costs as set by set) and one device->host copy."""
        num_sets = logits.shape[0]
        if not any(len(t["boxes"]) for t in targets):
            return self._unmatched(num_sets, targets)
        cost = self.cost_matrix(logits.flatten(0, 1), boxes.flatten(0, 1), targets)  # [S*B, Q, T]
        return self._assign(list(cost.view(num_sets, -1, *cost.shape[1:])), cost.flatten(), targets)

    @staticmethod
    def _unmatched(num_sets: int, targets: list[Target]) -> list[MatchIndices]:
        # no target in the batch: the official code crashes here (view of an empty tensor with -1)
        empty = torch.empty(0, dtype=torch.int64)
        return [[(empty, empty.clone()) for _ in targets] for _ in range(num_sets)]

    @staticmethod
    def _assign(costs: list[Tensor], flat: Tensor, targets: list[Target]) -> list[MatchIndices]:
        """Hungarian assignment per set and image; ``costs`` [B, Q, T] per set, ``flat`` all of them
        flattened in order (copied to the host once)."""
        sizes = [len(t["boxes"]) for t in targets]
        flat = flat.cpu()
        if not torch.isfinite(flat).all():  # on the host already: no extra wait for the device
            raise NonFiniteCostError("matching costs are NaN/inf: the predictions are not finite")
        out = []
        for c, host in zip(costs, flat.split([c.numel() for c in costs])):
            matches = []
            for b, cb in enumerate(host.view(c.shape).split(sizes, -1)):
                q_idx, t_idx = linear_sum_assignment(cb[b])
                matches.append((torch.as_tensor(q_idx, dtype=torch.int64), torch.as_tensor(t_idx, dtype=torch.int64)))
            out.append(matches)
        return out
