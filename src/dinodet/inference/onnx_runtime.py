"""Run an exported dinodet ONNX model with onnxruntime: ``OnnxDetector(path).predict(images)``.

Same preprocessing, post-processing and ``Prediction`` objects as ``dinodet.inference.detector.Detector``, so
``dinodet predict --backend onnxruntime --model model.onnx`` writes the same predictions.json as the
PyTorch backend.  The label map, the top-k size and the expected resize come from the file's
metadata (written by ``dinodet.deploy.export.to_onnx``); PyTorch is used only for the preprocessing.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

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


class OnnxDetector:
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
        options.intra_op_num_threads = torch.get_num_threads() if num_threads is None else num_threads
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[_PROVIDERS[kind]])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise CheckpointError(f"{path}: not a readable ONNX model ({first_line(str(e))})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != METADATA_FORMAT:
            raise CheckpointError(f"{path}: not a dinodet ONNX export (no '{METADATA_FORMAT}' metadata)")
        self.path = path
        self.metadata = dict(meta)
        try:  # the file is untrusted input: incomplete or malformed metadata is one clear error
            self.preset = meta["preset"]
            self.class_names: list[str] = json.loads(meta["class_names"])
            self._category_ids = torch.tensor(json.loads(meta["category_ids"]), dtype=torch.int64)
            self.num_select = int(meta["num_select"])
            self.with_postprocess = json.loads(meta["with_postprocess"])
            self.size = int(meta["size"]) if size is None else size
            self.max_size = int(meta["max_size"]) if max_size is None else max_size
            self._check_metadata(meta)
        except KeyError as e:
            raise CheckpointError(f"{path}: dinodet metadata without {e}") from None
        except (ValueError, TypeError, OverflowError) as e:  # ConfigError too: a size out of range
            raise CheckpointError(f"{path}: invalid dinodet metadata ({first_line(str(e))})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        shape = self.session.get_inputs()[0].shape  # [B, 3, H, W]; ints where fixed
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.fixed_hw = (shape[2], shape[3]) if isinstance(shape[2], int) and isinstance(shape[3], int) else None

    def _check_metadata(self, meta: dict[str, str]) -> None:
        """ValueError unless the label map, top-k size and resize fit together and fit the graph's
        outputs: a label map shorter than the class count would fail on the first detection of a
        missing class, deep in a run, instead of here."""
        outputs = self.session.get_outputs()
        expected = "scores, labels, boxes" if self.with_postprocess else "logits, boxes"
        if not isinstance(self.with_postprocess, bool):
            raise ValueError(f"with_postprocess must be true or false, got {meta['with_postprocess']}")
        if len(outputs) != len(expected.split(", ")):
            raise ValueError(f"with_postprocess={meta['with_postprocess']} needs the outputs {expected}, but the "
                             f"model has {', '.join(o.name for o in outputs)}")
        if not isinstance(self.class_names, list) or not all(isinstance(n, str) for n in self.class_names):
            raise ValueError("class_names must be a list of names")
        if self._category_ids.ndim != 1:
            raise ValueError("category_ids must be a list of integers")
        counts = {"class_names": len(self.class_names), "category_ids": len(self._category_ids)}
        if "num_classes" in meta:
            counts["num_classes"] = int(meta["num_classes"])
        logits_shape = [] if self.with_postprocess else outputs[0].shape or []
        if logits_shape and isinstance(logits_shape[-1], int):
            counts["classes of the logits output"] = logits_shape[-1]
        if len(set(counts.values())) != 1 or counts["class_names"] < 1:
            raise ValueError(", ".join(f"{n} {k}" for k, n in counts.items()) + " do not fit together")
        if self.num_select < 1:
            raise ValueError(f"num_select must be >= 1, got {self.num_select}")
        check_resize(int(meta["size"]), None)  # each side in range; the exported eval_size may exceed max_size
        check_resize(None, int(meta["max_size"]))

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
        images, mask, orig_sizes = self._fit(images, mask, orig_sizes)
        feed = {"images": images.numpy(), "mask": mask.numpy()}
        if "orig_sizes" in self.input_names:
            feed["orig_sizes"] = orig_sizes.numpy()
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feed)]
        if self.with_postprocess:
            scores, labels, boxes = outs
            return Detections(scores[:n].float(), labels[:n].long(), boxes[:n].float())
        logits, boxes = outs
        return postprocess(logits[:n].float(), boxes[:n].float(), orig_sizes[:n], self.num_select)

    def _fit(self, images: Tensor, mask: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pad a batch to the model's fixed input size and batch size, if it has them."""
        if self.fixed_hw is not None:
            (h, w), (fh, fw) = images.shape[-2:], self.fixed_hw
            if h > fh or w > fw:
                raise ConfigError(f"{self.path} takes images of at most {fh}x{fw} (HxW) after resizing, got "
                                  f"{h}x{w}; export with --dynamic or a larger --input-size, or lower --size")
            images, mask = pad_to_size(images, mask, fh, fw)
        if self.fixed_batch is not None:
            images, mask, orig_sizes = repeat_to_batch(self.fixed_batch, images, mask, orig_sizes)
        return images.contiguous(), mask.contiguous(), orig_sizes.contiguous()
