"""Inference modes: the exact float32 path and the fast ones, and what each of them changes.

A mode is a small recipe applied to a built model: whether its deformable attentions must use one
MSDA backend (only ``reference`` forces one; the others run the model config's ``model.msda_backend``,
resolved for the device by ``configure_msda``), whether it runs under bf16/fp16 autocast, whether
weights and activations are channels_last (oneDNN / cuDNN pick faster convolution kernels for that
layout) and whether it goes through ``torch.compile``.  ``reference`` is the official numerics
(float32, PyTorch grid_sample MSDA); ``exact`` is float32 with the configured MSDA backend (``auto``:
the fastest for the device, within the parity tolerances); the others trade precision for speed and
are checked by their detections agreeing with ``exact``.

Compiled models see a few padded sizes only: ``compile`` pads every batch up to a multiple of
``COMPILE_BUCKET`` pixels (the padding mask keeps the detections those of the unpadded image up to
the backbone's view of the border).  The first bucket compiles a graph specialised to its shape (the
fastest kernels for a single-size stream); the first images of a new width and then of a new height
recompile it with that side symbolic (torch's automatic dynamic shapes), after which every size runs
the one dynamic graph: a mixed-size dataset costs at most three compilations, never one per size.
The batch size is kept too: a batch smaller than the largest one seen so far (the last, partial
batch of a dataset) is padded with copies of its last image, because a new batch size would
compile again (twice for a batch of one, a size torch always specialises).
On CUDA the compiled modes also replay CUDA graphs (``torch.compile(mode="reduce-overhead")``): at
batch 1 DINO launches about two thousand small kernels per image, and a graph replay removes their
launch cost.  Outputs of a replay live in the graph's own buffers, so the runner hands back copies.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..models.attention import configure_msda
from ..models.outputs import DINOOutput

COMPILE_BUCKET = 64  # pixels; padded sizes per side under ``compile`` (800x1199 -> 832x1216: +5.5% pixels)


@dataclass(frozen=True)
class InferenceMode:
    """One inference mode (``MODES``): autocast dtype, MSDA kernel, memory format, compilation."""

    name: str
    amp: str = "off"  # off | bf16 | fp16
    msda_backend: str | None = None  # forced MSDA backend; None: the model config's
    channels_last: bool = False
    compile: bool = False
    description: str = ""


MODES: dict[str, InferenceMode] = {
    m.name: m
    for m in (
        InferenceMode("reference", msda_backend="pytorch", description="float32, PyTorch grid_sample MSDA (parity path)"),
        InferenceMode("exact", description="float32, the configured MSDA kernel (auto: fastest for the device)"),
        InferenceMode("channels_last", channels_last=True, description="float32, channels_last convolutions"),
        InferenceMode("bf16", amp="bf16", channels_last=True, description="bf16 autocast, channels_last"),
        InferenceMode("fp16", amp="fp16", channels_last=True, description="fp16 autocast, channels_last (CUDA)"),
        InferenceMode("compile", channels_last=True, compile=True,
                      description="float32 + torch.compile, inputs padded to 64-pixel buckets"),
        InferenceMode("compile_bf16", amp="bf16", channels_last=True, compile=True,
                      description="bf16 autocast + torch.compile, 64-pixel buckets, CUDA graphs (CUDA)"),
    )
}
_CUDA_ONLY = ("fp16", "compile_bf16")


def get_mode(name: str) -> InferenceMode:
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError(f"unknown inference mode '{name}' (available: {', '.join(MODES)})") from None


def supported_modes(device: torch.device | str) -> list[str]:
    """Modes offered on ``device``.  fp16 and compiled bf16 are CUDA-only: CPUs without native half
    arithmetic emulate it (on the 2-core AMD EPYC dev machine, with AVX2 and no AVX-512/BF16, bf16
    autocast is 3-4x slower than float32; ``bf16`` stays available there to show that)."""
    device = torch.device(device)
    return [n for n in MODES if device.type == "cuda" or n not in _CUDA_ONLY]


def check_mode(mode: InferenceMode | str, device: torch.device | str, emulate: bool = False) -> InferenceMode:
    """The mode named ``mode``; ConfigError when it is unknown or not offered on ``device``.

    ``emulate=True`` lets a CUDA-only mode run on the CPU anyway (slowly: emulated half arithmetic),
    for measuring its numerics on a machine without a GPU (``benchmarks/mode_agreement.py --emulate``).
    """
    found = get_mode(mode) if isinstance(mode, str) else mode
    device = torch.device(device)
    if found.name not in supported_modes(device) and not (emulate and found.name in MODES):
        raise ConfigError(f"inference mode '{found.name}' is not available on {device.type} "
                         f"(available: {', '.join(supported_modes(device))})")
    return found


_AMP_DTYPES = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(amp: str) -> torch.dtype:
    """The dtype ``amp`` in {"off", "bf16", "fp16"} computes in."""
    if amp not in _AMP_DTYPES:
        raise ValueError(f"amp must be one of off, bf16, fp16; got '{amp}'")
    return _AMP_DTYPES[amp]


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """torch.autocast for ``amp`` in {"off", "bf16", "fp16"} (a null context for "off")."""
    dtype = compute_dtype(amp)
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def repeat_to_batch(size: int, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Fill each [B, ...] tensor up to ``size`` entries with copies of its last one, for a model
    that takes a fixed batch size (their results are dropped); tensors already that large are
    returned as they are."""
    extra = size - tensors[0].shape[0]
    if extra <= 0:
        return tensors
    return tuple(torch.cat([t, t[-1:].expand(extra, *t.shape[1:])]) for t in tensors)


