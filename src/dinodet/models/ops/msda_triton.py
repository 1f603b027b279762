"""Triton kernel for multi-scale deformable attention (the ``triton`` backend of ``ops.msda``, declared
there as CUDA-only and imported on first use: importing triton takes seconds).

Same signature and numerics as ``ms_deform_attn_pytorch`` (bilinear, zero padding,
``align_corners=False``: pixel ``x = loc_x * W_l - 0.5``), forward and backward, for float32, bfloat16,
float16 and float64 (half types are computed in float32; float64 in float64, meant for testing).

Design (both kernels): one program per (query block, head, batch) -- grid ``(cdiv(Lq, BLOCK_Q) * M, B)``
with the head fastest so the M programs of one query block run side by side and share the cache lines of
its locations/weights.  A program holds a ``[BLOCK_Q, BLOCK_D]`` tile (queries x the head's D channels,
vectorised: 128-bit loads of a row's channels) and loops over levels (a real loop: unrolling it too made
ptxas spill at 255 registers on sm_90) and points (unrolled); each (query, level, point) gathers the 4
bilinear corners as rows of D contiguous channels of ``value`` ([B, S, M, D]), masked loads giving the
zero padding (corner validity is decided on the float coordinates, so locations far outside 0..1 are
safe).  Level shapes come from a small int32 tensor ``[L, 2]`` plus a level start index ``[L]``, built
once per (shapes, device) and cached, so a new image size does not recompile the kernel.  Tile sizes:
``kernel_config`` (overridable with ``set_kernel_config``; ``benchmarks/msda_kernel.py --sweep`` times
the alternatives).  Indexing inside one batch element's ``value`` is int32 (``S*M*D < 2**31``, checked).

* Forward: no atomics; each output element is written by exactly one program after a fixed-order
  accumulation, so the forward is deterministic (bitwise equal across runs).  Nothing but the output is
  materialised (the reference stacks a [B*M, D, Lq, L*P] tensor).
* Backward: grad w.r.t. ``sampling_locations`` and ``attention_weights`` are plain stores (each element
  belongs to one program, so deterministic); grad w.r.t. ``value`` is scattered with ``tl.atomic_add``
  into a float32 (float64 for float64 inputs) buffer, cast to ``value``'s dtype at the end.  Float atomics
  make ``grad_value`` non-deterministic in the last bits (order of additions), like ``grid_sample``'s own
  CUDA backward.

The kernels are wrapped as opaque ``torch.library.custom_op`` ops (``dinodet::msda_triton_forward`` /
``dinodet::msda_triton_backward``, with fake implementations, so ``torch.compile`` traces through them
without a graph break) under a ``torch.autograd.Function``.
The kernels also run under Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is
imported) on CPU tensors, which is how the CPU test suite checks them without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .constants import device_constant

__all__ = ["MSDATritonFunction", "kernel_config", "level_tensors", "ms_deform_attn_triton", "set_kernel_config"]


@triton.jit
def _sample_point(loc_ptr, attn_ptr, o, q_mask, dm, w, wf, hf, start, ACC: tl.constexpr):
    """Attention weight, bilinear fractions, top-left corner row and the 4 corner masks of one
    sampling point per query (shared by the forward and backward kernels)."""
    a = tl.load(attn_ptr + o, mask=q_mask, other=0.0).to(ACC)
    x = tl.load(loc_ptr + 2 * o, mask=q_mask, other=0.0).to(ACC) * wf - 0.5
    y = tl.load(loc_ptr + 2 * o + 1, mask=q_mask, other=0.0).to(ACC) * hf - 0.5
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    # corner validity from float compares (robust to far-away / huge locations)
    vx0 = (x0 >= 0) & (x0 <= wf - 1)
    vx1 = (x0 >= -1) & (x0 <= wf - 2)
    vy0 = (y0 >= 0) & (y0 <= hf - 1)
    vy1 = (y0 >= -1) & (y0 <= hf - 2)
    xi = tl.minimum(tl.maximum(x0, -1.0), wf).to(tl.int32)
    yi = tl.minimum(tl.maximum(y0, -1.0), hf).to(tl.int32)
    r00 = start + yi * w + xi  # row of the top-left corner
    m00 = (q_mask & vy0 & vx0)[:, None] & dm
    m10 = (q_mask & vy0 & vx1)[:, None] & dm
    m01 = (q_mask & vy1 & vx0)[:, None] & dm
    m11 = (q_mask & vy1 & vx1)[:, None] & dm
    return a, x - x0, y - y0, r00, m00, m10, m01, m11


@triton.jit
def _msda_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    S, Lq,
    M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m = pid % M
    q = (pid // M) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_mask = q < Lq
    d_mask = d < D
    # value rows of this batch and head: row r's D channels start at value_base + r * M * D
    value_base = value_ptr + b * S * M * D + m * D
    dm = d_mask[None, :]
    qm = (b * Lq + q) * M + m  # [BLOCK_Q] int64 index of (b, q, m)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    for lvl in range(L):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        hf = h.to(ACC)
        wf = w.to(ACC)
        for pt in tl.static_range(P):
            o = qm * (L * P) + lvl * P + pt  # index of (b, q, m, lvl, pt)
            a, fx, fy, r00, m00, m10, m01, m11 = _sample_point(loc_ptr, attn_ptr, o, q_mask, dm, w, wf, hf,
                                                               start, ACC)
            ptr00 = value_base + r00[:, None] * (M * D) + d[None, :]
            v00 = tl.load(ptr00, mask=m00, other=0.0).to(ACC)
            v10 = tl.load(ptr00 + M * D, mask=m10, other=0.0).to(ACC)
            v01 = tl.load(ptr00 + w * (M * D), mask=m01, other=0.0).to(ACC)
            v11 = tl.load(ptr00 + (w + 1) * (M * D), mask=m11, other=0.0).to(ACC)
            gx = 1 - fx
            gy = 1 - fy
            acc += ((a * gy * gx)[:, None] * v00 + (a * gy * fx)[:, None] * v10
                    + (a * fy * gx)[:, None] * v01 + (a * fy * fx)[:, None] * v11)
    out_ptrs = out_ptr + qm[:, None] * D + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _msda_bwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    S, Lq,
    M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, FP64: tl.constexpr, GRAD_VALUE: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m = pid % M
    q = (pid // M) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_mask = q < Lq
    d_mask = d < D
    dm = d_mask[None, :]
    value_base = value_ptr + b * S * M * D + m * D
    grad_value_base = grad_value_ptr + b * S * M * D + m * D
    qm = (b * Lq + q) * M + m
    g = tl.load(grad_out_ptr + qm[:, None] * D + d[None, :], mask=q_mask[:, None] & dm, other=0.0).to(ACC)
    for lvl in range(L):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        hf = h.to(ACC)
        wf = w.to(ACC)
        for pt in tl.static_range(P):
            o = qm * (L * P) + lvl * P + pt
            a, fx, fy, r00, m00, m10, m01, m11 = _sample_point(loc_ptr, attn_ptr, o, q_mask, dm, w, wf, hf,
                                                               start, ACC)
            off00 = r00[:, None] * (M * D) + d[None, :]
            # per-corner dot products <grad_out, value corner> over the head's channels
            g00 = tl.sum(g * tl.load(value_base + off00, mask=m00, other=0.0).to(ACC), axis=1)
            g10 = tl.sum(g * tl.load(value_base + off00 + M * D, mask=m10, other=0.0).to(ACC), axis=1)
            g01 = tl.sum(g * tl.load(value_base + off00 + w * (M * D), mask=m01, other=0.0).to(ACC), axis=1)
            g11 = tl.sum(g * tl.load(value_base + off00 + (w + 1) * (M * D), mask=m11, other=0.0).to(ACC),
                         axis=1)
            gx = 1 - fx
            gy = 1 - fy
            grad_a = gy * gx * g00 + gy * fx * g10 + fy * gx * g01 + fy * fx * g11
            grad_x = a * wf * (gy * (g10 - g00) + fy * (g11 - g01))
            grad_y = a * hf * (gx * (g01 - g00) + fx * (g11 - g10))
            tl.store(grad_attn_ptr + o, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * o, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * o + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=q_mask)
            if GRAD_VALUE:
                # scatter a * corner weight * grad_out to the 4 corners (atomics: queries share corners)
                tl.atomic_add(grad_value_base + off00, (a * gy * gx)[:, None] * g, mask=m00, sem="relaxed")
                tl.atomic_add(grad_value_base + off00 + M * D, (a * gy * fx)[:, None] * g, mask=m10,
                              sem="relaxed")
                tl.atomic_add(grad_value_base + off00 + w * (M * D), (a * fy * gx)[:, None] * g, mask=m01,
                              sem="relaxed")
                tl.atomic_add(grad_value_base + off00 + (w + 1) * (M * D), (a * fy * fx)[:, None] * g,
                              mask=m11, sem="relaxed")


_CONFIG_OVERRIDE: dict[str, tuple[int, int]] = {}


def kernel_config(d: int, dtype: torch.dtype, backward: bool) -> tuple[int, int]:
    """(BLOCK_Q, num_warps) for head dim ``d``.

    The forward tile holds about 8 elements per thread (D=32: 64 queries, 8 warps; ~80 registers on
    sm_90, no spills), the backward about 4 (D=32: 32 queries, 8 warps).  ``set_kernel_config``
    overrides this (benchmarks/msda_kernel.py --sweep uses it to tune on a given GPU).
    """
    override = _CONFIG_OVERRIDE.get("backward" if backward else "forward")
    if override is not None:
        return override
    block_d = triton.next_power_of_2(d)
    per_thread = 4 if backward else 8
    block_q = max(16, min(128, 256 * per_thread // block_d))
    num_warps = max(1, min(8, block_q * block_d // (32 * per_thread)))
    return block_q, num_warps


def set_kernel_config(forward: tuple[int, int] | None = None, backward: tuple[int, int] | None = None) -> None:
    """Force (BLOCK_Q, num_warps) of the forward / backward kernel (``None``: the default heuristic)."""
    for key, cfg in (("forward", forward), ("backward", backward)):
        if cfg is None:
            _CONFIG_OVERRIDE.pop(key, None)
        else:
            _check_block_q(cfg[0])
            _CONFIG_OVERRIDE[key] = (int(cfg[0]), int(cfg[1]))


def _check_block_q(block_q: int) -> None:
    if block_q <= 0 or block_q & (block_q - 1):
        raise ValueError(f"block_q must be a power of two, got {block_q}")


def _forward_impl(value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor,
                  block_q: int, num_warps: int) -> Tensor:
    b, s, m, d = value.shape
    _, lq, _, n_levels, n_points = attn.shape
    _check_block_q(block_q)
    out = torch.empty((b, lq, m * d), dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(lq, block_q) * m, b)
    _msda_fwd_kernel[grid](
        value, shapes, starts, loc, attn, out, s, lq,
        M=m, D=d, L=n_levels, P=n_points, BLOCK_Q=block_q, BLOCK_D=triton.next_power_of_2(d),
        FP64=value.dtype == torch.float64, num_warps=num_warps,
    )
    return out


def _backward_impl(grad_out: Tensor, value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor,
                   grad_value_needed: bool, block_q: int, num_warps: int) -> tuple[Tensor, Tensor, Tensor]:
    b, s, m, d = value.shape
    _, lq, _, n_levels, n_points = attn.shape
    _check_block_q(block_q)
    fp64 = value.dtype == torch.float64
    acc_dtype = torch.float64 if fp64 else torch.float32
    grad_value = torch.zeros(value.shape if grad_value_needed else (0,), dtype=acc_dtype, device=value.device)
    grad_loc = torch.empty_like(loc)
    grad_attn = torch.empty_like(attn)
    if grad_attn.numel():
        grid = (triton.cdiv(lq, block_q) * m, b)
        _msda_bwd_kernel[grid](
            value, shapes, starts, loc, attn, grad_out, grad_value, grad_loc, grad_attn, s, lq,
            M=m, D=d, L=n_levels, P=n_points, BLOCK_Q=block_q, BLOCK_D=triton.next_power_of_2(d),
            FP64=fp64, GRAD_VALUE=grad_value_needed, num_warps=num_warps,
        )
    return grad_value.to(value.dtype), grad_loc, grad_attn


# Opaque custom ops: torch.compile (and CUDA graph capture) call them as they are.  ``triton_op`` would
# let Inductor look into the kernels, but its mutation analysis of them (torch 2.11) reported the
# sampling locations as mutated, which breaks compiled training (a leaf that requires grad cannot be
# written); there is nothing for Inductor to fuse into a gather kernel anyway.
@torch.library.custom_op("dinodet::msda_triton_forward", mutates_args=())
def _forward_op(value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor,
                block_q: int, num_warps: int) -> Tensor:
    return _forward_impl(value, shapes, starts, loc, attn, block_q, num_warps)


@_forward_op.register_fake
def _forward_fake(value, shapes, starts, loc, attn, block_q, num_warps):
    b, _, m, d = value.shape
    return value.new_empty((b, attn.shape[1], m * d))


@torch.library.custom_op("dinodet::msda_triton_backward", mutates_args=())
def _backward_op(grad_out: Tensor, value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor,
                 grad_value_needed: bool, block_q: int, num_warps: int) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(grad_out, value, shapes, starts, loc, attn, grad_value_needed, block_q, num_warps)


@_backward_op.register_fake
def _backward_fake(grad_out, value, shapes, starts, loc, attn, grad_value_needed, block_q, num_warps):
    return (value.new_empty(value.shape if grad_value_needed else (0,)), torch.empty_like(loc),
            torch.empty_like(attn))


def level_tensors(spatial_shapes: list[tuple[int, int]], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """``spatial_shapes`` as an int32 [L, 2] tensor of (H_l, W_l) and the int32 [L] level start index on
    ``device``; built once per (shapes, device) and cached (a per-call host->device copy would sync)."""
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    starts, total = [], 0
    for h, w in shapes:
        starts.append(total)
        total += h * w
    return (device_constant(shapes, torch.int32, device),
            device_constant(tuple(starts), torch.int32, device))


class MSDATritonFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(value, shapes, starts, sampling_locations, attention_weights)``, where
    ``shapes`` / ``starts`` come from ``level_tensors`` and the other inputs are contiguous."""

    @staticmethod
    def forward(ctx, value: Tensor, shapes: Tensor, starts: Tensor, loc: Tensor, attn: Tensor) -> Tensor:
        block_q, num_warps = kernel_config(value.shape[-1], value.dtype, backward=False)
        out = _forward_op(value, shapes, starts, loc, attn, block_q, num_warps)
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        need_value, _, _, need_loc, need_attn = ctx.needs_input_grad
        block_q, num_warps = kernel_config(value.shape[-1], value.dtype, backward=True)
        grad_value, grad_loc, grad_attn = _backward_op(grad_out.contiguous(), value, shapes, starts, loc, attn,
                                                       bool(need_value), block_q, num_warps)
        return (grad_value if need_value else None, None, None,
                grad_loc if need_loc else None, grad_attn if need_attn else None)


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """MSDA with the Triton kernels; same arguments, result and gradients as ``ms_deform_attn_pytorch``."""
    b, s, m, d = value.shape
    if sum(int(h) * int(w) for h, w in spatial_shapes) != s:
        raise ValueError(f"value has {s} tokens but spatial_shapes {list(spatial_shapes)} sum to another count")
    loc_shape = tuple(sampling_locations.shape)
    if len(loc_shape) != 6 or loc_shape[-1] != 2 or (loc_shape[0], loc_shape[2], loc_shape[3]) != (
            b, m, len(spatial_shapes)):
        raise ValueError(f"sampling_locations must be [{b}, Lq, {m}, {len(spatial_shapes)}, P, 2], got {loc_shape}")
    if tuple(attention_weights.shape) != loc_shape[:-1]:
        raise ValueError(f"attention_weights {tuple(attention_weights.shape)} does not match sampling_locations "
                         f"{loc_shape}")
    if s * m * d >= 2**31:
        raise ValueError("the Triton MSDA kernel indexes one batch element's value with int32 (S*M*D < 2**31)")
    shapes, starts = level_tensors(spatial_shapes, value.device)
    return MSDATritonFunction.apply(value.contiguous(), shapes, starts, sampling_locations.contiguous(),
                                    attention_weights.contiguous())

