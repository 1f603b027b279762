"""Export a dinodet model (a trained or an official checkpoint) to ONNX: ``to_onnx(...)``, or through ONNX to
an OpenVINO IR: ``to_openvino(...)``.

Input contract (the same for every export; recorded in the file's metadata)
------------------------------------------------------------------------------
* ``images``  float32 [B, 3, H, W]: RGB scaled to 0..1, normalised with the ImageNet mean/std and
  zero-padded at the bottom/right to the largest image of the batch;
* ``mask``    bool [B, H, W]: True on the padding;
* ``orig_sizes`` int64 [B, 2] (only with ``with_postprocess``): each image's ORIGINAL (height,
  width), the frame of the output boxes.

That is exactly what ``dinodet.inference.detector.preprocess_batch`` (``eval_transform`` + ``pad_batch``) gives:
resize so the short side is ``size`` (800) and the long side at most ``max_size`` (1333), with PIL's
antialiased bilinear filter.  Resizing stays outside the graph on purpose: an ONNX ``Resize`` cannot
reproduce PIL's antialiasing, and a raw-uint8 graph would then give different detections than the
PyTorch model (the issue asks for the same predictions).

Outputs: ``logits`` float32 [B, Q, C] and ``boxes`` float32 [B, Q, 4] (cx, cy, w, h in 0..1 of each
image's unpadded region) of the last decoder layer; with ``with_postprocess`` instead the official
top-k over all (query, class) pairs: ``scores`` [B, K], ``labels`` int64 [B, K] and ``boxes``
[B, K, 4] (x0, y0, x1, y1) in pixels of the original image (K = ``model.num_select``).

Shapes: with ``dynamic`` the batch, height and width are free (H, W >= ``DYNAMIC_MIN_SIDE``: the
64-stride level must be at least 2 cells); otherwise fixed to ``batch_size`` x ``input_size``
(default ``max_size`` x ``max_size``, which holds any resized image) and smaller images are padded.

Exporter choices
----------------
* ``torch.onnx.export(..., dynamo=True)`` on a ``torch.export`` program we capture ourselves
  (non-strict).  The legacy TorchScript exporter is deprecated since PyTorch 2.9 and traces sizes as
  tensors, which the model's shape arithmetic does not support.  We call ``torch.export.export``
  directly because ``torch.onnx.export``'s own capture silently falls back to specialised (fixed)
  shapes when a dimension cannot stay dynamic; here that is an error.
* ``optimize=False``: the onnxscript optimizer produced an invalid graph for this model;
  onnxruntime applies its own graph optimisations when it loads the file.
* Opsets ``MIN_OPSET``..``MAX_OPSET`` (default ``DEFAULT_OPSET``; each checked in onnxruntime 1.32).
  torch.onnx writes 18 and up; for 17 we convert its opset-18 graph down with the ONNX version
  converter (after resolving the Reduce axes it needs as constants).  Nodes are re-sorted
  topologically after translation (at opset 23 torch.onnx places an input cast after its users).
* Multi-scale deformable attention is plain ONNX with an exportable backend of ``models.ops.msda``
  (``msda``, overriding the config's ``model.msda_backend`` and ``$DINODET_MSDA``): ``level_sum``
  (default: ONNX ``GridSample`` per level, weighted and summed level by level, with one permute for all
  levels; about 10% faster in OpenVINO than the reference's arrangement, whose stack of the levels and
  per-level 5-D permutes run there with slow generic kernels), ``pytorch`` (the reference's own
  arrangement; ``grid_sample`` is an alias, and the name the metadata records) or ``gather`` (bilinear
  interpolation written as index arithmetic + ``GatherElements``; TensorRT mis-builds ``GridSample``
  for DETR-family models).  All give the same results up to float summation order
  (tests/test_export.py checks them against each other in onnxruntime).  A fixed-shape OpenVINO IR
  uses ``embedding_bag`` by default: every output row as one weighted sum of value rows, an ONNX
  ``ATen`` node that OpenVINO reads as its ``EmbeddingBagPackedSum`` op, which never materialises the
  sampled values (~3x faster than ``level_sum``'s GridSample there); only OpenVINO reads it, and its CPU
  plugin only with static shapes, so ONNX files and dynamic IRs keep ``level_sum``.
* ``fp16``: weights and arithmetic in float16 (onnxruntime's float16 converter), inputs and outputs
  stay float32.  Meant for GPU execution providers; expect ~1e-2 differences.
"""
from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..checkpoint import check_checkpoint_path
from ..config import MAX_IMAGE_SIDE, ConfigError, DINOConfig
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, check_resize
from ..errors import CheckpointError, ExportError, first_line
from ..files import check_out_file, write_atomic
from ..inference.onnx_runtime import METADATA_FORMAT
from ..models.ops.msda import available_backends, get_backend
from ..models.postprocess import postprocess

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 17, 25, 18
DYNAMIC_MIN_SIDE = 65  # the 64-stride feature level must have >= 2 rows and columns
# the ONNX op the reference becomes, accepted for it (existing command lines) and recorded in the metadata
MSDA_ALIASES = {"grid_sample": "pytorch"}
DEFAULT_MSDA = "level_sum"
OPENVINO_FIXED_MSDA = "embedding_bag"  # the default of a fixed-shape OpenVINO IR (see the module docstring)
TARGETS = ("onnx", "openvino")  # what an ONNX graph is written for: any runtime, or OpenVINO's reader
_TWO_GB = 2**31 - 2**26  # protobuf limit (with some margin): larger models use external data
DEFAULT_CALIB_IMAGES = 300  # NNCF's own default subset size
# Modules whose linear layers and convolutions an int8 export keeps in float32 (see ``to_openvino``):
# the MSDA sampling offsets and attention weights (their errors move the sampling points), the class /
# box heads, and the backbone's first ResNet stage.  On the demo model the first stage alone moved AP by
# 0.015 (int8 everywhere else: -0.015 -> +0.001 on the 128x128 IR, -0.010 -> +0.002 on the dynamic
# one; the stem alone, later stages or any transformer part kept float32 did not help); it is ~5% of a
# DINO R50 image's arithmetic.
INT8_FP32_MODULES = ("sampling_offsets", "attention_weights", "box_head", "class_head", "body.layer1")



