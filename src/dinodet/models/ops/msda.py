"""Multi-scale deformable attention (MSDA) sampling op.

``ms_deform_attn`` is the backend-independent entry point; the pure PyTorch implementation here
(bilinear ``grid_sample`` per level) is the reference and runs on every device; ``gather`` computes the
same with index arithmetic (it exports to plain ONNX ops).  Every backend is registered as an
``MSDABackend`` that declares the devices, dtypes and gradients it supports (the Triton kernel of
``msda_triton``: CUDA only); ``select_backend`` picks one from those declarations, once, when a model is
put on a device (``models.attention.configure_msda``), not on every call.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

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


def ms_deform_attn_level_sum(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The reference's math arranged for graph runtimes (OpenVINO, onnxruntime): same shapes, and
    results equal up to float summation order (~1e-6).

    The reference stacks the L sampled levels into one [B*M, D, Lq, L*P] tensor, permutes the 5-D
    locations once per level and reduces over the innermost L*P axis; OpenVINO runs that stack, those
    permutes and that reduction with slow kernels (~20% of a DINO R50 image on CPU).  Here the
    locations and weights are permuted once, by a 4-D transpose, to points-major [B, M, L, P, Lq]
    order, and each level is weighted and reduced over its P points (an outer axis: contiguous rows
    of Lq) as soon as it is sampled.
    """
    b, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    values = value.reshape(b, s, m * d).transpose(1, 2).split([h * w for h, w in spatial_shapes], dim=2)
    grids = (2 * sampling_locations - 1).reshape(b, lq, m * n_levels * n_points, 2).transpose(1, 2)
    grids = grids.reshape(b, m, n_levels, n_points, lq, 2)
    weights = attention_weights.reshape(b, lq, m * n_levels * n_points).transpose(1, 2)
    weights = weights.reshape(b, m, n_levels, n_points, lq)
    out = None
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = values[lvl].reshape(b * m, d, h, w)
        g = grids[:, :, lvl].reshape(b * m, n_points, lq, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # [B*M, D, P, Lq]
        part = (sampled * weights[:, :, lvl].reshape(b * m, 1, n_points, lq)).sum(2)  # [B*M, D, Lq]
        out = part if out is None else out + part
    assert out is not None
    return out.view(b, m * d, lq).transpose(1, 2).contiguous()


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
    P points, weight = attention weight x bilinear weight.  ``F.embedding_bag(mode="sum",
    per_sample_weights=...)`` computes exactly that in one fused CPU kernel that reads D contiguous
    channels per corner and never materialises the sampled values, where the reference builds
    [B*M, D, Lq, L*P].  The table holds each level's map with a border of zero rows, and a corner
    outside the map reads the border (clamped onto it): zero padding without an inside-mask.
    Gradients reach the locations through the bilinear weights, as in grid_sample.
    """
    b, _, m, d = value.shape
    _, lq, _, n_levels, _, _ = sampling_locations.shape
    # Index arithmetic in float (exact for integers below 2**24, i.e. any level of any allowed image)
    # with the 4 corners as a broadcast axis: graph runtimes fuse it into a few elementwise kernels,
    # where int64 ops, a stack of the corners and an inside-mask ran as separate slow ones.  float32
    # at least: a bfloat16 location cannot hold a cell index.
    dtype = sampling_locations.dtype if sampling_locations.dtype in (torch.float32, torch.float64) else torch.float32
    level = (1, 1, 1, n_levels, 1, 1)  # [B, Lq, M, L, P, corner]
    shapes = device_constant(tuple((h, w) for h, w in spatial_shapes), torch.int64, value.device)  # [L, 2] (h, w)
    bordered = (shapes[:, 0] + 2) * (shapes[:, 1] + 2)  # rows of each level's map with its border
    starts = torch.cat([bordered.new_zeros(1), bordered.cumsum(0)[:-1]]).to(dtype).view(level)
    h_f, w_f = shapes[:, 0].to(dtype).view(level), shapes[:, 1].to(dtype).view(level)
    # pixel coordinates (pixel centres at integers); x and y taken by index, which OpenVINO runs as a
    # vectorised gather, where a split of the last axis ran as a reference kernel (~5 ms per R50 layer)
    wh = shapes.flip(1).to(dtype).view(1, 1, 1, n_levels, 1, 2)
    xy = sampling_locations.to(dtype) * wh - 0.5
    x, y = xy[..., 0, None], xy[..., 1, None]  # [B, Lq, M, L, P, 1] each
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    dx = device_constant((0.0, 1.0, 0.0, 1.0), dtype, value.device)  # the corners (x0, y0), (x0+1, y0), ...
    dy = device_constant((0.0, 0.0, 1.0, 1.0), dtype, value.device)
    weights = (torch.where(dx > 0, fx, 1 - fx) * torch.where(dy > 0, fy, 1 - fy)
               * attention_weights[..., None].to(dtype))
    heads = (torch.arange(b * m, device=value.device) * bordered.sum()).view(b, 1, m, 1, 1, 1)  # each table's start
    # Each table's start joins the float index when every row index is an integer a float holds exactly:
    # the index stays one fusable float graph with one conversion at its end (a separate int64 add over
    # the whole index cost OpenVINO ~10 ms per R50 encoder layer).  Static sizes only: a bound on
    # symbolic ones would add a guard to a compiled graph.
    sizes = (b, *(v for hw in spatial_shapes for v in hw))
    in_float = (all(isinstance(v, int) for v in sizes) and dtype == torch.float32
                and b * m * sum((h + 2) * (w + 2) for h, w in spatial_shapes) <= 2**24) or dtype == torch.float64
    base = starts + heads.to(dtype) if in_float else starts
    # the corner's cell in its bordered map: row/column -1 and h/w are the zero border
    cell = (((y0 + dy).clamp(min=-1).minimum(h_f) + 1) * (w_f + 2)
            + (x0 + dx).clamp(min=-1).minimum(w_f) + 1 + base)
    rows = cell.long() if in_float else heads + cell.long()
    maps = []
    for v, (h, w) in zip(value.split([h * w for h, w in spatial_shapes], dim=1), spatial_shapes):
        v = F.pad(v.reshape(b, h, w, m, d), (0, 0, 0, 0, 1, 1, 1, 1))  # [B, h+2, w+2, M, D]
        maps.append(v.permute(0, 3, 1, 2, 4).reshape(b, m, (h + 2) * (w + 2), d))
    table = torch.cat(maps, 2).reshape(-1, d)  # [B*M*sum((h+2)(w+2)), D]
    out = weighted_bag_sum(table, rows.view(b * lq * m, -1), weights.view(b * lq * m, -1).to(table.dtype))
    return out.view(b, lq, m * d)


def weighted_bag_sum(table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
    """``out[r] = sum_k weights[r, k] * table[rows[r, k]]``: table [N, D], rows (int64) and weights
    [R, K] -> [R, D].

    In an export trace (``torch.export``) it is one ONNX ``ATen`` node (operator ``embedding_bag``,
    mode sum, no offsets), the form OpenVINO's ONNX reader turns into its ``EmbeddingBagPackedSum``
    op.  No standard ONNX op does this without materialising every gathered row, so an export with
    it is for OpenVINO only (``MSDABackend.exports``), and OpenVINO's CPU plugin runs that op with
    static shapes only (a fixed-shape export).
    """
    if torch.compiler.is_exporting():
        return torch.onnx.ops.symbolic("::ATen", (table, rows, None, weights),
                                       {"operator": "embedding_bag", "mode": 0},
                                       dtype=table.dtype, shape=(rows.shape[0], table.shape[1]), version=1)
    return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")


REFERENCE = "pytorch"  # runs on every device and dtype: the fallback when a request cannot run
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ENV_VAR = "DINODET_MSDA"


@dataclass(frozen=True)
class MSDABackend:
    """One MSDA implementation and what it supports, declared with it so that ``select_backend``
    decides from these fields instead of knowing backends by name."""

    name: str
    # the function, or "module:function" imported on first use (optional packages such as triton, which
    # take seconds to import: the declaration must be readable without it)
    fn: MSDAFunction | str
    devices: tuple[str, ...] | None = None  # device types it runs on; None: every device
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    grad: bool = True  # has a backward (usable for training)
    # the export formats whose runtimes read what it traces to (``deploy.export``): "onnx" (plain ONNX
    # ops: every runtime, OpenVINO included), "openvino" (an op only OpenVINO reads); () for none
    exports: tuple[str, ...] = ()
    auto_devices: tuple[str, ...] = ()  # device types where ``auto`` picks it (first registered wins)
    auto_grad: bool = True  # ``auto`` picks it also when gradients are needed

    def supports(self, device: torch.device, dtype: torch.dtype, needs_grad: bool) -> bool:
        return ((self.devices is None or device.type in self.devices) and dtype in self.dtypes
                and (self.grad or not needs_grad))


_REGISTRY: dict[str, MSDABackend] = {}
_LOADED: dict[str, MSDAFunction] = {}
_UNLOADABLE: dict[str, str] = {}  # name -> why its import failed (not retried)
log = logging.getLogger(__name__)


def register_backend(backend: MSDABackend) -> None:
    """Add (or replace) a backend; ``auto`` considers backends in registration order."""
    _REGISTRY[backend.name] = backend
    _LOADED.pop(backend.name, None)
    _UNLOADABLE.pop(backend.name, None)


def available_backends() -> list[str]:
    """Every backend name that can be requested (``auto`` picks one by device, dtype and gradients)."""
    return sorted([*_REGISTRY, "auto"])


def get_backend(name: str) -> MSDABackend:
    """The declaration of backend ``name``; ValueError for an unknown name."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown MSDA backend '{name}' (available: {', '.join(available_backends())})")
    return _REGISTRY[name]


