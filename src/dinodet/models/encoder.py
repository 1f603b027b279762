"""Deformable transformer encoder over the flattened multi-scale tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiScaleDeformableAttention


class FeedForward(nn.Module):
    """Post-norm residual FFN block: norm(x + linear2(dropout(relu(linear1(x)))))."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout2(self.linear2(self.dropout1(F.relu(self.linear1(x))))))


class ConvFeedForward(nn.Module):
    """An eval-mode ``FeedForward`` whose two linears run as 1x1 convolutions over [B, C, N, 1]: the same
    function (up to float summation order), for export to OpenVINO int8, whose CPU plugin has int8
    kernels for convolutions on every x86 CPU but runs int8 fully-connected layers in float32 on AVX2
    CPUs without VNNI.  Shares ``ffn``'s norm; copies its weights."""

    def __init__(self, ffn: FeedForward):
        super().__init__()
        self.conv1 = nn.Conv2d(ffn.linear1.in_features, ffn.linear1.out_features, 1)
        self.conv2 = nn.Conv2d(ffn.linear2.in_features, ffn.linear2.out_features, 1)
        with torch.no_grad():
            for conv, linear in ((self.conv1, ffn.linear1), (self.conv2, ffn.linear2)):
                conv.weight.copy_(linear.weight[:, :, None, None])
                conv.bias.copy_(linear.bias)
        self.norm = ffn.norm

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, N, C] -> [B, N, C]."""
        b, n, c = x.shape
        y = self.conv2(F.relu(self.conv1(x.transpose(1, 2).reshape(b, c, n, 1))))
        return self.norm(x + y.reshape(b, c, n).transpose(1, 2))


class EncoderLayer(nn.Module):
    """Deformable self-attention of every token into all levels, then the FFN (both post-norm)."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ffn, dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]],
                padding_mask: Tensor) -> Tensor:
        """src, pos [B, S, C]; reference_points [B, S, L, 2] (x, y) in 0..1 of the padded maps;
        spatial_shapes L pairs (H_l, W_l); padding_mask [B, S] True on padded tokens -> [B, S, C].

        The position embedding is added to the query only; the values are ``src`` itself.
        """
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        return self.ffn(self.norm(src + self.dropout(attn)))


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Token-centre reference points.

    Args:
        spatial_shapes: L pairs (H_l, W_l); valid_ratios [B, L, 2] (w, h) fraction of unpadded area.
    Returns:
        [B, S, L, 2] (x, y): each token's centre, normalised by its level's valid size, then mapped
        into every level's padded frame.
    """
    device = valid_ratios.device
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        # arange + 0.5 == linspace(0.5, h - 0.5, h) exactly, and keeps h symbolic under torch.export
        ref_y, ref_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=device) + 0.5,
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((ref_x, ref_y), -1))
    ref = torch.cat(refs, 1)
    return ref[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    """``num_layers`` ``EncoderLayer``s over the flattened multi-scale tokens (no final norm).

    Reference points are the token centres, computed once per forward from the valid ratios.
    """

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points) for _ in range(num_layers)
        )

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor,
                padding_mask: Tensor) -> Tensor:
        """src, pos [B, S, C] (S = sum H_l * W_l, level-major); valid_ratios [B, L, 2];
        padding_mask [B, S] True on padded tokens -> memory [B, S, C]."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, padding_mask)
        return out