def pad_to_size(images: Tensor, mask: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Zero-pad images [B, 3, H, W] on the bottom/right to [B, 3, height, width], marking the
    padding True in mask [B, H, W] (as the batch collation does)."""
    ph, pw = height - images.shape[-2], width - images.shape[-1]
    if ph == 0 and pw == 0:
        return images, mask
    return F.pad(images, (0, pw, 0, ph)), F.pad(mask, (0, pw, 0, ph), value=True)


def pad_to_bucket(images: Tensor, mask: Tensor, bucket: int = COMPILE_BUCKET) -> tuple[Tensor, Tensor]:
    """``pad_to_size`` up to the next multiples of ``bucket`` (few shapes for a compiled model)."""
    h, w = images.shape[-2:]
    return pad_to_size(images, mask, h + -h % bucket, w + -w % bucket)


class ModeRunner(nn.Module):
    """``runner(images [B, 3, H, W], mask [B, H, W]) -> DINOOutput`` for one inference mode.

    By default the runner works on a copy of the model, because the mode changes it (MSDA backend,
    memory format, compilation) and the caller's model should stay as it was; ``copy_model=False``
    adapts ``model`` itself (for owners of the model such as ``Detector``).  Being a module, it can
    stand in for the model wherever one is evaluated.  ``emulate``: see ``check_mode``.  ``dynamic``
    is ``torch.compile``'s: None (static first, dynamic sides after a new size; see above), False
    (one static graph per bucket shape, up to torch's recompile limit of 8) or True.  Compiled modes
    pad a batch smaller than the largest seen (see above); use a new runner for a smaller batch size
    that will persist (a stream of single images after a batched pass).  ``msda_backend``: the MSDA
    backend that runs (the mode's forced one, else the model config's, resolved for the device).
    """

    def __init__(self, model: nn.Module, mode: InferenceMode | str, device: torch.device | str,
                 copy_model: bool = True, emulate: bool = False, dynamic: bool | None = None):
        super().__init__()
        self.mode = check_mode(mode, device, emulate=emulate)
        self.device = torch.device(device)
        model = (copy.deepcopy(model) if copy_model else model).to(self.device).eval()
        self.msda_backend = configure_msda(model, self.device, compute_dtype(self.mode.amp),
                                           override=self.mode.msda_backend)
        if self.mode.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.cuda_graphs = self.mode.compile and self.device.type == "cuda"
        forward: Callable[[Tensor, Tensor], DINOOutput] = model
        if self.mode.compile:
            forward = torch.compile(model, dynamic=dynamic, mode="reduce-overhead" if self.cuda_graphs else None)
        # kept out of the module tree (a tuple), so the compiled wrapper's parameters are not listed twice
        self._forward = (forward,)
        self.batch_size = 0  # compiled modes: the largest batch seen, to which smaller ones are padded

    def forward(self, images: Tensor, mask: Tensor) -> DINOOutput:
        with torch.inference_mode():
            images, mask = images.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
            n = images.shape[0]
            if self.mode.compile:
                self.batch_size = max(self.batch_size, n)
                images, mask = repeat_to_batch(self.batch_size, *pad_to_bucket(images, mask))
            if self.mode.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.mode.amp):
                if self.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out = self._forward[0](images, mask)
            if images.shape[0] > n:
                out = out.first_images(n)
            if not self.cuda_graphs:
                return out
            # the graph's output buffers are overwritten by its next replay: hand back copies
            return dataclasses.replace(out, **{f.name: getattr(out, f.name).clone() for f in dataclasses.fields(out)
                                               if isinstance(getattr(out, f.name), Tensor)})
