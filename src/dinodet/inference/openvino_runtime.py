"""Run an exported dinodet model with OpenVINO on the CPU: ``OpenVinoDetector(path).predict(images)``.

Reads an OpenVINO IR (``.xml`` + ``.bin`` from ``dinodet export --format openvino``; the metadata in
its rt_info section ``dinodet``) or an ONNX export directly (OpenVINO's ONNX reader puts the file's
metadata in rt_info ``framework``).  The metadata is checked by the same ``read_metadata`` as the
onnxruntime backend, and pre/post-processing and ``Prediction`` objects are ``Detector.predict``'s.

What is compiled when: a fixed-shape model is compiled once, when it is loaded.  A dynamic model is
compiled for each new input shape (batch, height, width) on first use, up to ``static_shapes``
shapes (static shapes run ~1.5x faster than OpenVINO's dynamic-shape kernels); any further shape
runs one dynamic-shape compilation of the model, so any image size runs without re-export.
Arithmetic stays float32 (``INFERENCE_PRECISION_HINT``), also on CPUs whose default is bfloat16, so
the detections are the PyTorch model's; an int8 IR (``dinodet export --int8``) runs its quantised
layers in int8 and the rest in float32.

Threads and caching: ``INFERENCE_NUM_THREADS`` = ``torch.get_num_threads()`` (one knob for every
backend, OMP_NUM_THREADS) with the ``LATENCY`` performance hint (one stream: all threads on one image,
which is what a batch-1 detector needs; ``THROUGHPUT`` would split them over parallel requests).
OpenVINO's compiled-model cache is off unless asked for (``cache_dir``, or the folder named by
``$DINODET_OPENVINO_CACHE``): then a second load of the same model (and shape) reads the compiled blob
instead of compiling.  Off by default because, with OpenVINO 2026.4, writing and reading those blobs in
a process corrupted its heap: our test suite crashed (SIGSEGV) minutes later in unrelated code in 3 runs
out of 3, and ran clean in 2 of 2 with only that use of the cache left out.  A compilation costs ~2-10 s
for DINO R50, so the default costs little.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.transforms import check_resize
from ..errors import CheckpointError, ConfigError, first_line
from .onnx_runtime import ExportedModelDetector, read_metadata

log = logging.getLogger(__name__)

RT_INFO_SECTION = "dinodet"  # where ``deploy.export.to_openvino`` writes the metadata in an IR
_ONNX_SECTION = "framework"  # where OpenVINO's ONNX reader puts an ONNX file's metadata properties
STATIC_SHAPES = 3  # input shapes of a dynamic model that get their own (faster) static compilation
CACHE_ENV = "DINODET_OPENVINO_CACHE"  # a folder turns the compiled-model cache on (see the module docstring)


def default_cache_dir() -> Path | None:
    """The compiled-model cache folder: ``$DINODET_OPENVINO_CACHE`` when set and not empty, else None
    (no cache; see the module docstring for why that is the default)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env) if env else None


def require_openvino() -> Any:
    """The ``openvino`` module, or a one-line ConfigError naming the extra to install."""
    try:
        import openvino
    except ImportError:
        raise ConfigError("the openvino backend needs the 'openvino' package: pip install 'dinodet[openvino]'") from None
    return openvino


