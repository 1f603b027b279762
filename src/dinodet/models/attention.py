"""Multi-scale deformable attention module (projections around the MSDA op)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.constants import device_constant
from .ops.msda import ms_deform_attn


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to ``n_points`` learned sampling points per head and level.

    Reference points are either points (x, y) or boxes (cx, cy, w, h); for boxes the offsets are
    scaled by half the box size divided by ``n_points`` (Deformable-DETR / DINO convention).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 backend: str = "auto"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        # initial offsets point outwards in n_heads directions, 1..n_points steps away
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor,
                spatial_shapes: list[tuple[int, int]], value_padding_mask: Tensor | None = None) -> Tensor:
        """
        Args:
            query: [B, Lq, C] (content + position).
            reference_points: [B, Lq, n_levels, 2] points or [B, Lq, n_levels, 4] boxes, 0..1 of the
                padded map (i.e. already multiplied by the valid ratios).
            value: [B, S, C] flattened multi-level features.
            spatial_shapes: n_levels pairs (H_l, W_l).
            value_padding_mask: [B, S] True on padded tokens (their values are zeroed).
        Returns:
            [B, Lq, C].
        """
        b, lq, _ = query.shape
        s = value.shape[1]
        m, n_l, n_p = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(b, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(b, lq, m, n_l, n_p, 2)
        weights = F.softmax(self.attention_weights(query).view(b, lq, m, n_l * n_p), -1).view(b, lq, m, n_l, n_p)
        if reference_points.shape[-1] == 2:
            normalizer = device_constant(tuple((w, h) for h, w in spatial_shapes), query.dtype, query.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / n_p * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {reference_points.shape[-1]}")
        out = ms_deform_attn(v, spatial_shapes, locations, weights, backend=self.backend)
        return self.output_proj(out)


def set_msda_backend(model: nn.Module, backend: str) -> None:
    """Use MSDA ``backend`` (see ``ops.msda.resolve_backend``) in every deformable attention of ``model``."""
    for module in model.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            module.backend = backend