@dataclass
class ExportResult:
    """What ``to_onnx`` wrote: the file, its opset, input/output names and its metadata properties."""

    path: Path
    opset: int
    inputs: list[str]
    outputs: list[str]
    metadata: dict[str, str]


class ExportWrapper(nn.Module):
    """The eval-mode model with tensors in and out, as it is exported.

    forward(images, mask) -> (logits [B, Q, C], boxes [B, Q, 4] cxcywh 0..1), or with
    ``with_postprocess`` forward(images, mask, orig_sizes) -> (scores, labels, boxes in pixels).
    """

    def __init__(self, model: nn.Module, with_postprocess: bool = False, num_select: int = 300):
        super().__init__()
        self.model = model
        self.with_postprocess = with_postprocess
        self.num_select = num_select

    def forward(self, images: Tensor, mask: Tensor, orig_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        out = self.model(images, mask)
        if not self.with_postprocess:
            return out.pred_logits, out.pred_boxes
        assert orig_sizes is not None
        det = postprocess(out.pred_logits, out.pred_boxes, orig_sizes, self.num_select)
        return det.scores, det.labels, det.boxes


def default_msda(target: str = "onnx", dynamic: bool = False) -> str:
    """The MSDA arrangement an export uses unless told: ``OPENVINO_FIXED_MSDA`` for a fixed-shape
    OpenVINO IR, else ``DEFAULT_MSDA`` (see the module docstring)."""
    return OPENVINO_FIXED_MSDA if target == "openvino" and not dynamic else DEFAULT_MSDA


def export_backend(msda: str, target: str = "onnx", dynamic: bool = False) -> str:
    """The ``models.ops.msda`` backend that ``msda`` (a backend name or an alias) exports with for
    ``target`` (``TARGETS``); ExportError for a name that does not export there (an OpenVINO-only one
    also needs fixed shapes)."""
    if target not in TARGETS:
        raise ExportError(f"unknown export target '{target}' (choose from: {', '.join(TARGETS)})")
    backend = MSDA_ALIASES.get(msda, msda)
    exportable = [n for n in available_backends() if n != "auto" and target in get_backend(n).exports]
    if backend not in exportable:
        only = backend in available_backends() and get_backend(backend).exports
        problem = (f"MSDA backend '{msda}' exports for {'/'.join(get_backend(backend).exports)} only" if only
                   else f"MSDA backend '{msda}' does not export" if backend in available_backends()
                   else f"unknown MSDA variant '{msda}'")
        raise ExportError(f"{problem} (choose from: {', '.join([*exportable, *MSDA_ALIASES])})")
    if dynamic and "onnx" not in get_backend(backend).exports:
        raise ExportError(f"MSDA backend '{msda}' needs fixed shapes (OpenVINO runs its op with static shapes "
                          f"only); export without --dynamic, or choose level_sum")
    return backend


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"unsupported ONNX opset {opset!r} (supported: {MIN_OPSET}..{MAX_OPSET})")
    return opset


