"""Do the fast inference modes detect what the exact mode detects?  COCO AP of every mode on one split.

    python benchmarks/mode_agreement.py --checkpoint runs/demo/checkpoint_best.pt --data runs/demo/data \
        [--split val] [--device cpu] [--modes exact,channels_last,bf16] [--emulate] [--json OUT] \
        [--backends onnxruntime,openvino,openvino_int8] [--calib-data DIR] [--openvino-shapes fixed|HxW|dynamic]

``--backends`` also exports the checkpoint with the checkpoint's resize into a temporary folder, as
``dinodet export`` writes it: an ONNX file with dynamic shapes for onnxruntime; for the openvino rows an
IR (``to_openvino``) with fixed shapes by default (``--openvino-shapes``: ``fixed`` pads every image
to max_size x max_size, ``HxW`` to that size, e.g. the size every image of the split resizes to;
the MSDA is then OpenVINO's embedding bag; or ``dynamic``) and for int8 the same export quantised by
NNCF (``dinodet export --int8``: FFNs as 1x1 convolutions), calibrated on ``--calib-data`` (default the
split's own images).  Each exported model is evaluated with ``dinodet eval
--model`` (same dataset, resize and COCOeval); its row shows the AP difference to ``exact`` like the
modes' (int8 bar: 0.01).

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
import tempfile
import time
from pathlib import Path

import torch

from dinodet.engine.eval_checkpoint import evaluate_checkpoint
from dinodet.inference.modes import supported_modes

BAR = 0.005
INT8_BAR = 0.01
BACKENDS = ("onnxruntime", "openvino", "openvino_int8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="COCO-layout dataset folder")
    p.add_argument("--split", default="val")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default=None, help="comma-separated (default: every mode of the device but compile*)")
    p.add_argument("--emulate", action="store_true", help="allow CUDA-only modes on the CPU (numerics only)")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--backends", default="", help=f"comma-separated exported backends ({', '.join(BACKENDS)})")
    p.add_argument("--calib-data", default=None, help="int8 calibration images (default: the split's images)")
    p.add_argument("--openvino-shapes", default="fixed", metavar="fixed|HxW|dynamic",
                   help="shapes of the IR the openvino rows run: fixed (max_size x max_size, dinodet export's "
                   "default), a fixed HxW, or dynamic (default fixed)")
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
    backends = [b for b in args.backends.split(",") if b]
    if backends:
        rows += _exported_rows(args, backends)
    exact = next(r["AP"] for r in rows if r["mode"] == "exact")
    print(f"{'mode':<14} {'AP':>7} {'AP50':>7} {'dAP':>8} {'s':>7}")
    for r in rows:
        r["dAP"] = round(r["AP"] - exact, 4)
        bar = INT8_BAR if r["mode"] == "openvino_int8" else BAR
        r["within_bar"] = abs(r["dAP"]) <= bar
        print(f"{r['mode']:<14} {r['AP']:7.4f} {r['AP50']:7.4f} {r['dAP']:+8.4f} {r['seconds']:7.1f}"
              + ("" if r["within_bar"] else f"   <- outside the {bar} bar"))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["within_bar"] for r in rows) else 1


def _exported_rows(args: argparse.Namespace, backends: list[str]) -> list[dict]:
    """Export the checkpoint (an ONNX file for onnxruntime, an IR for the openvino rows) and evaluate
    each backend."""
    from dinodet.deploy.export import to_onnx, to_openvino

    rows = []
    with tempfile.TemporaryDirectory(prefix="dinodet-agreement-") as tmp:
        for name in backends:  # each exported as `dinodet export` writes it
            if name == "onnxruntime":
                model = to_onnx(args.checkpoint, Path(tmp) / "model.onnx", dynamic=True).path
            else:
                int8 = name == "openvino_int8"
                calib = (args.calib_data or _split_images(args.data, args.split)) if int8 else None
                model = to_openvino(args.checkpoint, Path(tmp) / f"{name}.xml", int8=int8, calib_data=calib,
                                    **_ir_shapes(args.openvino_shapes)).path
            backend = "openvino" if name.startswith("openvino") else name
            start = time.perf_counter()
            result = evaluate_checkpoint(None, args.data, split=args.split, model=model, backend=backend,
                                         progress=False).result
            rows.append({"mode": name, "AP": result.metrics["AP"], "AP50": result.metrics["AP50"],
                         "seconds": round(time.perf_counter() - start, 1), "device": "cpu", "emulated": False})
    return rows


def _ir_shapes(spec: str) -> dict:
    """``to_openvino`` shape options for ``--openvino-shapes``."""
    if spec in ("fixed", "dynamic"):
        return {"dynamic": spec == "dynamic"}
    h, w = (int(v) for v in spec.lower().split("x"))
    return {"input_size": (h, w)}


def _split_images(data: str, split: str) -> str:
    """The image folder of ``split`` in a COCO-layout dataset (``DATA/SPLIT`` or ``DATA/images/SPLIT``)."""
    for folder in (Path(data) / split, Path(data) / "images" / split, Path(data) / f"{split}2017"):
        if folder.is_dir():
            return str(folder)
    return str(data)


if __name__ == "__main__":
    sys.exit(main())
