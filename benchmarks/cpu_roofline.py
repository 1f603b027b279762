"""How fast can this CPU run DINO at all?  The compute floor of one image against the `reference` path.

    python benchmarks/cpu_roofline.py [--preset dino_r50_4scale] [--size 800x1199] [--hardware amd-epyc-2vcpu]
        [--out benchmarks/results]

Counts the model's matrix arithmetic (``torch.utils.flop_counter``: convolutions and linear layers,
2 FLOPs per multiply-add; the sampling, softmax and norms are not counted and are memory-bound), measures
the best float32 rate this machine reaches on the model's own biggest layer (the encoder FFN, [tokens,
256] x [256, 2048], in PyTorch and in OpenVINO, plus a square 4096 matrix product) and OpenVINO's int8
rate on the same layer written as a 1x1 convolution (the int8 kernels an AVX2 CPU without VNNI has),
then times the ``reference`` path as ``dinodet bench`` does.  The floor is FLOPs / best rate: no
backend can beat it, so reference / floor is the largest speed-up any float32 path can show here.

The DINO paper's "279 GFLOPs" for R50 4-scale count multiply-adds at 800x1333 (detectron/fvcore
convention); in FLOPs that is ~560 G, and ~522 G at 800x1199.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from _hw import cpu_name
from torch.utils.flop_counter import FlopCounterMode

from dinodet.deploy.bench import bench_inference, parse_size, random_batch
from dinodet.models.build import build_model
from dinodet.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]


def model_flops(model: torch.nn.Module, size: tuple[int, int]) -> dict[str, float]:
    """GFLOPs of one image of ``size`` (H, W): total and by top-level module."""
    images, mask, _ = random_batch(1, size, torch.device("cpu"))
    model = model.eval().requires_grad_(False)
    counter = FlopCounterMode(display=False, depth=2)
    with counter:
        model(images, mask)
    by_module = {name.split(".", 1)[-1]: sum(ops.values()) / 1e9 for name, ops in counter.get_flop_counts().items()
                 if name.count(".") == 1}
    return {"total": counter.get_total_flops() / 1e9, **by_module}


def _best_s(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def torch_rates(tokens: int) -> dict[str, float]:
    """GFLOP/s of PyTorch float32: the encoder FFN's first layer and a 4096 square product."""
    x, w = torch.randn(tokens, 256), torch.randn(2048, 256)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    with torch.no_grad():
        ffn = 2 * tokens * 256 * 2048 / _best_s(lambda: torch.nn.functional.linear(x, w)) / 1e9
        square = 2 * 4096**3 / _best_s(lambda: torch.mm(a, b), repeats=3) / 1e9
    return {"torch_ffn_linear": ffn, "torch_sgemm_4096": square}


def openvino_rates(tokens: int) -> dict[str, float]:
    """GFLOP/s (int8: GOP/s) of OpenVINO on the encoder FFN (256 -> 2048 -> 256): float32 as
    FullyConnected, and int8 (NNCF) as 1x1 convolutions; empty without the openvino extra."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return {}

    class FFN(torch.nn.Module):
        def __init__(self, conv: bool):
            super().__init__()
            make = (lambda i, o: torch.nn.Conv2d(i, o, 1)) if conv else torch.nn.Linear
            self.conv, self.l1, self.l2 = conv, make(256, 2048), make(2048, 256)

        def forward(self, x):
            if self.conv:  # [1, N, 256] -> [1, 256, N, 1]
                x = x.transpose(1, 2).unsqueeze(-1)
            y = self.l2(torch.relu(self.l1(x)))
            return y.squeeze(-1).transpose(1, 2) if self.conv else y

    x = torch.randn(1, tokens, 256)
    flops = 2 * 2 * tokens * 256 * 2048
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
              "INFERENCE_PRECISION_HINT": "f32"}
    rates = {}
    for name, conv, int8 in (("openvino_ffn_fp32", False, False), ("openvino_ffn_int8_conv1x1", True, True)):
        model = ov.convert_model(FFN(conv).eval(), example_input=x)
        if int8:
            model = nncf.quantize(model, nncf.Dataset([x.numpy()] * 2), subset_size=2)
        request = core.compile_model(model, "CPU", config).create_infer_request()
        rates[name] = flops / _best_s(lambda request=request: request.infer([x.numpy()])) / 1e9
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="dino_r50_4scale")
    p.add_argument("--size", default="800x1199")
    p.add_argument("--hardware", default="amd-epyc-2vcpu", help="names the result file")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    size = parse_size(args.size)
    torch.manual_seed(0)
    model = build_model(get_preset(args.preset))
    flops = model_flops(model, size)
    # tokens of the encoder: the 4 levels at strides 8, 16, 32, 64
    tokens = sum(-(-size[0] // s) * -(-size[1] // s) for s in (8, 16, 32, 64))
    rates = {**torch_rates(tokens), **openvino_rates(tokens)}
    fp32_peak = max(v for k, v in rates.items() if "int8" not in k)
    reference = bench_inference(model, torch.device("cpu"), size, 1, ["reference"], warmup=1, iters=2)[0]
    floor_fp32 = flops["total"] / fp32_peak
    record = {"benchmark": "cpu_roofline", "hardware": args.hardware, "cpu": cpu_name(), "cores": os.cpu_count(),
              "threads": torch.get_num_threads(), "preset": args.preset, "size": list(size), "gflops": flops,
              "rates_gflop_s": rates, "reference_s": reference.ms / 1000, "floor_fp32_s": floor_fp32,
              "max_fp32_speedup": reference.ms / 1000 / floor_fp32}
    if "openvino_ffn_int8_conv1x1" in rates:
        record["floor_int8_s"] = flops["total"] / rates["openvino_ffn_int8_conv1x1"]
        record["max_int8_speedup"] = reference.ms / 1000 / record["floor_int8_s"]
    print(f"{args.preset} {size[0]}x{size[1]}: {flops['total']:.1f} GFLOPs "
          f"({', '.join(f'{k} {v:.1f}' for k, v in flops.items() if k != 'total')})")
    for name, rate in rates.items():
        print(f"  {name:<28} {rate:7.1f} GFLOP/s")
    print(f"reference {record['reference_s']:.2f} s/img; float32 floor {floor_fp32:.2f} s/img at "
          f"{fp32_peak:.0f} GFLOP/s: no float32 path can exceed {record['max_fp32_speedup']:.2f}x the reference here")
    if "floor_int8_s" in record:
        print(f"int8 floor {record['floor_int8_s']:.2f} s/img if every layer ran at the int8 FFN rate: at most "
              f"{record['max_int8_speedup']:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cpu_roofline_{args.hardware}.json").write_text(
        json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
