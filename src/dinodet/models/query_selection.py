"""Two-stage mixed query selection.

Every encoder token proposes a box around its grid cell; the top-Q tokens by class score give the
decoder's initial anchors (positional queries), while the content queries are learned embeddings
("mixed" selection in the DINO paper).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .heads import MLP, box_head, class_head
from .masks import valid_sizes


def encoder_proposals(padding_mask: Tensor, spatial_shapes: list[tuple[int, int]],
                      base_size: float = 0.05) -> tuple[Tensor, Tensor]:
    """One anchor per encoder token.

    Args:
        padding_mask: [B, S] True on padded tokens; spatial_shapes: L pairs (H_l, W_l).
    Returns:
        proposals [B, S, 4] in logit space: (cx, cy) the cell centre normalised by the VALID map
        size, (w, h) = base_size * 2^level; +inf for padded tokens and anchors with a coordinate
        outside (0.01, 0.99).  valid [B, S, 1] bool, False for those tokens.
    """
    b = padding_mask.shape[0]
    device = padding_mask.device
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask = padding_mask[:, start:start + h * w].view(b, h, w)
        valid_h, valid_w = valid_sizes(mask)
        # arange == linspace(0, h - 1, h) exactly, and keeps h symbolic under torch.export
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)  # [h, w, 2]
        scale = torch.stack([valid_w, valid_h], 1).view(b, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(b, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * base_size * (2.0 ** lvl)
        proposals.append(torch.cat((grid, wh), -1).view(b, -1, 4))
        start += h * w
    props = torch.cat(proposals, 1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props))
    props = props.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
    props = props.masked_fill(~valid, float("inf"))
    return props, valid & ~padding_mask.unsqueeze(-1)


@dataclass
class SelectedQueries:
    """Decoder inputs chosen from the encoder output (Q selected tokens, rank order)."""

    content: Tensor  # [B, Q, C] learned content queries
    anchors_unsig: Tensor  # [B, Q, 4] detached initial boxes, logit space
    interm_logits: Tensor  # [B, Q, C_cls] encoder-head class logits of the selected tokens
    interm_boxes: Tensor  # [B, Q, 4] encoder-head boxes (sigmoid space, keeps gradients)
    own_topk_index: Tensor  # [B, Q] the selection this module computed itself


class QuerySelection(nn.Module):
    """Two-stage mixed query selection over the encoder memory.

    Every token is projected + normalised and scored by its own class head; the top-Q tokens by max
    class logit give the anchors (their proposal refined by the box head, detached), while the content
    queries are the first Q rows of a learned embedding.  DINO initialises both heads from its decoder heads.
    """

    def __init__(self, d_model: int, num_classes: int, num_queries: int, base_size: float = 0.05):
        super().__init__()
        self.memory_proj = nn.Linear(d_model, d_model)
        self.memory_norm = nn.LayerNorm(d_model)
        self.class_head = class_head(d_model, num_classes)
        self.box_head: MLP = box_head(d_model)
        self.content_queries = nn.Embedding(num_queries, d_model)
        self.num_queries = num_queries
        self.base_size = base_size

    def forward(self, memory: Tensor, padding_mask: Tensor, spatial_shapes: list[tuple[int, int]],
                topk_index: Tensor | None = None) -> SelectedQueries:
        """memory [B, S, C], padding_mask [B, S] True on padded tokens, spatial_shapes L pairs (H_l, W_l)
        -> ``SelectedQueries`` with Q = min(num_queries, S) (or topk_index's Q).

        ``topk_index`` [B, Q] replaces the module's own selection (a testing hook for the parity
        contract, where near-tied scores may legitimately rank differently); leave it None.
        """
        b, s, c = memory.shape
        proposals, valid = encoder_proposals(padding_mask, spatial_shapes, self.base_size)
        out_memory = self.memory_norm(self.memory_proj(memory.masked_fill(~valid, 0.0)))
        logits = self.class_head(out_memory)
        coords_unsig = self.box_head(out_memory) + proposals
        k = torch.sym_min(self.num_queries, s)  # an int; stays symbolic under torch.export
        own = torch.topk(logits.max(-1)[0], k, dim=1)[1]
        index = own if topk_index is None else topk_index.to(memory.device)
        k = index.shape[1]
        sel_coords = torch.gather(coords_unsig, 1, index.unsqueeze(-1).expand(-1, -1, 4))
        sel_memory = torch.gather(out_memory, 1, index.unsqueeze(-1).expand(-1, -1, c))
        content = self.content_queries.weight[:k].unsqueeze(0).expand(b, -1, -1)
        return SelectedQueries(
            content=content,
            anchors_unsig=sel_coords.detach(),
            interm_logits=self.class_head(sel_memory),
            interm_boxes=sel_coords.sigmoid(),
            own_topk_index=own,
        )
