"""Batching detection samples: padding collate and a reproducible DataLoader builder."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..targets import Target
from .transforms import pad_batch

Batch = tuple[Tensor, Tensor, list[Target]]


def collate(batch: list[tuple[Tensor, Target] | None]) -> Batch | None:
    """Pad a list of samples into one batch, dropping unreadable items (``None``).

    Args:
        batch: samples ``(image [3, Hi, Wi], target)`` or ``None``.
    Returns:
        ``(images [B, 3, maxH, maxW], mask [B, maxH, maxW] bool True on padding, targets)`` with
        B <= len(batch), or ``None`` when every item was unreadable (the caller skips the step).
    """
    items = [b for b in batch if b is not None]
    if not items:
        return None
    images, mask = pad_batch([im for im, _ in items])
    return images, mask, [t for _, t in items]


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs per worker from torch's (which DataLoader seeds from its generator).

    The transforms only use torch's RNG; this keeps any other randomness in user code reproducible
    and different between workers too.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int = 0,
                 sampler: Sampler[Any] | None = None, seed: int = 0, drop_last: bool = False,
                 pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset`` yielding ``collate`` batches (``None`` for all-bad batches).

    Shuffling (``train`` without a ``sampler``) and the per-worker augmentation seeds come from a
    generator seeded with ``seed``, so two runs with the same seed see the same batches; each epoch
    still gets a new order because the generator advances.  With a ``sampler`` (e.g. a
    ``DistributedSampler``; call its ``set_epoch`` every epoch) the sampler decides the order.
    With ``num_workers=0`` augmentation draws from the global torch RNG (seed it with
    ``torch.manual_seed``).  ``pin_memory`` (for a CUDA device) puts batches in page-locked memory, so
    their copies to the GPU (``non_blocking=True``) do not make the host wait.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=bool(train) and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