def to_onnx(
    checkpoint: str | os.PathLike | Any,
    out: str | os.PathLike,
    *,
    preset: str | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = False,
    fp16: bool = False,
    with_postprocess: bool = False,
    msda: str | None = None,
    batch_size: int | None = None,
    input_size: tuple[int, int] | None = None,
    size: int | None = None,
    max_size: int | None = None,
    check: bool = True,
    conv_ffn: bool = False,
    target: str = "onnx",
) -> ExportResult:
    """Export a model to ONNX (see the module docstring for the input/output contract).

    Args:
        checkpoint: a dinodet or official DINO checkpoint file (as ``dinodet predict``), or an
            already built ``dinodet.inference.detector.Detector``.
        out: the .onnx file to write (its folder is created).
        preset: architecture of an official checkpoint without stored args (checked against a
            dinodet checkpoint).
        opset: ONNX opset, ``MIN_OPSET``..``MAX_OPSET``.
        dynamic: free batch, height and width; else fixed ``batch_size`` x 3 x ``input_size``.
        fp16: float16 weights and arithmetic (float32 inputs/outputs).
        with_postprocess: end the graph with the top-k post-processing (extra input ``orig_sizes``).
        msda: a ``models.ops.msda`` backend that exports for ``target``: ``level_sum``, ``pytorch``
            (alias ``grid_sample``), ``gather``, or for OpenVINO with fixed shapes ``embedding_bag``;
            default ``default_msda(target, dynamic)`` (see the module docstring).
        batch_size, input_size: the fixed input shape when not ``dynamic`` (default 1 and
            (max_size, max_size)); not allowed with ``dynamic``.
        size, max_size: the resize the model expects (recorded in the metadata for the runtime);
            default: the checkpoint's evaluation resize (``data.eval_size`` / ``data.max_size``),
            or a Detector's own, so that the runtime predicts what ``dinodet predict`` does.
        check: run ``onnx.checker`` on the written file (before it replaces ``out``).
        conv_ffn: write the transformer FFNs' linear layers as 1x1 convolutions
            (``models.encoder.ConvFeedForward``; same outputs): what ``to_openvino`` exports for int8,
            so that OpenVINO runs them in int8 on AVX2 CPUs (see there).
        target: ``onnx`` (a file for any runtime) or ``openvino`` (a graph for OpenVINO's ONNX reader,
            which admits the OpenVINO-only MSDA backend; ``to_openvino`` passes it).  ``onnx.checker``
            is skipped for a graph with an OpenVINO-only op (OpenVINO's conversion checks it).

    Raises:
        ExportError: bad options, missing ONNX packages, or a model that does not export.
        CheckpointError / ConfigError: the checkpoint cannot be loaded; ConfigError: ``out`` cannot be
            written (checked first).
    """
    check_opset(opset)
    backend = export_backend(default_msda(target, dynamic) if msda is None else msda, target, dynamic)
    _check_resize(size, max_size)  # what is given, before the slow loading
    if dynamic and (batch_size is not None or input_size is not None):
        raise ExportError("a batch size / input size fixes the input shape: not allowed with dynamic")
    batch_size = 1 if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ExportError(f"batch size must be >= 1, got {batch_size}")
    if input_size is not None and (len(input_size) != 2 or min(input_size) < DYNAMIC_MIN_SIDE
                                   or max(input_size) > MAX_IMAGE_SIDE):
        raise ExportError(f"input size must be two sides (H W) in {DYNAMIC_MIN_SIDE}..{MAX_IMAGE_SIDE}, "
                          f"got {list(input_size)}")
    _require_onnx()
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"the output file must end in .onnx, got '{out}'")
    check_out_file(out)  # a folder in the way, or no permission: said now, not after minutes of exporting
    if isinstance(checkpoint, (str, os.PathLike)):
        check_checkpoint_path(Path(checkpoint))
    log.info(f"exporting {checkpoint if isinstance(checkpoint, (str, os.PathLike)) else 'the model'} to ONNX "
             f"(opset {opset}, {'dynamic' if dynamic else 'fixed'} shapes, msda {backend}{', float16' if fp16 else ''}); "
             "this takes a few minutes")

    model, config, class_names, category_ids, resize = _load_model(checkpoint, preset)
    size, max_size = resize[0] if size is None else size, resize[1] if max_size is None else max_size
    _check_resize(None, max_size)  # the checkpoint's own: its eval_size may exceed its max_size
    input_size = (max_size, max_size) if input_size is None else (int(input_size[0]), int(input_size[1]))
    names, ids = _label_map(config, class_names, category_ids)
    wrapper = ExportWrapper(model, with_postprocess, config.model.num_select).eval()
    input_names = ["images", "mask"] + (["orig_sizes"] if with_postprocess else [])
    output_names = ["scores", "labels", "boxes"] if with_postprocess else ["logits", "boxes"]
    example = _example_inputs(2 if dynamic else batch_size, (128, 160) if dynamic else input_size, with_postprocess)

    try:
        with _msda_backend(model, backend), _conv_ffn(model, conv_ffn), torch.no_grad():
            program = _capture(wrapper, example, input_names, dynamic)
            # torch.onnx writes opset >= 18; older opsets are converted below
            onnx_program = _translate(program, example, max(opset, 18), input_names, output_names)
    finally:
        if hasattr(checkpoint, "device") and hasattr(checkpoint, "model"):  # a Detector: back to its device
            checkpoint.model.to(checkpoint.device)
    proto = onnx_program.model_proto
    _toposort(proto.graph)  # at opset 23 torch.onnx places an input cast after its users
    if opset < 18:
        proto = _downgrade_opset(proto, opset)
    _check_opset_written(proto, opset)
    _name_dims(proto, program, input_names, output_names, with_postprocess)
    _name_nodes_by_module(proto.graph)
    if fp16:
        proto = _to_fp16(proto)

    contract = _contract(input_names, output_names, dynamic, batch_size, input_size, with_postprocess,
                         config.model.num_select, size, max_size)
    metadata = {
        "format": METADATA_FORMAT,
        "dinodet_version": __version__,
        "preset": config.name,
        "num_classes": str(config.model.num_classes),
        "class_names": json.dumps(names),
        "category_ids": json.dumps(ids),
        "num_select": str(config.model.num_select),
        "with_postprocess": json.dumps(with_postprocess),
        "dynamic": json.dumps(dynamic),
        "msda": {b: a for a, b in MSDA_ALIASES.items()}.get(backend, backend),  # dinodet-onnx-v1 names
        "conv_ffn": json.dumps(conv_ffn),
        "fp16": json.dumps(fp16),
        "opset": str(opset),
        "size": str(size),
        "max_size": str(max_size),
        "input_contract": json.dumps(contract),
    }
    import onnx

    onnx.helper.set_model_props(proto, metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    def save_and_check(tmp: Path) -> None:
        _save(proto, tmp, data_name=f"{out.name}.data")
        if check and "onnx" in get_backend(backend).exports:  # the checker knows no OpenVINO-only op
            try:
                onnx.checker.check_model(str(tmp))
            except onnx.checker.ValidationError as e:
                raise ExportError(f"the exported graph fails onnx.checker: {first_line(str(e))}") from None

    # checked under the temporary name: a failed export never replaces a good file
    write_atomic(out, save_and_check)
    return ExportResult(out, opset, input_names, output_names, metadata)


def to_openvino(checkpoint: str | os.PathLike | Any, out: str | os.PathLike, *, int8: bool = False,
                calib_data: str | os.PathLike | None = None, calib_images: int = DEFAULT_CALIB_IMAGES,
                fp32_modules: Sequence[str] = INT8_FP32_MODULES, **onnx_options: Any) -> ExportResult:
    """Export a model to an OpenVINO IR: ``out`` (.xml) and its weights beside it (.bin).

    The model goes through ``to_onnx`` (same options, contract and metadata; the metadata in the IR's
    rt_info section ``inference.openvino_runtime.RT_INFO_SECTION``) and ``openvino.convert_model``;
    weights stay float32 (``fp16`` is for GPU execution providers and is refused here).  With ``int8``
    the FFNs are exported as 1x1 convolutions (``conv_ffn``, unless the options say otherwise): OpenVINO
    runs int8 convolutions in int8 on every x86 CPU, but executes quantised fully-connected layers in
    float32 on AVX2 CPUs without VNNI (the FFNs hold ~60% of a DINO R50 image's arithmetic).  A float32
    IR keeps them fully-connected: as fast on an AVX2 CPU, ~5% faster a R50 image on an AVX-512 one
    (1.61 vs 1.70 s).  ``quantize_openvino`` keeps the layout of the IR it is given.

    ``int8``: NNCF post-training quantisation (``nncf.quantize``, mixed preset: symmetric weights,
    asymmetric activations, transformer model type), calibrated on up to ``calib_images`` images of the
    folder ``calib_data`` (sorted by path, every k-th so the sample spans the folder), each resized,
    normalised and padded exactly as the runtimes do (``preprocess_batch`` + ``fit_input``).  The
    linear layers and convolutions of the modules named in ``fp32_modules`` (whole components of a
    dotted module path: ``box_head``, ``body.layer1``; default ``INT8_FP32_MODULES``: the MSDA sampling
    offsets and attention weights, whose errors move the sampling points, the class / box heads and
    the backbone's first ResNet stage) stay float32 (NNCF ``ignored_scope``); the metadata records
    ``int8`` and the calibration.

    Raises:
        ExportError / ConfigError / CheckpointError: as ``to_onnx``; ConfigError: no openvino package,
            no nncf package (int8), or no readable calibration image.
    """
    from ..inference.openvino_runtime import require_openvino

    ov = require_openvino()
    out = Path(out)
    if out.suffix.lower() != ".xml":
        raise ExportError(f"an OpenVINO IR is written as FILE.xml (weights in FILE.bin), got '{out}'")
    if onnx_options.get("fp16"):
        raise ExportError("fp16 is for GPU execution providers: an OpenVINO IR keeps float32 weights")
    calib_paths: list[Path] = []
    if int8:  # every check before minutes of exporting
        calib_paths = calibration_images(calib_data, calib_images)
        _require_nncf()
    elif calib_data is not None:
        raise ExportError("--calib-data is for --int8")
    check_out_file(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem[:64]}.") as tmp:
        result = to_onnx(checkpoint, Path(tmp) / "model.onnx",
                         **{"conv_ffn": int8, **onnx_options, "target": "openvino"})
        try:
            model = ov.convert_model(str(result.path))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own types
            raise ExportError(f"OpenVINO cannot convert the ONNX graph: {first_line(str(e))}") from None
        metadata = dict(result.metadata)
        if int8:
            model = _quantize(model, metadata, result.inputs, calib_paths, fp32_modules)
        _save_ir(ov, model, metadata, Path(tmp), out)
    return ExportResult(out, result.opset, result.inputs, result.outputs, metadata)


def quantize_openvino(ir: str | os.PathLike, out: str | os.PathLike, calib_data: str | os.PathLike,
                      calib_images: int = DEFAULT_CALIB_IMAGES,
                      fp32_modules: Sequence[str] = INT8_FP32_MODULES) -> ExportResult:
    """Quantise an existing float32 IR from ``to_openvino`` to int8 (what ``to_openvino(int8=True)``
    does after the conversion; see there), writing ``out`` (.xml + .bin).

    Raises:
        ExportError / ConfigError / CheckpointError: unreadable or non-dinodet IR, missing nncf, no
        calibration image, or a failed quantisation.
    """
    from ..inference.onnx_runtime import read_metadata
    from ..inference.openvino_runtime import require_openvino, rt_metadata

    ov = require_openvino()
    ir, out = Path(ir), Path(out)
    if out.suffix.lower() != ".xml":
        raise ExportError(f"an OpenVINO IR is written as FILE.xml (weights in FILE.bin), got '{out}'")
    paths = calibration_images(calib_data, calib_images)
    _require_nncf()
    if not ir.is_file():
        raise CheckpointError(f"OpenVINO model not found: {ir}")
    try:
        model = ov.Core().read_model(str(ir))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{ir}: not a readable OpenVINO IR ({first_line(str(e))})") from None
    metadata = rt_metadata(model)
    read_metadata(ir, metadata, [(o.get_any_name(), None) for o in model.outputs])  # a dinodet export
    if metadata.get("int8") == "true":
        raise ExportError(f"{ir} is already int8")
    check_out_file(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    inputs = [i.get_any_name() for i in model.inputs]
    model = _quantize(model, metadata, inputs, paths, fp32_modules)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem[:64]}.") as tmp:
        _save_ir(ov, model, metadata, Path(tmp), out)
    outputs = [o.get_any_name() for o in model.outputs]
    return ExportResult(out, int(metadata.get("opset", DEFAULT_OPSET)), inputs, outputs, metadata)


def _save_ir(ov: Any, model: Any, metadata: dict[str, str], tmp: Path, out: Path) -> None:
    """Write ``model`` with ``metadata`` in its rt_info as ``out`` (+ .bin), through ``tmp``."""
    from ..inference.openvino_runtime import RT_INFO_SECTION

    for key, value in metadata.items():
        model.set_rt_info(value, [RT_INFO_SECTION, key])
    ir = tmp / out.name
    ov.save_model(model, str(ir), compress_to_fp16=False)  # its default halves the weights
    # the weights first: a complete .xml never points at a missing or older .bin
    os.replace(ir.with_suffix(".bin"), out.with_suffix(".bin"))
    os.replace(ir, out)


def calibration_images(folder: str | os.PathLike | None, count: int) -> list[Path]:
    """Up to ``count`` image paths of ``folder`` (recursively, sorted; every k-th when there are more,
    so the sample spans the folder) for int8 calibration.

    Raises:
        ConfigError: no folder given, not a folder, or no image in it; ExportError: ``count`` < 1.
    """
    from ..data.images import IMAGE_EXTENSIONS

    if folder is None:
        raise ConfigError("--int8 needs --calib-data DIR: a folder of images like the ones the model will see")
    if not Path(folder).is_dir():
        raise ConfigError(f"--calib-data '{folder}' is not a folder")
    if count < 1:
        raise ExportError(f"--calib-images must be >= 1, got {count}")
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise ConfigError(f"--calib-data '{folder}' holds no image")
    step = max(1, len(paths) // count)
    return paths[::step][:count]


def _require_nncf() -> None:
    try:
        import nncf  # noqa: F401
    except ImportError:
        raise ConfigError("int8 export needs the 'nncf' package: pip install 'dinodet[openvino]'") from None


def _fp32_op_names(model: Any, modules: Sequence[str]) -> list[str]:
    """The OpenVINO op names (MatMul, Convolution) that come from a module whose dotted path holds an
    entry of ``modules`` as whole components (``box_head``: every box head; ``body.conv1``: the
    backbone's stem only): ``to_onnx`` names each node after its module (``_name_nodes_by_module``) and
    OpenVINO names an op after its ONNX node."""
    wanted = tuple(f".{m}." for m in modules)
    names = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() in ("MatMul", "Convolution")]
    if wanted and not any("." in n.split("/")[0] for n in names):
        log.warning("int8: the model's layers are not named by module (an older export?); every layer is quantised")
    return [n for n in names if any(w in f".{n.split('/')[0]}." for w in wanted)]


def _quantize(model: Any, metadata: dict[str, str], input_names: Sequence[str], paths: Sequence[Path],
              fp32_modules: Sequence[str]) -> Any:
    """NNCF post-training quantisation of ``model`` calibrated on ``paths`` (see ``to_openvino``);
    unreadable images are skipped with a warning.  Records ``int8`` and the calibration in ``metadata``."""
    import nncf
    import numpy as np
    from tqdm import tqdm

    from ..data.images import load_image
    from ..errors import ImageLoadError
    from ..inference.detector import preprocess_batch
    from ..inference.onnx_runtime import fit_input

    fp32_ops = _fp32_op_names(model, fp32_modules)
    size, max_size = int(metadata["size"]), int(metadata["max_size"])
    shape = model.input("images").get_partial_shape()
    fixed_hw = (shape[2].get_length(), shape[3].get_length()) if shape[2].is_static and shape[3].is_static else None
    fixed_batch = shape[0].get_length() if shape[0].is_static else None
    feeds = []
    for path in tqdm(paths, desc="int8 calibration images", unit="img", leave=False):
        try:
            image = load_image(path)
        except ImageLoadError as e:
            log.warning("%s; skipped for calibration", e)
            continue
        images, mask, orig = preprocess_batch([image], size, max_size)
        images, mask, orig = fit_input(path, images, mask, orig, fixed_hw, fixed_batch)
        feed = {"images": images.numpy(), "mask": mask.numpy()}
        if "orig_sizes" in input_names:
            feed["orig_sizes"] = orig.numpy().astype(np.int64)
        feeds.append(feed)
    if not feeds:
        raise ConfigError("no calibration image could be read")
    log.info("int8: calibrating on %d image(s); %d layer(s) kept in float32", len(feeds), len(fp32_ops))
    nncf.set_log_level(logging.WARNING)  # its INFO lines list every layer it skips
    try:
        # 7-bit weights in every layer (NNCF's overflow fix; its default covers the first layer only):
        # x86 CPUs without VNNI sum int8 products pairwise in saturating int16, which clips large
        # sums; the IR may run on such a CPU.  On one (the AMD VM of the README's CPU deployment
        # section) the fix brought a demo model's int8 AP from +0.0105 to +0.0032 of float32.
        quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds),
                                  preset=nncf.QuantizationPreset.MIXED, model_type=nncf.ModelType.TRANSFORMER,
                                  ignored_scope=nncf.IgnoredScope(names=list(fp32_ops), validate=False),
                                  advanced_parameters=nncf.AdvancedQuantizationParameters(
                                      overflow_fix=nncf.OverflowFix.ENABLE))
    except Exception as e:  # noqa: BLE001 - NNCF raises many types; the user needs one line
        raise ExportError(f"int8 quantisation failed: {type(e).__name__}: {first_line(str(e))}") from None
    metadata["int8"] = "true"
    metadata["int8_calibration"] = json.dumps({"images": len(feeds), "preset": "mixed", "model_type": "transformer",
                                               "fp32_modules": list(fp32_modules), "fp32_layers": len(fp32_ops),
                                               "overflow_fix": "all layers (7-bit weights)",
                                               "nncf": str(nncf.__version__)})
    return quantized