def backend_function(name: str) -> MSDAFunction | None:
    """The function of backend ``name``, importing it on first use; None when its import fails."""
    if name in _LOADED:
        return _LOADED[name]
    fn = get_backend(name).fn
    if isinstance(fn, str):
        if name in _UNLOADABLE:
            return None
        module, _, attr = fn.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except Exception as e:  # noqa: BLE001 - a missing optional dependency just makes the backend unusable
            _UNLOADABLE[name] = f"{type(e).__name__}: {e}"
            return None
    _LOADED[name] = fn
    return fn


def select_backend(requested: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
                   needs_grad: bool = False) -> str:
    """The backend that will run for ``requested`` on ``device`` with inputs of ``dtype``.

    ``auto`` is the first registered backend whose ``auto_devices`` name the device type and which
    supports it (Triton on CUDA; ``embedding_bag`` on CPU for inference, 2.5x the reference's forward
    there, while training keeps the reference, whose backward is the faster one on CPU: 0.61 vs 0.50 s
    per demo training step on 2 cores), else the reference.  A named backend that cannot run here (its
    declaration excludes the device, dtype or gradients, or its import fails) logs a warning and falls
    back to the reference, so one config runs on every machine.  Reads no environment variable (see
    ``models.attention.configure_msda``).

    Raises:
        ValueError: an unknown backend name.
    """
    device = torch.device(device)
    if requested == "auto":
        for backend in _REGISTRY.values():
            if (device.type in backend.auto_devices and (backend.auto_grad or not needs_grad)
                    and backend.supports(device, dtype, needs_grad) and backend_function(backend.name) is not None):
                return backend.name
        return REFERENCE
    backend = get_backend(requested)
    if not backend.supports(device, dtype, needs_grad):
        what = f"{device.type} {dtype}".replace("torch.", "") + (" with gradients" if needs_grad else "")
        log.warning("MSDA backend '%s' does not run on %s (it supports devices %s, dtypes %s, gradients %s); "
                    "using '%s'", requested, what, "any" if backend.devices is None else "/".join(backend.devices),
                    "/".join(str(t).replace("torch.", "") for t in backend.dtypes), backend.grad, REFERENCE)
        return REFERENCE
    if backend_function(requested) is None:
        log.warning("MSDA backend '%s' is not available (%s); using '%s'", requested, _UNLOADABLE[requested],
                    REFERENCE)
        return REFERENCE
    return requested


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str = REFERENCE,
) -> Tensor:
    """Run MSDA backend ``backend`` by name (see ``ms_deform_attn_pytorch`` for shapes); for the
    functional API and tests.  Models resolve their backend once instead (``configure_msda``)."""
    fn = backend_function(backend)
    if fn is None:
        raise RuntimeError(f"MSDA backend '{backend}' is not available: {_UNLOADABLE[backend]}")
    return fn(value, spatial_shapes, sampling_locations, attention_weights)


for _backend in (
    MSDABackend(REFERENCE, ms_deform_attn_pytorch, exports=("onnx", "openvino")),
    MSDABackend("gather", ms_deform_attn_gather, exports=("onnx", "openvino")),
    MSDABackend("level_sum", ms_deform_attn_level_sum, exports=("onnx", "openvino")),
    MSDABackend("embedding_bag", ms_deform_attn_embedding_bag, exports=("openvino",), auto_devices=("cpu",),
                auto_grad=False),
    MSDABackend("triton", "dinodet.models.ops.msda_triton:ms_deform_attn_triton", devices=("cuda",),
                auto_devices=("cuda",)),
):
    register_backend(_backend)
