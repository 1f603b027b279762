"""onnxruntime CPU latency vs PyTorch CPU latency of one model, measured in the same run.

    python benchmarks/onnx_cpu_latency.py [--preset dino_r50_4scale] [--height 800 --width 1199] \
        [--threads 1] [--repeats 5] [--msda grid_sample,gather] [--json OUT] [--note TEXT]

Random weights (latency does not depend on them), one normalised image of HEIGHT x WIDTH with no
padding.  The model is exported once per MSDA variant with a fixed input shape (``dinodet.deploy.export``)
and the onnxruntime sessions (default graph optimisations) and the PyTorch model (eval mode,
``inference_mode``, its default CPU MSDA backend and the grid_sample reference) are timed in
interleaved rounds, so that a load change on a shared machine hits every contender alike.  Both
runtimes get ``--threads`` intra-op threads.  Prints a table (median and min seconds per image) and
the PyTorch / onnxruntime ratio, and how well the top-100 detections agree with the first row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _hw import cpu_name  # benchmarks/_hw.py (this folder is sys.path[0] for a script)

from dinodet.deploy.export import to_onnx
from dinodet.inference.detector import Detector
from dinodet.models.attention import MultiScaleDeformableAttention, configure_msda
from dinodet.models.postprocess import postprocess


def agree(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], hw: tuple[int, int],
          k: int = 100) -> dict[str, float]:
    """How well two runs' top-k detections agree, insensitive to the order of near-equal queries.

    Per-query outputs are not compared directly: with random weights many encoder scores are nearly
    tied, so 1e-6 differences can swap which tokens become queries (and their order)."""
    sizes = torch.tensor([hw], dtype=torch.int64)
    da, db = (postprocess(torch.from_numpy(x[0]), torch.from_numpy(x[1]), sizes, k) for x in (a, b))
    unused = list(range(k))
    matched = 0
    for i in range(k):
        for j in unused:
            if (int(da.labels[0, i]) == int(db.labels[0, j]) and abs(float(da.scores[0, i] - db.scores[0, j])) <= 1e-4
                    and bool(((da.boxes[0, i] - db.boxes[0, j]).abs() <= 1e-3 * da.boxes[0, i].abs() + 1e-2).all())):
                unused.remove(j)
                matched += 1
                break
    return {f"top{k}_matched": matched / k, "max_sorted_score_diff": float((da.scores - db.scores).abs().max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="dino_r50_4scale")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1199)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--msda", default="grid_sample,gather", help="ONNX MSDA variants to export and time")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--note", default="", help="free text stored in the JSON record (machine state, ...)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    detector = Detector.from_random(args.preset, seed=0)
    model = detector.model.eval()
    h, w = args.height, args.width
    images = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    feed = {"images": images.numpy(), "mask": mask.numpy()}
    load_before = os.getloadavg()

    default_backend = next(m.backend for m in model.modules() if isinstance(m, MultiScaleDeformableAttention))
    torch_modes = {f"pytorch ({default_backend} msda)": default_backend}
    if default_backend != "pytorch":
        torch_modes["pytorch (grid_sample msda)"] = "pytorch"

    contenders: dict[str, object] = {}
    export_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in [v for v in args.msda.split(",") if v]:
            path = Path(tmp) / f"{variant}.onnx"
            start = time.perf_counter()
            to_onnx(detector, path, msda=variant, batch_size=1, input_size=(h, w))
            export_seconds[variant] = round(time.perf_counter() - start, 1)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            contenders[f"onnxruntime ({variant})"] = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"])
            print(f"exported {variant} in {export_seconds[variant]} s", flush=True)

        def run(name: str) -> tuple[np.ndarray, np.ndarray]:
            if name in torch_modes:
                configure_msda(model, "cpu", override=torch_modes[name])
                with torch.inference_mode():
                    out = model(images, mask)
                return out.pred_logits.numpy(), out.pred_boxes.numpy()
            logits, boxes = contenders[name].run(None, feed)
            return logits, boxes

        names = [*torch_modes, *contenders]
        reference = run(names[0])  # also the warm-up of the first contender
        agreement = {}
        for name in names[1:]:
            agreement[name] = agree(reference, run(name), (h, w))  # warm-up and agreement check
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.repeats):
            for name in names:  # interleaved rounds
                start = time.perf_counter()
                run(name)
                times[name].append(time.perf_counter() - start)
                print(f"  {name}: {times[name][-1]:.2f} s", flush=True)

    base = statistics.median(times[names[0]])
    rows = [{"runtime": n, "median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
             "pytorch_default_over_this": round(base / statistics.median(t), 2),
             "agreement_with_first": agreement.get(n)} for n, t in times.items()]
    print(f"\n{args.preset} {h}x{w}, batch 1, {args.threads} thread(s), {cpu_name()}")
    print(f"{'runtime':<32} {'median s':>9} {'min s':>8} {'pytorch/this':>13}")
    for r in rows:
        print(f"{r['runtime']:<32} {r['median_s']:>9.2f} {r['min_s']:>8.2f} {base / r['median_s']:>13.2f}")
    record = {
        "benchmark": "onnx_cpu_latency", "preset": args.preset, "input": [1, 3, h, w], "threads": args.threads,
        "repeats": args.repeats, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__, "onnxruntime": ort.__version__, "export_seconds": export_seconds,
        "results": rows, "note": args.note,
    }
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"-> {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
