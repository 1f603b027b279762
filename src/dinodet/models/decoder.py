"""Deformable decoder with iterative box refinement ("look forward twice")."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..boxes import inverse_sigmoid
from .attention import MultiScaleDeformableAttention
from .encoder import FeedForward
from .heads import MLP
from .position import box_sine_embedding


class DecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention into the memory, FFN (all post-norm)."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.self_attn_dropout = nn.Dropout(dropout)
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.cross_attn_dropout = nn.Dropout(dropout)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ffn, dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                memory_padding_mask: Tensor, spatial_shapes: list[tuple[int, int]],
                attn_mask: Tensor | None) -> Tensor:
        """tgt, query_pos [B, N, C]; reference_points [B, N, L, 4] cxcywh boxes in 0..1 of the padded maps
        (valid-ratio scaled); memory [B, S, C]; memory_padding_mask [B, S] True on padded tokens;
        attn_mask [N, N] bool, True = may not attend, or None -> [B, N, C].

        ``query_pos`` is added to the queries and keys of self-attention and to the cross-attention query.
        """
        q = k = tgt + query_pos
        sa = self.self_attn(q, k, tgt, attn_mask=attn_mask)[0]
        tgt = self.self_attn_norm(tgt + self.self_attn_dropout(sa))
        ca = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, memory_padding_mask)
        tgt = self.cross_attn_norm(tgt + self.cross_attn_dropout(ca))
        return self.ffn(tgt)


class DeformableDecoder(nn.Module):
    """``num_layers`` ``DecoderLayer``s with iterative box refinement.

    Before each layer the query positions are recomputed from the current reference boxes (sine
    embedding -> 2-layer MLP); after it the shared box head refines the boxes.  One LayerNorm, shared by
    all layers, normalises every layer's output for the prediction heads.
    """

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.query_pos_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model

    def forward(self, tgt: Tensor, anchors_unsig: Tensor, memory: Tensor, memory_padding_mask: Tensor,
                spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor, attn_mask: Tensor | None,
                box_head: Callable[[Tensor], Tensor]) -> tuple[Tensor, list[Tensor]]:
        """
        Args:
            tgt: [B, N, C] content queries; anchors_unsig: [B, N, 4] initial boxes in logit space.
            memory: [B, S, C]; memory_padding_mask: [B, S]; valid_ratios: [B, L, 2].
            attn_mask: [N, N] bool, True = may not attend (denoising groups), or None.
            box_head: the shared box MLP used to refine the anchors after every layer.
        Returns:
            hidden [num_layers, B, N, C] (after the final LayerNorm) and num_layers + 1 reference
            boxes [B, N, 4] (sigmoid space): the input anchors, then each layer's refined boxes,
            NOT detached, so that each layer's box loss also trains the previous refinement.
        """
        reference = anchors_unsig.sigmoid()
        references = [reference]
        hidden = []
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        out = tgt
        for layer in self.layers:
            ref_input = reference[:, :, None] * ratios  # [B, N, L, 4]
            # query positions come from the level-0 (valid-ratio scaled) anchor, as officially
            query_pos = self.query_pos_head(box_sine_embedding(ref_input[:, :, 0, :], self.d_model // 2))
            out = layer(out, query_pos, ref_input, memory, memory_padding_mask, spatial_shapes, attn_mask)
            # refinement uses the un-normalised layer output; gradients stop between layers
            refined = (box_head(out) + inverse_sigmoid(reference)).sigmoid()
            reference = refined.detach()
            references.append(refined)
            hidden.append(self.norm(out))
        return torch.stack(hidden), references