class OpenVinoDetector(ExportedModelDetector):
    """An exported model compiled by OpenVINO for the CPU, with the ``Detector.predict`` interface.

    Args:
        path: an IR ``.xml`` (its ``.bin`` beside it) or an ``.onnx`` file from ``dinodet export``.
        device: ``cpu`` (the only device this backend runs on for now).
        size, max_size: override the resize recorded at export (short side, cap on the long side).
        num_threads: OpenVINO inference threads (default: ``torch.get_num_threads()``, which follows
            OMP_NUM_THREADS, so every backend uses the same number of cores).
        static_shapes: how many input shapes of a dynamic model get a static compilation (see the
            module docstring); 0 runs every shape with the dynamic one.
        cache_dir: compiled-model cache (default ``default_cache_dir()``); None or "" for none.

    Raises:
        CheckpointError: missing or unreadable file, or not a dinodet export.
        ConfigError: the openvino package is missing, or an unsupported device.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", size: int | None = None,
                 max_size: int | None = None, num_threads: int | None = None, static_shapes: int = STATIC_SHAPES,
                 cache_dir: str | os.PathLike | None = "default"):
        check_resize(size, max_size)  # what is given; the file's own resize is what it was exported with
        ov = require_openvino()
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"OpenVINO model not found: {path}")
        if str(device).split(":")[0] != "cpu":
            raise ConfigError(f"the openvino backend runs on the CPU, not '{device}'")
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(path))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError and its own types
            raise CheckpointError(f"{path}: not a readable OpenVINO IR or ONNX model ({first_line(str(e))})") from None
        meta = rt_metadata(self.model)
        outputs = [(o.get_any_name(), _length(o.get_partial_shape()[-1]) if o.get_partial_shape().rank.is_static
                    else None) for o in self.model.outputs]
        info = read_metadata(path, meta, outputs, size, max_size)
        self._use_metadata(path, info)
        self.input_names = [i.get_any_name() for i in self.model.inputs]
        shape = self.model.input("images").get_partial_shape()  # [B, 3, H, W]
        self.fixed_batch = _length(shape[0])
        h, w = _length(shape[2]), _length(shape[3])
        self.fixed_hw = (h, w) if h is not None and w is not None else None
        self.num_threads = torch.get_num_threads() if num_threads is None else num_threads
        self.static_shapes = static_shapes
        # f32: the CPU plugin's default on bfloat16-capable CPUs is bf16, which changes the detections
        self._config = {"INFERENCE_NUM_THREADS": self.num_threads, "INFERENCE_PRECISION_HINT": "f32",
                        "PERFORMANCE_HINT": "LATENCY"}
        cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
        self.cache_dir = cache
        if cache is not None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                self._config["CACHE_DIR"] = str(cache)
            except OSError as e:  # a read-only home: run, only without the cache
                log.warning("OpenVINO cache folder %s cannot be made (%s); compiling without a cache", cache, e)
                self.cache_dir = None
        # by input shape, or "fixed" (a fixed-shape model) / "dynamic" (the dynamic-shape compilation)
        self._compiled: dict[tuple[int, ...] | str, Any] = {}
        if not self.model.is_dynamic():
            self._compiled["fixed"] = self._compile(self.model)

    @property
    def thread_settings(self) -> str:
        """What runs, for reports: e.g. ``openvino threads=2 hint=LATENCY streams=1 cache=on``."""
        compiled = next(iter(self._compiled.values()), None)
        streams = compiled.get_property("NUM_STREAMS") if compiled is not None else "?"
        return (f"openvino threads={self.num_threads} hint={self._config['PERFORMANCE_HINT']} streams={streams} "
                f"cache={'on' if self.cache_dir else 'off'}")

    def _infer(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        compiled = self._compiled_for(tuple(feed["images"].shape))
        result = compiled(feed)
        # copies: the arrays are the request's output buffers, overwritten by the next batch
        return [np.array(result[o]) for o in compiled.outputs]

    def _compiled_for(self, shape: tuple[int, ...]) -> Any:
        """The compiled model for an input of ``shape``: see the module docstring for which is used."""
        if "fixed" in self._compiled:
            return self._compiled["fixed"]
        if shape not in self._compiled and len(self._compiled) < self.static_shapes:
            model = self.model.clone()
            b, _, h, w = shape
            static = {"images": [b, 3, h, w], "mask": [b, h, w]}
            if "orig_sizes" in self.input_names:
                static["orig_sizes"] = [b, 2]
            model.reshape(static)
            self._compiled[shape] = self._compile(model)
        if shape in self._compiled:
            return self._compiled[shape]
        if "dynamic" not in self._compiled:
            self._compiled["dynamic"] = self._compile(self.model)
        return self._compiled["dynamic"]

    def _compile(self, model: Any) -> Any:
        try:
            return self.core.compile_model(model, "CPU", self._config)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path}: OpenVINO cannot compile the model ({first_line(str(e))})") from None


def rt_metadata(model: Any) -> dict[str, str]:
    """The dinodet metadata properties of a model read by OpenVINO (an IR's own section, else the
    ONNX file's properties); empty when there are none."""
    for section in (RT_INFO_SECTION, _ONNX_SECTION):
        if model.has_rt_info([section]):
            value = model.get_rt_info([section]).value
            if isinstance(value, dict):
                return {str(k): str(v) for k, v in value.items()}
    return {}


def _length(dim: Any) -> int | None:
    """A static dimension's length, None for a dynamic one."""
    return dim.get_length() if dim.is_static else None