def _check_resize(size: int | None, max_size: int | None) -> None:
    """The resize an export records: the common rule (``check_resize``) and a ``max_size`` that
    leaves the coarsest feature level 2x2 cells."""
    try:
        check_resize(size, max_size)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    if max_size is not None and max_size < DYNAMIC_MIN_SIDE:  # the default input size is max_size square
        raise ExportError(f"max_size must be >= {DYNAMIC_MIN_SIDE} (the coarsest feature level needs 2x2 cells), "
                          f"got {max_size}")


# ------------------------------------------------------------------------------------------ helpers


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs the 'onnx' and 'onnxscript' packages: "
                          "pip install 'dinodet[onnx]'") from None


def _load_model(checkpoint: Any, preset: str | None) -> tuple[nn.Module, DINOConfig, Any, Any, tuple[int, int]]:
    """(model, config, class names, category ids, (size, max_size) it expects)."""
    from ..inference.detector import Detector

    if isinstance(checkpoint, Detector):
        if preset is not None and preset != checkpoint.config.name:
            raise ConfigError(f"the detector is a '{checkpoint.config.name}' model, not '{preset}'")
        ids = list(checkpoint.category_ids)
        return (checkpoint.model.cpu().eval(), checkpoint.config, checkpoint.class_names, ids,
                (checkpoint.size, checkpoint.max_size))
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise ExportError(f"expected a checkpoint path or a Detector, got {type(checkpoint).__name__}")
    from ..checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint, preset=preset, ema=True)  # a run's checkpoint.pt: the weights predict uses
    data = ckpt.config.data
    return ckpt.model.eval(), ckpt.config, ckpt.class_names, ckpt.category_ids, (data.eval_size, data.max_size)


