"""Micro-benchmark of the MSDA op: PyTorch reference vs the Triton kernel at the encoder's shapes.

    python benchmarks/msda_kernel.py                      # CUDA: forward and forward+backward, fp32
    python benchmarks/msda_kernel.py --dtype bf16 --batch 1 --json msda.json
    python benchmarks/msda_kernel.py --sweep              # also time (BLOCK_Q, num_warps) variants
    python benchmarks/msda_kernel.py --device cpu         # CPU: reference vs gather, reduced shapes

Shapes default to the DINO encoder at 800x1333: 4 levels at strides 8..64 -> (100,167), (50,84),
(25,42), (13,21), S = Lq = 22223 queries, 8 heads x 32 channels, 4 points, batch 2.  Sampling locations
look like the encoder's (each query's own position plus per-head offsets of a few pixels), which
matters for a gather kernel's cache behaviour; ``--random-locations`` uses uniform ones instead.

Times are medians over ``--iters`` runs after ``--warmup`` (CUDA events); the forward is timed under
``no_grad`` (inference), forward+backward with all three inputs requiring grad.  Peak memory is the
peak allocated during one call above what was allocated before it (the inputs).  On a machine without
CUDA (and no ``--device cpu``) it prints a message and exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from dinodet.models.ops.msda import ms_deform_attn_gather, ms_deform_attn_pytorch

STRIDES = (8, 16, 32, 64)


def level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    return [(math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]


def make_inputs(shapes, batch, heads, dim, points, dtype, device, random_locations=False, seed=0):
    """value [B,S,M,D], locations [B,Lq,M,L,P,2], weights [B,Lq,M,L,P] with Lq = S (encoder self-attention)."""
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    n_levels = len(shapes)
    value = torch.randn(batch, s, heads, dim, generator=g)
    if random_locations:
        loc = torch.rand(batch, s, heads, n_levels, points, 2, generator=g)
    else:
        # reference point = the query's own pixel centre (normalised); offsets as DINO initialises them
        # (per-head direction x point index, in pixels of each level) plus ~1 px noise
        refs = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                     indexing="xy"), -1).reshape(-1, 2) for h, w in shapes])
        theta = torch.arange(heads) * (2 * math.pi / heads)
        direction = torch.stack([theta.cos(), theta.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True)[0]
        steps = torch.arange(1, points + 1, dtype=torch.float32)
        offsets = direction[:, None, None, :] * steps[None, None, :, None]  # [M, 1, P, 2] pixels
        offsets = offsets + torch.randn(batch, s, heads, n_levels, points, 2, generator=g)
        norm = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # (W_l, H_l)
        loc = refs[None, :, None, None, None, :] + offsets / norm[None, None, None, :, None, :]
    weights = torch.randn(batch, s, heads, n_levels * points, generator=g).softmax(-1)
    weights = weights.view(batch, s, heads, n_levels, points)
    return value.to(device, dtype), loc.to(device, dtype), weights.to(device, dtype)


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn, warmup, iters):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
    else:
        def run(fn, warmup, iters):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
    return run


def _peak_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_backend(fn, shapes, inputs, device, warmup, iters):
    """{'forward': (ms, peak MiB), 'forward_backward': (ms, peak MiB)} and the outputs/grads of one run."""
    value, loc, weights = inputs
    timer = _timer(device)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                           generator=torch.Generator().manual_seed(1)).to(device, value.dtype)

    def forward():
        with torch.no_grad():
            return fn(value, shapes, loc, weights)

    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def forward_backward():
        for t in leaves:
            t.grad = None
        out = fn(leaves[0], shapes, leaves[1], leaves[2])
        out.backward(grad_out)
        return out

    result = {}
    for name, step in (("forward", forward), ("forward_backward", forward_backward)):
        ms = timer(step, warmup, iters)
        result[name] = (ms, _peak_mib(step, device))
    out = forward_backward().detach()
    return result, [out] + [t.grad for t in leaves]


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--image", default=None, help="HxW of the (padded) input image; default 800x1333 on CUDA, "
                                                  "256x320 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default 2 on CUDA, 1 on CPU")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=32, help="channels per head")
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--random-locations", action="store_true", help="uniform locations instead of encoder-like")
    ap.add_argument("--sweep", action="store_true", help="CUDA: also time Triton (BLOCK_Q, num_warps) variants")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: the Triton MSDA kernel benchmark needs an NVIDIA GPU. "
              "(Use --device cpu to time the reference vs the gather backend on CPU at reduced shapes.)")
        return 0
    cuda = device.type == "cuda"
    if cuda:
        try:
            from dinodet.models.ops import msda_triton
        except Exception as exc:  # noqa: BLE001
            print(f"the Triton backend does not import ({exc!r}); is the triton package installed?")
            return 1
        candidates = {"pytorch": ms_deform_attn_pytorch, "triton": msda_triton.ms_deform_attn_triton}
    else:
        candidates = {"pytorch": ms_deform_attn_pytorch, "gather": ms_deform_attn_gather}
    image = args.image or ("800x1333" if cuda else "256x320")
    height, width = (int(v) for v in image.lower().split("x"))
    batch = args.batch or (2 if cuda else 1)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    iters = args.iters if args.iters is not None else (50 if cuda else 5)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    shapes = level_shapes(height, width)
    inputs = make_inputs(shapes, batch, args.heads, args.dim, args.points, dtype, device, args.random_locations)
    s = inputs[0].shape[1]
    desc = (f"MSDA {'CUDA ' + torch.cuda.get_device_name(device) if cuda else 'CPU'}: image {height}x{width}, "
            f"levels {shapes}, B={batch} Lq=S={s} M={args.heads} D={args.dim} L={len(shapes)} P={args.points} "
            f"{args.dtype}, {'random' if args.random_locations else 'encoder-like'} locations, "
            f"median of {iters} after {warmup} warmup")
    print(desc)

    results, outputs = {}, {}
    for name, fn in candidates.items():
        results[name], outputs[name] = bench_backend(fn, shapes, inputs, device, warmup, iters)
    base, other = list(candidates)
    errors = {what: (b.double() - a.double()).abs().max().item()
              for what, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), outputs[base], outputs[other])}

    rows = []
    print(f"\n{'pass':<18}{base + ' ms':>12}{other + ' ms':>12}{'speed-up':>10}"
          f"{base + ' MiB':>14}{other + ' MiB':>14}")
    for what in ("forward", "forward_backward"):
        (tb, mb), (to, mo) = results[base][what], results[other][what]
        rows.append({"pass": what, f"{base}_ms": tb, f"{other}_ms": to, "speedup": tb / to,
                     f"{base}_peak_mib": mb, f"{other}_peak_mib": mo})
        print(f"{what:<18}{tb:>12.3f}{to:>12.3f}{tb / to:>9.2f}x{_fmt(mb, '.1f'):>14}{_fmt(mo, '.1f'):>14}")
    print("max abs difference vs reference: " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))

    sweep = []
    if args.sweep and cuda:
        print("\nTriton (BLOCK_Q, num_warps) sweep (ms; forward under no_grad, backward = fwd+bwd):")
        timer = _timer(device)
        fn = candidates["triton"]
        value, loc, weights = inputs
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        grad_out = torch.randn(batch, s, args.heads * args.dim, device=device, dtype=dtype)

        def fwd():
            with torch.no_grad():
                fn(value, shapes, loc, weights)

        def fwd_bwd():
            fn(leaves[0], shapes, leaves[1], leaves[2]).backward(grad_out)

        for block_q in (16, 32, 64, 128):
            for warps in (2, 4, 8):
                if block_q * triton_block_d(args.dim) // (32 * warps) < 1:
                    continue
                msda_triton.set_kernel_config(forward=(block_q, warps), backward=(block_q, warps))
                try:
                    tf, tb = timer(fwd, 3, max(5, iters // 2)), timer(fwd_bwd, 3, max(5, iters // 2))
                except Exception as exc:  # noqa: BLE001 - e.g. out of resources for a config
                    print(f"  BLOCK_Q={block_q:<4} warps={warps}: failed ({type(exc).__name__})")
                    continue
                sweep.append({"block_q": block_q, "num_warps": warps, "forward_ms": tf, "forward_backward_ms": tb})
                print(f"  BLOCK_Q={block_q:<4} warps={warps}: forward {tf:.3f}  forward+backward {tb:.3f}")
        msda_triton.set_kernel_config()
        best_f = min(sweep, key=lambda r: r["forward_ms"])
        best_b = min(sweep, key=lambda r: r["forward_backward_ms"])
        print(f"best forward: {best_f}\nbest forward+backward: {best_b}  (defaults: forward "
              f"{msda_triton.kernel_config(args.dim, dtype, False)}, backward "
              f"{msda_triton.kernel_config(args.dim, dtype, True)})")

    if args.json:
        payload = {
            "description": desc, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__, "image": [height, width], "levels": shapes, "batch": batch, "queries": s,
            "heads": args.heads, "dim": args.dim, "points": args.points, "dtype": args.dtype,
            "random_locations": args.random_locations, "warmup": warmup, "iters": iters,
            "backends": [base, other], "rows": rows, "max_abs_diff": errors, "sweep": sweep,
        }
        if cuda:
            import triton

            payload["triton"] = triton.__version__
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


def triton_block_d(dim: int) -> int:
    return 1 << max(0, (dim - 1).bit_length())


if __name__ == "__main__":
    sys.exit(main())
