"""Contrastive denoising (CDN) query construction for training.

Ground-truth boxes and labels are noised into extra decoder queries: in every group a positive copy
(small noise, must reconstruct its box) and a negative copy (larger noise, must predict "no
object").  An attention mask keeps groups from seeing each other and the matching queries from
seeing any of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid
from ..targets import Target
from .outputs import DenoisingMeta


@dataclass
class DenoisingQueries:
    """The denoising queries of a training batch, put before the matching queries in the decoder
    (P = 2 * groups * max targets per image)."""

    content: Tensor  # [B, P, C] label embeddings (zeros in unused padding slots)
    anchors_unsig: Tensor  # [B, P, 4] noised boxes, logit space (zeros in padding slots)
    attn_mask: Tensor  # [P + Q, P + Q] bool, True = may not attend
    meta: DenoisingMeta


def num_denoising_groups(dn_number: int, max_targets: int) -> int:
    """Official rule: 2 * dn_number queries shared out as positive+negative pairs per target."""
    if max_targets == 0:
        return 1
    return max(1, (2 * dn_number) // (2 * max_targets)) if 2 * dn_number >= 100 else max(1, 2 * dn_number)


def denoising_attn_mask(num_groups: int, group_size: int, num_queries: int, device=None) -> Tensor:
    """[P + Q, P + Q] bool mask, True where attention is blocked.

    Matching queries see only matching queries; each denoising group sees itself and the matching
    queries.
    """
    pad = 2 * num_groups * group_size
    size = pad + num_queries
    if pad == 0:
        return torch.zeros(size, size, dtype=torch.bool, device=device)
    idx = torch.arange(size, device=device)
    # group of every query (-1: matching); a few whole-matrix kernels, not two fills per group
    group = torch.where(idx < pad, idx // (2 * group_size), -1)
    return (idx < pad)[None, :] & (group[:, None] != group[None, :])


class ContrastiveDenoising(nn.Module):
    """DINO's contrastive denoising (CDN): every ground-truth box of the batch becomes, per group, a
    positive query (label flipped with probability label_noise_ratio / 2, box moved by less than
    box_noise_scale of its half size) and a negative one (moved further), whose predictions the
    criterion compares with the ground truth; ``label_embed`` is the label book they start from."""

    def __init__(self, num_classes: int, labelbook_size: int, hidden_dim: int, dn_number: int = 100,
                 label_noise_ratio: float = 0.5, box_noise_scale: float = 0.4):
        super().__init__()
        # one extra row, as in the official label book
        self.label_embed = nn.Embedding(labelbook_size + 1, hidden_dim)
        self.num_classes = num_classes
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale

    def forward(self, targets: list[Target], num_queries: int) -> DenoisingQueries:
        """targets: per image 'labels' int64 [n_i] and 'boxes' [n_i, 4] cxcywh 0..1."""
        device, dtype = self.label_embed.weight.device, self.label_embed.weight.dtype
        counts = [int(t["labels"].numel()) for t in targets]
        batch = len(targets)
        group_size = max(counts) if counts else 0
        groups = num_denoising_groups(self.dn_number, group_size)
        copies = 2 * groups
        labels = torch.cat([t["labels"] for t in targets]).to(device).long()
        boxes = torch.cat([t["boxes"] for t in targets]).to(device, dtype)
        batch_idx = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(counts)])
        n_total = labels.numel()

        # copy c of all targets (c even: positive of group c//2, odd: negative)
        known_labels = labels.repeat(copies)
        known_boxes = boxes.repeat(copies, 1)
        known_bid = batch_idx.repeat(copies)

        noised_labels = known_labels
        if self.label_noise_ratio > 0:
            # each label is replaced by a random class with probability ratio / 2 (the official rule);
            # drawn for every slot and selected with where(), not nonzero(), which would wait for the GPU
            p = torch.rand(known_labels.shape, device=device)
            new = torch.randint(0, self.num_classes, known_labels.shape, device=device)
            noised_labels = torch.where(p < self.label_noise_ratio * 0.5, new, known_labels)

        noised_boxes = known_boxes.clone()
        if self.box_noise_scale > 0 and n_total > 0:
            xyxy = box_cxcywh_to_xyxy(known_boxes)
            half_wh = torch.cat([known_boxes[:, 2:] / 2, known_boxes[:, 2:] / 2], 1)
            sign = torch.randint(0, 2, known_boxes.shape, device=device).to(dtype) * 2.0 - 1.0
            part = torch.rand(known_boxes.shape, device=device, dtype=dtype)
            negative = (torch.arange(copies, device=device) % 2 == 1).repeat_interleave(n_total)
            part = part + negative[:, None].to(dtype)  # negatives pushed further away than any positive
            xyxy = (xyxy + part * sign * half_wh * self.box_noise_scale).clamp(0.0, 1.0)
            noised_boxes = box_xyxy_to_cxcywh(xyxy)

        pad = copies * group_size
        hidden = self.label_embed.weight.shape[1]
        content = torch.zeros(batch, pad, hidden, device=device, dtype=dtype)
        anchors = torch.zeros(batch, pad, 4, device=device, dtype=dtype)
        if n_total:
            within = torch.cat([torch.arange(n, device=device) for n in counts])
            slots = (within.repeat(copies)
                     + group_size * torch.arange(copies, device=device).repeat_interleave(n_total))
            content[known_bid, slots] = self.label_embed(noised_labels)
            anchors[known_bid, slots] = inverse_sigmoid(noised_boxes)
        mask = denoising_attn_mask(groups, group_size, num_queries, device)
        return DenoisingQueries(content, anchors, mask, DenoisingMeta(groups, group_size))
