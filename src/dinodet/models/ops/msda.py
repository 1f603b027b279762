"""Multi-scale deformable attention (MSDA) sampling op.

``ms_deform_attn`` is the backend-independent entry point; the pure PyTorch implementation here
(bilinear ``grid_sample`` per level) is the reference and runs on every device.  Faster backends can
be registered behind the same signature.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MSDAFunction = Callable[[Tensor, list[tuple[int, int]], Tensor, Tensor], Tensor]


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Reference MSDA.

    Args:
        value: [B, S, M, D] per-head values of all S = sum(H_l * W_l) tokens (level-major).
        spatial_shapes: L pairs (H_l, W_l).
        sampling_locations: [B, Lq, M, L, P, 2] (x, y) in 0..1 of the padded feature map.
        attention_weights: [B, Lq, M, L, P], softmax-normalised over L*P.
    Returns:
        [B, Lq, M*D].
    """
    b, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants -1..1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(b * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [B*M, Lq, P, 2]
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(b, m * d, lq)
    return out.transpose(1, 2).contiguous()


_BACKENDS: dict[str, MSDAFunction] = {"pytorch": ms_deform_attn_pytorch}


def register_backend(name: str, fn: MSDAFunction) -> None:
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str = "pytorch",
) -> Tensor:
    """Dispatch to an MSDA backend (see ``ms_deform_attn_pytorch`` for shapes)."""
    try:
        fn = _BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown MSDA backend '{backend}' (available: {', '.join(available_backends())})") from None
    return fn(value, spatial_shapes, sampling_locations, attention_weights)
