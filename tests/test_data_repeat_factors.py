"""Repeat-factor sampling (LVIS rule r(c) = max(1, sqrt(t / f(c))), image factor = max over its
classes): the factors of a hand-made dataset, the sampler's stochastic rounding, its fixed epoch
length and its split between processes."""
from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import COCO128

from dinodet.data.coco import build_dataset
from dinodet.data.loader import RepeatFactorSampler, image_classes, repeat_factors
from dinodet.engine.train import ResumableRepeatFactorSampler, ResumableSampler, build_train_sampler

A, B = 0, 1
# class A in 9 of 10 images (f = 0.9), class B in 1 (f = 0.1), one image without boxes
IMAGES = [[A]] * 8 + [[]] + [[B, A, A]]


def test_factors_of_a_hand_made_dataset() -> None:
    assert repeat_factors(IMAGES, 0.0).tolist() == [1.0] * 10  # off
    assert repeat_factors(IMAGES, 0.4).tolist() == [1.0] * 9 + [2.0]  # r(B) = sqrt(0.4 / 0.1)
    assert repeat_factors(IMAGES, 0.9).tolist() == [1.0] * 9 + [3.0]
    f = repeat_factors(IMAGES, 1.6)  # r(A) = sqrt(1.6 / 0.9) > 1 too; the empty image stays 1
    assert f[:8] == pytest.approx([math.sqrt(1.6 / 0.9)] * 8) and f[8] == 1.0 and f[9] == pytest.approx(4.0)


class _Sized:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def test_sampler_rounds_stochastically_to_a_fixed_epoch_length() -> None:
    factors = [1.0] * 9 + [2.5]
    sampler = RepeatFactorSampler(_Sized(10), factors, num_replicas=1, rank=0, seed=3)
    counts = []
    for epoch in range(400):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == 12  # round(11.5)
        assert set(order) == set(range(10))  # every image at least once per epoch
        counts.append(Counter(order)[9])
    # 3 times half of the epochs, else 2 (+ 1/11 of a chance to be the one cycled): 2.59 on average
    assert np.mean(counts) == pytest.approx(2.59, abs=0.12)
    assert set(counts) <= {2, 3, 4}
    sampler.set_epoch(7)
    assert list(sampler) == list(sampler)  # the same epoch draws the same (resume, every process)


def test_sampler_splits_an_epoch_between_processes() -> None:
    factors = [1.0] * 9 + [3.0]  # 12 indices: 4 per process for 3 processes
    ranks = [RepeatFactorSampler(_Sized(10), factors, num_replicas=3, rank=r, seed=0) for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    parts = [list(s) for s in ranks]
    assert [len(p) for p in parts] == [4, 4, 4]
    assert sorted(i for p in parts for i in p) == sorted(ranks[0].epoch_indices().tolist())
    with pytest.raises(ValueError, match="one factor >= 1 per image"):
        RepeatFactorSampler(_Sized(3), [1.0, 0.5, 1.0], num_replicas=1, rank=0)


def test_image_classes_and_the_trainer_sampler() -> None:
    dataset = build_dataset(COCO128, "train", train=False)
    classes = image_classes(dataset)
    for i in range(len(dataset)):
        assert classes[i].tolist() == sorted(set(dataset.raw_target(i)["labels"].tolist()))
    cfg = SimpleNamespace(data=SimpleNamespace(repeat_factor_threshold=0.3), train=SimpleNamespace(seed=0))
    sampler = build_train_sampler(dataset, cfg, 1, 0)
    assert isinstance(sampler, ResumableRepeatFactorSampler)
    assert len(sampler) == round(float(repeat_factors(classes, 0.3).sum())) > len(dataset)
    sampler.set_start(3)  # resuming mid-epoch skips what was seen
    assert len(list(sampler)) == len(sampler) == sampler.num_samples - 3
    cfg.data.repeat_factor_threshold = 0.0
    assert type(build_train_sampler(dataset, cfg, 1, 0)) is ResumableSampler
