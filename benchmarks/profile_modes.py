"""Where the time goes: profile one inference mode or training step of a preset (random weights).

    python benchmarks/profile_modes.py --device cuda --task infer --mode bf16
    python benchmarks/profile_modes.py --device cuda --task train --mode bf16 --batch 2 --json prof.json

Prints the wall time per iteration, the device (kernel) time per iteration and the number of kernel
launches: when the kernel time is far below the wall time the run is bound by launches / Python,
not by the GPU.  Then the kernels that take the most device time, grouped by name.  On CPU the
"device" columns are the operators' own CPU time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dinodet.deploy.bench import TRAIN_MODES, make_train_step, parse_size, random_batch
from dinodet.inference.modes import ModeRunner
from dinodet.models.dino import DINO
from dinodet.presets import get_preset


def _self_device_us(evt, cuda: bool) -> float:
    if not cuda:
        return evt.self_cpu_time_total
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return getattr(evt, name)
    return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="dino_r50_4scale")
    ap.add_argument("--size", default="800x1199")
    ap.add_argument("--task", choices=("infer", "train"), default="infer")
    ap.add_argument("--mode", default="bf16", help="inference mode (dinodet.inference.modes) or training mode (bench.TRAIN_MODES)")
    ap.add_argument("--batch", type=int, default=None, help="default 1 for infer, 2 for train")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("profile_modes: no CUDA device; nothing to do")
        return 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    cfg = get_preset(args.preset)
    batch = args.batch or (1 if args.task == "infer" else 2)
    images, mask, targets = random_batch(batch, parse_size(args.size), device, num_classes=cfg.model.num_classes)
    if args.task == "infer":
        torch.manual_seed(0)
        runner = ModeRunner(DINO(cfg.model), args.mode, device, copy_model=False)

        def fn():
            return runner(images, mask)
    else:
        if args.mode not in TRAIN_MODES:
            ap.error(f"training modes: {', '.join(TRAIN_MODES)}")
        fn, _ = make_train_step(cfg, args.mode, device, images, mask, targets)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        fn()
    sync()
    wall_ms = 1000 * (time.perf_counter() - t0) / args.iters

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(args.iters):
            fn()
        sync()
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        launches = len(kernels) / args.iters
        dev_ms = sum(e.device_time if hasattr(e, "device_time") else e.cuda_time for e in kernels) / 1000 / args.iters
    else:
        launches = float("nan")
        dev_ms = float("nan")
    rows = []
    for evt in prof.key_averages():
        us = _self_device_us(evt, cuda)
        on_device = getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA
        if us > 0 and (on_device or not cuda):  # CUDA: kernels only (their launching ops would count twice)
            rows.append((us / 1000 / args.iters, evt.count // args.iters, evt.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows) or 1.0
    print(f"{args.preset} {args.task} mode={args.mode} batch={batch} size={args.size} on "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"wall {wall_ms:.2f} ms/iter | device kernel time {dev_ms:.2f} ms/iter | {launches:.0f} launches/iter")
    print(f"{'ms/iter':>8} {'share':>6} {'calls':>6}  name")
    for ms, n, key in rows[: args.top]:
        print(f"{ms:8.3f} {100 * ms / total:5.1f}% {n:6d}  {key[:110]}")
    if args.json:
        args.json.write_text(json.dumps({
            "preset": args.preset, "task": args.task, "mode": args.mode, "batch": batch, "size": args.size,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "wall_ms": wall_ms, "device_ms": dev_ms,
            "launches": launches, "top": [{"ms": ms, "calls": n, "name": key} for ms, n, key in rows[:60]],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