def _label_map(config: DINOConfig, class_names: Any, category_ids: Any) -> tuple[list[str], list[int]]:
    from ..inference.detector import default_label_map

    return default_label_map(config.model.num_classes, class_names, category_ids)


@contextlib.contextmanager
def _conv_ffn(model: nn.Module, enabled: bool) -> Iterator[None]:
    """With ``enabled``, every ``FeedForward`` of ``model`` is a ``ConvFeedForward`` while exporting
    (then put back: a Detector's model is the user's)."""
    from ..models.encoder import ConvFeedForward, FeedForward

    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if enabled and isinstance(child, FeedForward)]
    for parent, name, child in swapped:
        setattr(parent, name, ConvFeedForward(child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


@contextlib.contextmanager
def _msda_backend(model: nn.Module, backend: str) -> Iterator[None]:
    """Run MSDA ``backend`` on the CPU while exporting, then give every deformable attention back the
    backend it ran (a Detector's model goes back to its device)."""
    from ..models.attention import MultiScaleDeformableAttention, configure_msda

    modules = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    before = [m.backend for m in modules]
    configure_msda(model, "cpu", override=backend)
    try:
        yield
    finally:
        for m, name in zip(modules, before):
            m.use_backend(name)


def _example_inputs(batch: int, hw: tuple[int, int], with_postprocess: bool) -> tuple[Tensor, ...]:
    """Random normalised images; in a batch of 2+ the second image has padding (right, bottom)."""
    h, w = hw
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=gen)
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    if batch > 1:
        mask[1, :, w - w // 4:] = True
        mask[1, h - h // 8:, :] = True
        images[1] = images[1].masked_fill(mask[1], 0.0)
    sizes = torch.tensor([[h, w]] * batch, dtype=torch.int64)
    return (images, mask, sizes) if with_postprocess else (images, mask)


def _capture(wrapper: nn.Module, example: tuple[Tensor, ...], input_names: list[str],
             dynamic: bool) -> torch.export.ExportedProgram:
    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim("batch")
        height = torch.export.Dim("height", min=DYNAMIC_MIN_SIDE)
        width = torch.export.Dim("width", min=DYNAMIC_MIN_SIDE)
        dynamic_shapes = {"images": {0: batch, 2: height, 3: width}, "mask": {0: batch, 1: height, 2: width}}
        if "orig_sizes" in input_names:
            dynamic_shapes["orig_sizes"] = {0: batch}
    try:
        return torch.export.export(wrapper, example, dynamic_shapes=dynamic_shapes, strict=False)
    except torch._dynamo.exc.UserError as e:
        # A dimension that cannot stay dynamic over the whole range: report it, never specialise.
        hint = " ".join(ln.strip() for ln in str(e).splitlines() if "Not all values" in ln or "specialized" in ln)
        raise ExportError(f"the model cannot be exported with dynamic shapes: {hint or first_line(str(e))}") from None
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; the user needs one line
        raise ExportError(f"torch.export failed: {type(e).__name__}: {first_line(str(e))}") from None


def _translate(program: torch.export.ExportedProgram, example: tuple[Tensor, ...], opset: int,
               input_names: list[str], output_names: list[str]) -> Any:
    import warnings

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            return torch.onnx.export(program, example, None, dynamo=True, opset_version=opset, optimize=False,
                                     input_names=input_names, output_names=output_names, verbose=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX translation failed at opset {opset}: {type(e).__name__}: "
                          f"{first_line(str(e))}") from None


# ReduceX ops whose axes became an input in opset 18 (ReduceSum already in 13)
_AXES_INPUT_18 = {"ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                  "ReduceLogSumExp", "ReduceSumSquare"}


def _downgrade_opset(proto: Any, opset: int) -> Any:
    """Convert an opset-18 graph down with the ONNX version converter.

    The converter needs the axes of the opset-18 Reduce ops as initializers; the exporter computes
    some through Reshape/Identity of a Constant, so those are resolved first.  It also leaves the
    opset-18-only ``noop_with_empty_axes`` attribute behind, which is removed afterwards (the axes
    are never empty here).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    producer = {o: n for n in proto.graph.node for o in n.output}
    initializers = {i.name: i for i in proto.graph.initializer}

    def constant(name: str) -> list[int] | None:
        while name not in initializers:
            node = producer.get(name)
            if node is None:
                return None
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        return numpy_helper.to_array(a.t).reshape(-1).tolist()
                    if a.name in ("value_ints", "value_int"):
                        return list(a.ints) if a.name == "value_ints" else [a.i]
                return None
            if node.op_type not in ("Reshape", "Identity", "Squeeze", "Unsqueeze", "Cast", "Flatten"):
                return None
            name = node.input[0]  # these keep the values of their first input
        return numpy_helper.to_array(initializers[name]).reshape(-1).tolist()

    for node in proto.graph.node:
        if node.op_type in _AXES_INPUT_18 and len(node.input) > 1 and node.input[1]:
            axes = constant(node.input[1])
            if not axes:
                raise ExportError(f"cannot convert to opset {opset}: {node.op_type} has computed axes; use opset >= 18")
            init = numpy_helper.from_array(np.array(axes, dtype=np.int64), name=f"{node.output[0]}__axes")
            proto.graph.initializer.append(init)
            node.input[1] = init.name
    try:
        converted = onnx.version_converter.convert_version(proto, opset)
    except Exception as e:  # noqa: BLE001 - the converter raises RuntimeError/ValueError/...
        raise ExportError(f"cannot convert the graph to opset {opset} ({first_line(str(e))}); "
                          "use opset >= 18") from None
    for node in converted.graph.node:
        if node.op_type in _AXES_INPUT_18:
            keep = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
            del node.attribute[:]
            node.attribute.extend(keep)
    return converted


def _check_opset_written(proto: Any, opset: int) -> None:
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ExportError(f"the exporter wrote opset {written} instead of {opset}; use opset 18")


def _name_dims(proto: Any, program: torch.export.ExportedProgram, input_names: list[str],
               output_names: list[str], with_postprocess: bool) -> None:
    """Give the dynamic dimensions readable names (batch, height, width) everywhere in the graph."""
    import onnx

    images = next(v for v in proto.graph.input if v.name == "images")
    dims = images.type.tensor_type.shape.dim
    rename = {d.dim_param: name for d, name in zip(dims, ("batch", None, "height", "width")) if name and d.dim_param}
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")
    values: list[onnx.ValueInfoProto] = [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    for v in values:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: rename[m.group(1)], d.dim_param)
    second = "num_detections" if with_postprocess else "num_queries"
    for v in proto.graph.output:
        shape = v.type.tensor_type.shape.dim
        if len(shape) >= 2 and shape[1].dim_param:
            shape[1].dim_param = second


def _name_nodes_by_module(graph: Any) -> None:
    """Prefix each node's name with the module it comes from (``model.decoder.layers.1.cross_attn.
    sampling_offsets/node_MatMul_3432``; the exporter records the path in the node's metadata), so
    that runtimes' per-layer profiles (OpenVINO ``PERF_COUNT``) and the int8 export's float32 scope
    can name layers by module.  Names stay unique (the original name is kept at the end)."""
    for node in graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        path = [part.strip(" '\"") for part in scopes.strip("[]").split(",") if part.strip(" '\"")]
        if len(path) >= 2 and node.name:  # the module paths, outermost first, then the fx node's own name
            node.name = f"{path[-2]}/{node.name}"


def _to_fp16(proto: Any) -> Any:
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        raise ExportError("--fp16 needs the 'onnxruntime' package (its float16 converter)") from None
    try:
        converted = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"float16 conversion failed: {type(e).__name__}: {first_line(str(e))}") from None
    _toposort(converted.graph)  # the converter puts the input casts after their users
    return converted


def _toposort(graph: Any) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs (stable)."""
    nodes = list(graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    deps = [{producer[x] for x in n.input if x in producer} for n in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    missing = [len(d) for d in deps]
    ready = [i for i, m in enumerate(missing) if m == 0]
    order: list[int] = []
    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ExportError("the exported graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _save(proto: Any, out: Path, data_name: str) -> None:
    """Save ``proto``; graphs over 2 GB keep their weights in ``data_name`` beside ``out``."""
    import onnx

    size = sum(t.ByteSize() for t in proto.graph.initializer)
    if size < _TWO_GB:
        onnx.save_model(proto, str(out))
    else:
        onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name)


def _contract(input_names: Sequence[str], output_names: Sequence[str], dynamic: bool, batch_size: int,
              input_size: tuple[int, int], with_postprocess: bool, num_select: int, size: int,
              max_size: int) -> dict[str, Any]:
    b, (h, w) = ("batch", ("height", "width")) if dynamic else (batch_size, input_size)
    inputs = {
        "images": {"dtype": "float32", "shape": [b, 3, h, w],
                   "meaning": "RGB 0..1, normalised (x - mean) / std, zero-padded bottom/right"},
        "mask": {"dtype": "bool", "shape": [b, h, w], "meaning": "True on padding"},
    }
    if with_postprocess:
        inputs["orig_sizes"] = {"dtype": "int64", "shape": [b, 2], "meaning": "original (height, width)"}
        outputs = {
            "scores": {"dtype": "float32", "shape": [b, "num_detections"], "meaning": "sigmoid score, descending"},
            "labels": {"dtype": "int64", "shape": [b, "num_detections"], "meaning": "class index"},
            "boxes": {"dtype": "float32", "shape": [b, "num_detections", 4],
                      "meaning": "x0, y0, x1, y1 in pixels of the original image"},
        }
    else:
        outputs = {
            "logits": {"dtype": "float32", "shape": [b, "num_queries", "num_classes"],
                       "meaning": "class logits (sigmoid for scores)"},
            "boxes": {"dtype": "float32", "shape": [b, "num_queries", 4],
                      "meaning": "cx, cy, w, h in 0..1 of the unpadded image"},
        }
    return {
        "inputs": inputs,
        "outputs": outputs,
        "preprocess": {"resize": f"short side {size}, long side <= {max_size}, bilinear antialiased (PIL)",
                       "size": size, "max_size": max_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                       "pad": "zeros at bottom/right to the batch's largest image; mask True there"},
        "shape": ({"dynamic": True, "min_side": DYNAMIC_MIN_SIDE} if dynamic
                  else {"dynamic": False, "batch": batch_size, "height": input_size[0], "width": input_size[1]}),
        "num_select": num_select,
        "postprocess": ("in the graph: the top num_select detections of each image" if with_postprocess else
                        "by the caller: sigmoid(logits), the top num_select scores over all (query, class) "
                        "pairs, each with its query's box as x0, y0, x1, y1 times (width, height, width, "
                        "height) of the original image"),
    }
