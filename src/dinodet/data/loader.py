"""Batching detection samples: padding collate, a reproducible DataLoader builder and repeat-factor
sampling of rare classes."""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

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


# ------------------------------------------------------------------------------ repeat factors


def image_classes(dataset: Any) -> list[np.ndarray]:
    """The training classes in each image of a ``coco.DetectionDataset`` (from its index; no image is read)."""
    index = dataset.index
    return [np.unique(index.labels[index.offsets[i]:index.offsets[i + 1]]) for i in range(len(index.offsets) - 1)]


def repeat_factors(classes_per_image: Sequence[Sequence[int]], threshold: float) -> np.ndarray:
    """LVIS's repeat factors (Gupta et al. 2019; detectron2's ``RepeatFactorTrainingSampler``).

    With f(c) the fraction of the training images that hold class c, the class factor is
    r(c) = max(1, sqrt(threshold / f(c))) and an image's factor the largest of its classes' (1 for
    an image without boxes): an image with a class rarer than ``threshold`` is seen more often.

    Returns:
        float64 [N], one factor >= 1 per image (all 1 when ``threshold`` <= 0).
    """
    n = len(classes_per_image)
    if threshold <= 0 or n == 0:
        return np.ones(n)
    counts: dict[int, int] = {}
    for classes in classes_per_image:
        for c in {int(c) for c in classes}:
            counts[c] = counts.get(c, 0) + 1
    class_factor = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return np.asarray([max((class_factor[int(c)] for c in classes), default=1.0) for classes in classes_per_image])


class RepeatFactorSampler(DistributedSampler):
    """A ``DistributedSampler`` that shows image i ``factors[i]`` times per epoch on average.

    Each epoch (a generator seeded with ``seed + epoch``, so every process draws the same) image i
    is repeated floor(r_i) times plus once more with probability frac(r_i) (stochastic rounding),
    the list shuffled and cut or cycled to the fixed epoch length round(sum r), then padded to a
    multiple of the process count and split between the processes as ``DistributedSampler``
    splits its indices.  A fixed length keeps the schedule and the resume position in batches
    exact; the cut moves each image's expected count by at most (len - round(sum r)) / len.
    """

    def __init__(self, dataset: Dataset, factors: Sequence[float] | np.ndarray, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, **_: Any):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.factors = torch.as_tensor(np.asarray(factors, dtype=np.float64))
        if len(self.factors) != len(dataset) or bool((self.factors < 1).any()):  # type: ignore[arg-type]
            raise ValueError("repeat factors: one factor >= 1 per image")
        self.epoch_length = max(1, round(float(self.factors.sum())))
        self.num_samples = math.ceil(self.epoch_length / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def epoch_indices(self) -> torch.Tensor:
        """The whole epoch's image indices (every process's), int64 [epoch_length]."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        whole = self.factors.floor()
        reps = (whole + (torch.rand(len(self.factors), generator=g, dtype=torch.float64)
                         < self.factors - whole)).long()
        indices = torch.repeat_interleave(torch.arange(len(self.factors)), reps)
        indices = indices[torch.randperm(len(indices), generator=g)]
        return indices.repeat(math.ceil(self.epoch_length / len(indices)))[:self.epoch_length]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices().tolist()
        indices += indices[:self.total_size - len(indices)]  # pad to a multiple of the process count
        return iter(indices[self.rank:self.total_size:self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
