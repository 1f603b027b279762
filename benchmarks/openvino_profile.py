"""Where does OpenVINO spend its time on a DINO model?  Per-layer ``PERF_COUNT`` of one image, summed by
op type and by module (the export names every node after its module: ``model.backbone...``).

    python benchmarks/openvino_profile.py [--preset dino_r50_4scale] [--size 800x1199] [--int8] [--json OUT] \
        [--nodes encoder.layers.0.]

Exports a random-weight model as ``dinodet export --format openvino`` does (fixed shape, batch 1, the
embedding-bag MSDA; int8: FFNs as 1x1 convolutions, NNCF calibrated on noise images, as ``dinodet
bench``) into a temporary folder, compiles it with ``PERF_COUNT`` and runs two images (the second is
profiled).  Prints the top op types and modules by real time (``--depth``: dotted components of a
module name kept) and, with ``--nodes``, every layer whose name contains that text (one encoder layer's
nodes, say).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import torch

from dinodet.checkpoint import save_checkpoint
from dinodet.deploy.bench import _noise_images, parse_size, random_batch
from dinodet.deploy.export import to_openvino
from dinodet.models.build import build_model
from dinodet.presets import get_preset


def _module(name: str, depth: int) -> str:
    """The module part of a layer name, cut to its first ``depth`` dotted components (3: model.backbone.body),
    with layer numbers folded (encoder.layers.3 -> encoder.layers.*) so that repeated layers add up."""
    head = name.split("/")[0]
    if "." not in head:
        return "(unnamed)"
    return ".".join("*" if part.isdigit() else part for part in head.split(".")[:depth])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="dino_r50_4scale")
    p.add_argument("--size", default="800x1199")
    p.add_argument("--int8", action="store_true")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--nodes", default=None, metavar="TEXT",
                   help="also list every layer that ran and whose name contains TEXT (e.g. encoder.layers.0.), "
                   "slowest first; OpenVINO names some fused subgraphs after none of their ops (Multiply_123)")
    args = p.parse_args(argv)
    import openvino as ov

    size = parse_size(args.size)
    cfg = get_preset(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with tempfile.TemporaryDirectory(prefix="dinodet-profile-") as tmp:
        folder = Path(tmp)
        save_checkpoint(folder / "m.pt", model, cfg)
        calib = _noise_images(folder / "calib", size) if args.int8 else None
        path = to_openvino(folder / "m.pt", folder / "m.xml", int8=args.int8, calib_data=calib, calib_images=4,
                           input_size=size, size=min(size), max_size=max(size)).path
        core = ov.Core()
        compiled = core.compile_model(str(path), "CPU", {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY",
                                                        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                        "INFERENCE_PRECISION_HINT": "f32"})
        images, mask, _ = random_batch(1, size, torch.device("cpu"))
        request = compiled.create_infer_request()
        feed = {"images": images.numpy(), "mask": mask.numpy()}
        request.infer(feed)
        request.infer(feed)
        by_type: collections.Counter = collections.Counter()
        by_module: collections.Counter = collections.Counter()
        precisions: collections.Counter = collections.Counter()
        nodes = []
        for info in request.profiling_info:
            ms = info.real_time.total_seconds() * 1000
            by_type[f"{info.node_type} ({info.exec_type})"] += ms
            by_module[_module(info.node_name, args.depth)] += ms
            if args.nodes and args.nodes in info.node_name and ms > 0:  # not the no-op reshapes
                nodes.append((ms, info.node_name, f"{info.node_type} ({info.exec_type})"))
            if info.node_type in ("Convolution", "FullyConnected", "MatMul"):
                precisions[info.exec_type.split("_")[-1]] += ms
    total = sum(by_type.values())
    print(f"{args.preset} {size[0]}x{size[1]} {'int8' if args.int8 else 'fp32'}: {total:.0f} ms summed over layers")
    for title, counter in (("op type (exec type)", by_type), ("module", by_module), ("conv/matmul by precision", precisions)):
        print(f"\n{title:<60} {'ms':>9} {'%':>6}")
        for key, ms in counter.most_common(args.top):
            print(f"{key[:60]:<60} {ms:9.1f} {100 * ms / total:6.1f}")
    if nodes:
        print(f"\nlayers named *{args.nodes}* ({sum(n[0] for n in nodes):.1f} ms)")
        for ms, name, kind in sorted(nodes, reverse=True):
            print(f"{ms:8.2f}  {kind[:34]:<34} {name[:120]}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"total_ms": total, "by_type": dict(by_type.most_common()),
                                                   "by_module": dict(by_module.most_common()),
                                                   "precisions": dict(precisions)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
