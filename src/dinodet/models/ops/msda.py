"""Multi-scale deformable attention (MSDA) sampling op.

``ms_deform_attn`` is the backend-independent entry point; the pure PyTorch implementation here
(bilinear ``grid_sample`` per level) is the reference and runs on every device; ``gather`` computes the
same with index arithmetic (it exports to plain ONNX ops).  Faster backends (the Triton kernel in
``msda_triton``) register behind the same signature; ``resolve_backend`` picks one by device, dtype,
the model config (``model.msda_backend``) and ``$DINODET_MSDA``.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .constants import device_constant

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


def _bilinear_gather(value: Tensor, h: int, w: int, grid: Tensor) -> Tensor:
    """Bilinear sampling with zero padding written as index arithmetic + gather.

    Equivalent to ``F.grid_sample(..., align_corners=False, padding_mode="zeros")`` but made only of
    Floor/Gather/Mul/Add, which export to plain ONNX ops (TensorRT mis-builds GridSample for some
    DETR-family models).

    Args:
        value: [N, D, h*w] flattened map; grid: [N, Lq, P, 2] (x, y) in 0..1.
    Returns:
        [N, D, Lq, P].
    """
    n, d, _ = value.shape
    lq, p = grid.shape[1], grid.shape[2]
    x = grid[..., 0] * w - 0.5  # pixel coordinates, pixel centres at integers
    y = grid[..., 1] * h - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    out = value.new_zeros((n, d, lq * p))
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        wx = (x - x0) if dx else (1 - (x - x0))
        wy = (y - y0) if dy else (1 - (y - y0))
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        weight = (wx * wy * inside.to(value.dtype)).reshape(n, 1, lq * p)
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).to(torch.int64).reshape(n, 1, lq * p)
        out = out + torch.gather(value, 2, index.expand(n, d, lq * p)) * weight
    return out.view(n, d, lq, p)


def ms_deform_attn_gather(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """MSDA with gather-based bilinear sampling (same shapes and results as the reference)."""
    b, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(b * m, d, h * w)
        g = sampling_locations[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [B*M, Lq, P, 2]
        sampled.append(_bilinear_gather(v, h, w, g))
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(b, m * d, lq)
    return out.transpose(1, 2).contiguous()


def ms_deform_attn_embedding_bag(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """MSDA as one weighted ``embedding_bag`` (same shapes and results as the reference).

    Every output row [b, q, m, :] is a weighted sum of value rows: 4 bilinear corners x L levels x
    P points, weight = attention weight x bilinear weight (0 for corners outside the map).
    ``F.embedding_bag(mode="sum", per_sample_weights=...)`` computes exactly that in one fused CPU
    kernel that reads D contiguous channels per corner and never materialises the sampled values,
    where the reference builds [B*M, D, Lq, L*P].  Gradients reach the locations through the
    bilinear weights, as in grid_sample.
    """
    b, s, m, d = value.shape
    _, lq, _, n_levels, _, _ = sampling_locations.shape
    shapes = device_constant(tuple((h, w) for h, w in spatial_shapes), torch.int64, value.device)  # [L, 2] (h, w)
    h_i, w_i = shapes[:, 0].view(1, 1, 1, n_levels, 1), shapes[:, 1].view(1, 1, 1, n_levels, 1)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    x = sampling_locations[..., 0] * w_i - 0.5  # pixel coordinates, pixel centres at integers
    y = sampling_locations[..., 1] * h_i - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    # first row of (image, head, level) in the [B*M*S, D] table
    heads = torch.arange(b * m, device=value.device).view(b, 1, m, 1, 1)
    base = heads * s + starts.view(1, 1, 1, n_levels, 1)
    rows, weights = [], []
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < w_i) & (yi >= 0) & (yi < h_i)
        wgt = (fx if dx else 1 - fx) * (fy if dy else 1 - fy) * attention_weights
        weights.append(torch.where(inside, wgt, torch.zeros_like(wgt)))
        rows.append(base + yi.clamp(min=0).minimum(h_i - 1) * w_i + xi.clamp(min=0).minimum(w_i - 1))
    rows_t = torch.stack(rows, -1).view(b * lq * m, -1)
    weights_t = torch.stack(weights, -1).view(b * lq * m, -1)
    table = value.permute(0, 2, 1, 3).reshape(b * m * s, d)
    out = F.embedding_bag(rows_t, table, per_sample_weights=weights_t.to(table.dtype), mode="sum")
    return out.view(b, lq, m * d)


_BACKENDS: dict[str, MSDAFunction] = {"pytorch": ms_deform_attn_pytorch, "gather": ms_deform_attn_gather,
                                      "embedding_bag": ms_deform_attn_embedding_bag}
# Backends living in their own modules, imported on first use (they may need optional packages / CUDA).
_LAZY_BACKENDS: dict[str, str] = {"triton": "dinodet.models.ops.msda_triton"}
ENV_VAR = "DINODET_MSDA"


def register_backend(name: str, fn: MSDAFunction) -> None:
    _BACKENDS[name] = fn


def available_backends() -> list[str]:
    """Every backend name ``ms_deform_attn`` accepts (``auto`` picks one by device and dtype)."""
    return sorted(set(_BACKENDS) | set(_LAZY_BACKENDS) | {"auto"})


_UNLOADABLE: set[str] = set()  # lazy backends whose import failed: not retried on every call


def _load(name: str) -> MSDAFunction | None:
    if name not in _BACKENDS and name in _LAZY_BACKENDS and name not in _UNLOADABLE:
        try:
            importlib.import_module(_LAZY_BACKENDS[name])  # registers itself
        except Exception:  # noqa: BLE001 - a missing optional dependency just makes the backend unusable
            _UNLOADABLE.add(name)
    return _BACKENDS.get(name)


def _usable(name: str, device: torch.device) -> bool:
    # the Triton kernel is CUDA-only; everything else runs anywhere
    return not (name == "triton" and device.type != "cuda")


def resolve_backend(requested: str, device: torch.device | str, needs_grad: bool = False) -> str:
    """The backend that will actually run for ``requested`` on ``device``.

    ``$DINODET_MSDA`` (when set) overrides ``requested``.  ``auto`` means the Triton kernel on CUDA
    (when it imports); elsewhere ``embedding_bag`` for inference (2.5x the reference's forward on CPU)
    and the reference when gradients are needed (embedding_bag's backward is the slower one there:
    0.61 vs 0.50 s per demo training step on 2 cores).  A named backend that cannot run here (Triton on
    CPU, or without the ``triton`` package) falls back to the reference, so one config runs on every
    machine; ``resolve_backend`` is how callers find out what ran.

    Raises:
        ValueError: an unknown backend name.
    """
    name = os.environ.get(ENV_VAR, "").strip() or requested
    if name not in available_backends():
        raise ValueError(f"unknown MSDA backend '{name}' (available: {', '.join(available_backends())})")
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else ("pytorch" if needs_grad else "embedding_bag")
    if not _usable(name, device) or _load(name) is None:
        return "pytorch"
    return name


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str = "pytorch",
) -> Tensor:
    """Dispatch to an MSDA backend (see ``ms_deform_attn_pytorch`` for shapes and ``resolve_backend``
    for how ``backend`` is chosen)."""
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (value, sampling_locations, attention_weights))
    fn = _BACKENDS[resolve_backend(backend, value.device, needs_grad)]
    return fn(value, spatial_shapes, sampling_locations, attention_weights)
