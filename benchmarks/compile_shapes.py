"""Compiled inference on a stream of differently sized images: how many compilations, and how fast.

    python benchmarks/compile_shapes.py [--device cpu] [--preset dino_r50_4scale] [--short 800] \
        [--max-size 1333] [--mode compile] [--json OUT]

The sizes are what COCO's eval resize makes of common photo shapes (4:3, 3:2, 16:9, 1:1, 5:4 and their
portrait forms): at 800/1333 they fall in 9 different 64-pixel buckets, more than torch's recompile
limit of 8 for static graphs.  For ``exact`` and the compiled mode it prints the warm-up pass (compilations included),
the compiled graphs, and the ms/img of a second pass over the same sizes.  With ``--static`` it also
times one static graph (``dynamic=False``) at the first size against the dynamic graph at that size.
Random weights: speed does not depend on what the model learned.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

from dinodet.inference.modes import ModeRunner, pad_to_bucket
from dinodet.models.dino import DINO
from dinodet.presets import get_preset

ASPECTS = (4 / 3, 3 / 2, 16 / 9, 1.0, 5 / 4, 3 / 4, 2 / 3, 9 / 16, 4 / 5)


def stream_sizes(short: int, max_size: int) -> list[tuple[int, int]]:
    """(H, W) of each aspect ratio resized to ``short`` on its short side, long side capped at ``max_size``."""
    sizes = []
    for aspect in ASPECTS:  # width / height
        long_side = min(round(short * max(aspect, 1 / aspect)), max_size)
        s = round(long_side / max(aspect, 1 / aspect)) if long_side == max_size else short
        sizes.append((s, long_side) if aspect >= 1 else (long_side, s))
    return sizes


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def run_pass(runner: ModeRunner, sizes: list[tuple[int, int]], device: torch.device) -> list[float]:
    times = []
    for h, w in sizes:
        images, mask = torch.randn(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.bool)
        start = time.perf_counter()
        runner(images, mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="dino_r50_4scale")
    p.add_argument("--short", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--mode", default="compile")
    p.add_argument("--static", action="store_true", help="also time a static graph at the first size")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = DINO(get_preset(args.preset).model).eval()
    sizes = stream_sizes(args.short, args.max_size)
    buckets = sorted({tuple(pad_to_bucket(torch.zeros(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.bool))[0].shape[-2:])
                      for h, w in sizes})
    print(f"{len(sizes)} sizes in {len(buckets)} buckets: {sizes}", flush=True)
    records = []
    for mode in ("exact", args.mode):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        runner = ModeRunner(model, mode, device)
        warm = run_pass(runner, sizes, device)
        timed = run_pass(runner, sizes, device)
        rec = {"mode": mode, "sizes": len(sizes), "buckets": len(buckets), "graphs": _graphs(),
               "warmup_s": round(sum(warm), 1), "warmup_per_size_s": [round(t, 1) for t in warm],
               "ms_per_img": round(1000 * statistics.mean(timed), 1)}
        records.append(rec)
        print(f"{mode:<14} warm-up {rec['warmup_s']:8.1f} s  graphs {rec['graphs']}  "
              f"second pass {rec['ms_per_img']:9.1f} ms/img", flush=True)
        if args.static and mode != "exact":
            # the dynamic graph this runner ended with, then a fresh static graph, at the first size
            dynamic_first = statistics.median(run_pass(runner, sizes[:1] * 3, device))
            torch._dynamo.reset()
            static = ModeRunner(model, mode, device, dynamic=False)
            run_pass(static, sizes[:1], device)
            static_first = statistics.median(run_pass(static, sizes[:1] * 3, device))
            records.append({"mode": f"{mode} static vs dynamic graph at {sizes[0][0]}x{sizes[0][1]}",
                            "static_ms": round(1000 * static_first, 1), "dynamic_ms": round(1000 * dynamic_first, 1),
                            "dynamic_over_static": round(dynamic_first / static_first, 3)})
            print(f"at {sizes[0]}: static graph {1000 * static_first:.1f} ms, dynamic graph "
                  f"{1000 * dynamic_first:.1f} ms ({dynamic_first / static_first:.3f}x)", flush=True)
    exact = records[0]["ms_per_img"]
    records[1]["speedup_vs_exact"] = round(exact / records[1]["ms_per_img"], 2)
    print(f"{args.mode} vs exact on the second pass: {records[1]['speedup_vs_exact']:.2f}x")
    if args.json_out:
        meta = {"device": str(device), "preset": args.preset, "short": args.short, "max_size": args.max_size,
                "torch": torch.__version__}
        Path(args.json_out).write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
