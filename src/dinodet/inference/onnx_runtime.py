"""Run an exported dinodet ONNX model with onnxruntime: ``OnnxDetector(path).predict(images)``.

Same preprocessing, post-processing and ``Prediction`` objects as ``dinodet.inference.detector.Detector``, so
``dinodet predict --backend onnxruntime --model model.onnx`` writes the same predictions.json as the
PyTorch backend.  The label map, the top-k size and the expected resize come from the file's
metadata (written by ``dinodet.deploy.export.to_onnx``); PyTorch is used only for the preprocessing.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.transforms import check_resize
from ..errors import CheckpointError, ConfigError, first_line
from ..models.postprocess import Detections, postprocess
from .detector import ImageInput, Prediction, predict_in_batches
from .modes import pad_to_size, repeat_to_batch

# the metadata tag of dinodet's ONNX files: written by ``deploy.export``, required here
METADATA_FORMAT = "dinodet-onnx-v1"
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ExportedModelDetector:
    """What the runtimes of an exported model share (``OnnxDetector``, ``OpenVinoDetector``): the
    ``Detector.predict`` interface over ``predict_in_batches`` and the feed of one batch.  A runtime
    sets the attributes below from the file and implements ``_infer``."""

    path: Path
    size: int
    max_size: int
    class_names: list[str]
    _category_ids: Tensor
    input_names: list[str]
    fixed_batch: int | None
    fixed_hw: tuple[int, int] | None
    with_postprocess: bool
    num_select: int

    def predict(self, images: ImageInput | Sequence[ImageInput], threshold: float = 0.3,
                batch_size: int = 1) -> list[Prediction]:
        """Detect objects in one image or a sequence of images (see ``Detector.predict``).

        A model exported with a fixed batch size runs batches of that size (whatever
        ``batch_size``); with a fixed input size every image is padded to it.
        """
        # a dynamic-size model runs same-size images together (unpadded, as Detector.predict);
        # a fixed-size one pads every image to its input size anyway
        return predict_in_batches(images, self.run, threshold=threshold, batch_size=self.fixed_batch or batch_size,
                                  size=self.size, max_size=self.max_size, class_names=self.class_names,
                                  category_ids=self._category_ids,
                                  group_multiple=1 if self.fixed_hw is None else None)

    def run(self, images: Tensor, mask: Tensor, orig_sizes: Tensor) -> Detections:
        """The model on a preprocessed batch (``preprocess_batch``'s outputs) -> top-k detections."""
        n = images.shape[0]
        images, mask, orig_sizes = fit_input(self.path, images, mask, orig_sizes, self.fixed_hw, self.fixed_batch)
        feed = {"images": images.numpy(), "mask": mask.numpy()}
        if "orig_sizes" in self.input_names:
            feed["orig_sizes"] = orig_sizes.numpy()
        return to_detections(self._infer(feed), n, orig_sizes, self.with_postprocess, self.num_select)

    def _infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The model's outputs for one feed, in output order."""
        raise NotImplementedError

    def _use_metadata(self, path: Path, info: ExportMetadata) -> None:
        """Take the label map, top-k size and resize from the file's checked metadata."""
        self.path = path
        self.metadata = info.properties
        self.preset, self.class_names, self.num_select = info.preset, info.class_names, info.num_select
        self._category_ids, self.with_postprocess = info.category_ids, info.with_postprocess
        self.size, self.max_size = info.size, info.max_size


class OnnxDetector(ExportedModelDetector):
    """An exported model in an onnxruntime session, with the ``Detector.predict`` interface.

    Args:
        path: the .onnx file.
        device: ``cpu`` or ``cuda`` (CUDAExecutionProvider, when this onnxruntime has it).
        size, max_size: override the resize recorded at export (short side, cap on the long side).
        num_threads: onnxruntime intra-op threads (default: ``torch.get_num_threads()``, which
            follows OMP_NUM_THREADS, so both backends use the same number of cores).

    Raises:
        CheckpointError: missing or unreadable file, or not a dinodet export.
        ConfigError: unavailable device.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", size: int | None = None,
                 max_size: int | None = None, num_threads: int | None = None):
        check_resize(size, max_size)  # what is given; the file's own resize is what it was exported with
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("the onnxruntime backend needs the 'onnxruntime' package: "
                              "pip install 'dinodet[onnx]'") from None
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ONNX model not found: {path}")
        kind = str(device).split(":")[0]
        if kind not in _PROVIDERS or _PROVIDERS[kind] not in ort.get_available_providers():
            raise ConfigError(f"device '{device}' is not available to onnxruntime "
                              f"(providers: {', '.join(ort.get_available_providers())})")
        options = ort.SessionOptions()
        self.num_threads = torch.get_num_threads() if num_threads is None else num_threads
        options.intra_op_num_threads = self.num_threads
        # one graph node at a time, each over all the threads: a second (inter-op) pool would
        # oversubscribe the cores the intra-op pool already uses
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[_PROVIDERS[kind]])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise CheckpointError(f"{path}: not a readable ONNX model ({first_line(str(e))})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        outputs = [(o.name, o.shape[-1] if o.shape and isinstance(o.shape[-1], int) else None)
                   for o in self.session.get_outputs()]
        info = read_metadata(path, meta, outputs, size, max_size)
        self._use_metadata(path, info)
        self.input_names = [i.name for i in self.session.get_inputs()]
        shape = self.session.get_inputs()[0].shape  # [B, 3, H, W]; ints where fixed
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.fixed_hw = (shape[2], shape[3]) if isinstance(shape[2], int) and isinstance(shape[3], int) else None

    @property
    def thread_settings(self) -> str:
        """What runs, for reports: e.g. ``onnxruntime intra_op=2 inter_op=1 sequential``."""
        return f"onnxruntime intra_op={self.num_threads} inter_op=1 sequential"

    def _infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feed)


@dataclass(frozen=True)
class ExportMetadata:
    """The checked dinodet metadata of an exported model (ONNX or OpenVINO IR): what a runtime needs
    around the graph, and the resize to use (the export's unless overridden)."""

    properties: dict[str, str]
    preset: str
    class_names: list[str]
    category_ids: Tensor
    num_select: int
    with_postprocess: bool
    size: int
    max_size: int


def read_metadata(path: Path, meta: Mapping[str, str], outputs: Sequence[tuple[str, int | None]],
                  size: int | None = None, max_size: int | None = None) -> ExportMetadata:
    """Read and check the dinodet metadata of an exported model, shared by every runtime so that they
    accept and reject the same files.

    Args:
        path: the model file (for the messages).
        meta: its metadata properties (all strings, as ``deploy.export`` writes them).
        outputs: the graph's outputs as (name, size of the last dimension or None where not fixed).
        size, max_size: the caller's resize override.

    Raises:
        CheckpointError: not a dinodet export, or incomplete or malformed metadata (the file is
            untrusted input: one clear error instead of a failure deep in a run).
    """
    if meta.get("format") != METADATA_FORMAT:
        raise CheckpointError(f"{path}: not a dinodet ONNX export (no '{METADATA_FORMAT}' metadata)")
    try:
        info = ExportMetadata(
            properties=dict(meta),
            preset=meta["preset"],
            class_names=json.loads(meta["class_names"]),
            category_ids=torch.tensor(json.loads(meta["category_ids"]), dtype=torch.int64),
            num_select=int(meta["num_select"]),
            with_postprocess=json.loads(meta["with_postprocess"]),
            size=int(meta["size"]) if size is None else size,
            max_size=int(meta["max_size"]) if max_size is None else max_size,
        )
        _check_metadata(info, outputs)
    except KeyError as e:
        raise CheckpointError(f"{path}: dinodet metadata without {e}") from None
    except (ValueError, TypeError, OverflowError) as e:  # ConfigError too: a size out of range
        raise CheckpointError(f"{path}: invalid dinodet metadata ({first_line(str(e))})") from None
    return info


def _check_metadata(info: ExportMetadata, outputs: Sequence[tuple[str, int | None]]) -> None:
    """ValueError unless the label map, top-k size and resize fit together and fit the graph's
    outputs: a label map shorter than the class count would fail on the first detection of a
    missing class, deep in a run, instead of here."""
    meta = info.properties
    expected = "scores, labels, boxes" if info.with_postprocess else "logits, boxes"
    if not isinstance(info.with_postprocess, bool):
        raise ValueError(f"with_postprocess must be true or false, got {meta['with_postprocess']}")
    if len(outputs) != len(expected.split(", ")):
        raise ValueError(f"with_postprocess={meta['with_postprocess']} needs the outputs {expected}, but the "
                         f"model has {', '.join(name for name, _ in outputs)}")
    if not isinstance(info.class_names, list) or not all(isinstance(n, str) for n in info.class_names):
        raise ValueError("class_names must be a list of names")
    if info.category_ids.ndim != 1:
        raise ValueError("category_ids must be a list of integers")
    counts = {"class_names": len(info.class_names), "category_ids": len(info.category_ids)}
    if "num_classes" in meta:
        counts["num_classes"] = int(meta["num_classes"])
    if not info.with_postprocess and outputs[0][1] is not None:
        counts["classes of the logits output"] = outputs[0][1]
    if len(set(counts.values())) != 1 or counts["class_names"] < 1:
        raise ValueError(", ".join(f"{n} {k}" for k, n in counts.items()) + " do not fit together")
    if info.num_select < 1:
        raise ValueError(f"num_select must be >= 1, got {info.num_select}")
    check_resize(int(meta["size"]), None)  # each side in range; the exported eval_size may exceed max_size
    check_resize(None, int(meta["max_size"]))


def fit_input(path: Path, images: Tensor, mask: Tensor, orig_sizes: Tensor, fixed_hw: tuple[int, int] | None,
              fixed_batch: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Pad a batch to the model's fixed input size and batch size, if it has them."""
    if fixed_hw is not None:
        (h, w), (fh, fw) = images.shape[-2:], fixed_hw
        if h > fh or w > fw:
            raise ConfigError(f"{path} takes images of at most {fh}x{fw} (HxW) after resizing, got "
                              f"{h}x{w}; export with --dynamic or a larger --input-size, or lower --size")
        images, mask = pad_to_size(images, mask, fh, fw)
    if fixed_batch is not None:
        images, mask, orig_sizes = repeat_to_batch(fixed_batch, images, mask, orig_sizes)
    return images.contiguous(), mask.contiguous(), orig_sizes.contiguous()


def to_detections(outputs: Sequence[Any], n: int, orig_sizes: Tensor, with_postprocess: bool,
                  num_select: int) -> Detections:
    """The first ``n`` images' detections from the graph's outputs (numpy arrays, in output order)."""
    outs = [torch.from_numpy(np.asarray(o)) for o in outputs]
    if with_postprocess:
        scores, labels, boxes = outs
        return Detections(scores[:n].float(), labels[:n].long(), boxes[:n].float())
    logits, boxes = outs
    return postprocess(logits[:n].float(), boxes[:n].float(), orig_sizes[:n], num_select)
