"""Do the fast inference modes detect what the exact mode detects?  COCO AP of every mode on one split.

    python benchmarks/mode_agreement.py --checkpoint runs/demo/checkpoint_best.pt --data runs/demo/data \
        [--split val] [--device cpu] [--modes exact,channels_last,bf16] [--emulate] [--json OUT]

Prints AP / AP50 per mode and the difference to ``exact`` (the bar: |AP difference| <= 0.005) and the
wall time of each evaluation (``dinodet.engine.eval_checkpoint.evaluate_checkpoint``, what ``dinodet eval``
runs: EMA weights when the checkpoint holds them, the checkpoint's resize).
``--emulate`` also runs the CUDA-only modes (fp16, compile_bf16) on a CPU: their half-precision numerics
without the GPU kernels, a stand-in until a GPU measures them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dinodet.engine.eval_checkpoint import evaluate_checkpoint
from dinodet.inference.modes import supported_modes

BAR = 0.005


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="COCO-layout dataset folder")
    p.add_argument("--split", default="val")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default=None, help="comma-separated (default: every mode of the device but compile*)")
    p.add_argument("--emulate", action="store_true", help="allow CUDA-only modes on the CPU (numerics only)")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    modes = (args.modes.split(",") if args.modes
             else [m for m in supported_modes(device) if not m.startswith("compile") and m != "reference"])
    if "exact" not in modes:
        modes = ["exact", *modes]
    rows = []
    for name in modes:  # each evaluation as `dinodet eval --mode NAME` runs it (the checkpoint loaded afresh)
        start = time.perf_counter()
        result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, device=args.device, mode=name,
                                     emulate=args.emulate, progress=False).result
        rows.append({"mode": name, "AP": result.metrics["AP"], "AP50": result.metrics["AP50"],
                     "seconds": round(time.perf_counter() - start, 1), "device": device.type,
                     "emulated": name not in supported_modes(device)})
    exact = next(r["AP"] for r in rows if r["mode"] == "exact")
    print(f"{'mode':<14} {'AP':>7} {'AP50':>7} {'dAP':>8} {'s':>7}")
    for r in rows:
        r["dAP"] = round(r["AP"] - exact, 4)
        r["within_bar"] = abs(r["dAP"]) <= BAR
        print(f"{r['mode']:<14} {r['AP']:7.4f} {r['AP50']:7.4f} {r['dAP']:+8.4f} {r['seconds']:7.1f}"
              + ("" if r["within_bar"] else "   <- outside the 0.005 bar"))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["within_bar"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
