"""Shared fixtures: the coco128 sample images and a tiny randomly initialised detector/checkpoint.

Inference tests run the ``tiny`` preset at a reduced resolution (short side 160) so the whole suite
stays fast on a 2-core CPU (at the official 800/1333 one tiny-model forward takes seconds there);
the resize rule itself is tested at 800/1333 in test_transforms.py.
"""
from __future__ import annotations

import contextlib
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# shared/ sits next to the repository (../shared), in development and in CI alike.
COCO128 = REPO_ROOT.parent / "shared" / "data" / "coco128"
COCO128_IMAGES = COCO128 / "images" / "train2017"
SAMPLE_NAMES = ("000000000009.jpg", "000000000086.jpg", "000000000030.jpg")  # (w x h) 640x480, 512x640 grey, 640x428
TEST_SIZE, TEST_MAX_SIZE = 160, 256


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    """Three coco128 images (one of them greyscale)."""
    paths = [COCO128_IMAGES / n for n in SAMPLE_NAMES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.fail(f"coco128 sample images not found (expected ../shared next to the repo): {missing}")
    return paths


@pytest.fixture
def image_dir(tmp_path: Path, sample_images: list[Path]) -> Path:
    """A folder with the three sample images, a corrupt 'broken.jpg' and a non-image text file."""
    d = tmp_path / "images"
    d.mkdir()
    for p in sample_images:
        shutil.copy(p, d / p.name)
    (d / "broken.jpg").write_bytes(b"this is not a JPEG")
    (d / "notes.txt").write_text("not an image, must be ignored")
    return d


@pytest.fixture(scope="session")
def size_args() -> list[str]:
    """CLI arguments giving the reduced test resolution."""
    return ["--size", str(TEST_SIZE), "--max-size", str(TEST_MAX_SIZE)]


@pytest.fixture(scope="session")
def tiny_detector():
    from dinodet.inference.detector import Detector

    return Detector.from_random("tiny", size=TEST_SIZE, max_size=TEST_MAX_SIZE, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_detector) -> Path:
    """The tiny_detector's weights saved as a dinodet checkpoint."""
    from dinodet.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, tiny_detector.model, tiny_detector.config)
    return path


@pytest.fixture(scope="session")
def sample_predictions(tiny_detector, sample_images: list[Path]):
    """tiny_detector's predictions (threshold 0) for the three sample images, computed once."""
    return tiny_detector.predict(sample_images, threshold=0.0)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads can be ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Ops that make the host wait for the device: reading a value (.item(), `if tensor`, float(tensor)),
# data-dependent shapes (nonzero, masked_select, indexing with a boolean mask: counted as
# "boolean_index", since on CPU aten.index does that nonzero internally).  Integer indexing is fine.
HOST_SYNC_OPS = frozenset({"_local_scalar_dense", "item", "nonzero", "masked_select", "boolean_index"})


@contextlib.contextmanager
def dispatched_ops() -> Iterator[Counter]:
    """Counts the aten ops (overload names stripped) dispatched inside the block; on CPU it shows
    which ops would wait for the device on a GPU."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            counts[name] += 1
            if name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
                    getattr(i, "dtype", None) == torch.bool for i in args[1]):
                counts["boolean_index"] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        yield counts
