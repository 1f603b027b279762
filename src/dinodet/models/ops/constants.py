"""Small per-shape constants (level sizes, level starts, normalisers) as device tensors, cached.

Building such a tensor from Python numbers on every call is a host-to-device copy, and a blocking
copy makes the host wait until the GPU has drained its queue: in an eager forward that happens once
per attention layer.  They depend only on the feature-map sizes, so each is built once per
(values, dtype, device).
"""
from __future__ import annotations

import torch
from torch import Tensor

_CACHE: dict[tuple, Tensor] = {}
_MAX_ENTRIES = 256  # many image sizes (multi-scale training): bounded; entries are a few bytes each


def device_constant(values: tuple, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``torch.tensor(values, dtype, device)`` for a (nested) tuple of Python numbers, built once and
    reused; callers must not modify it in place.  Under ``torch.compile``, or when a value is a
    symbolic size (an export with dynamic shapes), it is a fresh tensor built in the trace."""
    device = torch.device(device)
    if torch.compiler.is_compiling() or not _plain(values):  # symbolic sizes of a trace: no caching
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, dtype, device)
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) >= _MAX_ENTRIES:
            _CACHE.clear()
        # a normal tensor even when first asked for under inference_mode: an inference tensor could
        # not be used by a later forward that records gradients
        with torch.inference_mode(False):
            hit = _CACHE[key] = torch.tensor(values, dtype=dtype, device=device)
    return hit


def _plain(values: tuple) -> bool:
    """Only Python numbers (no SymInt from a trace with dynamic shapes), at any nesting depth."""
    return all(_plain(v) if isinstance(v, tuple) else type(v) in (int, float, bool) for v in values)
