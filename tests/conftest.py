"""Shared fixtures: the vendored test data, the sample images and a tiny randomly initialised detector.

The small data the suite reads is vendored in ``tests/data`` (see its README): 12 coco128 photos with
their COCO and YOLO labels (``coco128_mini``) and the official key listings / configs (``official``).
Only the large official parity fixtures stay outside the repository, in ``../shared/reference``: the
tests that need them skip with ``NO_SHARED_REFERENCE`` as their reason where it is absent, and fail
instead of skipping when ``CI`` or ``DINODET_REQUIRE_SHARED=1`` is set (CI has ``../shared``).

Inference tests run the ``tiny`` preset at a reduced resolution (short side 160) so the whole suite
stays fast on a 2-core CPU (at the official 800/1333 one tiny-model forward takes seconds there);
the resize rule itself is tested at 800/1333 in test_transforms.py.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = REPO_ROOT / "tests" / "data"
# 12 of coco128's images (the first 8, the greyscale 86, 149 and 357 with crowd boxes, 250 without boxes)
COCO128 = TEST_DATA / "coco128_mini"
COCO128_IMAGES = COCO128 / "images" / "train2017"
# DINO_*.keys.tsv (the official state-dict keys) and DINO_*.args.json (the official configs)
OFFICIAL = TEST_DATA / "official"
# the official parity fixtures (tens of MB, not vendored): ../shared/reference next to the repository
SHARED_REFERENCE = Path(os.environ.get("DINODET_REFERENCE_DIR") or REPO_ROOT.parent / "shared" / "reference")
NO_SHARED_REFERENCE = f"official parity fixtures not found in {SHARED_REFERENCE} (../shared is not part of this repository)"
SAMPLE_NAMES = ("000000000009.jpg", "000000000086.jpg", "000000000030.jpg")  # (w x h) 640x480, 512x640 grey, 640x428
TEST_SIZE, TEST_MAX_SIZE = 160, 256


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    """Three coco128 images (one of them greyscale)."""
    paths = [COCO128_IMAGES / n for n in SAMPLE_NAMES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        pytest.fail(f"vendored sample images not found (tests/data): {missing}")
    return paths


NO_CHROMIUM = "no chromium for the browser test"


def shared_reference_required() -> bool:
    """True in CI (``CI`` set, as CI services do) or with ``DINODET_REQUIRE_SHARED=1``: there the parity
    fixtures must be present, and a test skipped for their absence fails instead."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or os.environ.get("DINODET_REQUIRE_SHARED", "").strip() == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and NO_SHARED_REFERENCE in str(report.longrepr) and shared_reference_required():
        report.outcome = "failed"
        report.longrepr = (f"{NO_SHARED_REFERENCE}; this run requires them (CI or DINODET_REQUIRE_SHARED=1 is set), "
                           "so the test fails instead of skipping")
    # CI's test command installs Debian's chromium: there the browser test must run, not skip
    if report.skipped and NO_CHROMIUM in str(report.longrepr) and shared_reference_required():
        report.outcome = "failed"
        report.longrepr = f"{NO_CHROMIUM}; CI installs it (the README's test command), so the test fails instead"
    if report.when == "call":
        item.stash[_CALL_PASSED] = report.passed


# A passed test's large files in its tmp_path (checkpoints, exported models, parity weights: GBs over the
# suite) are deleted when it ends; its small files (logs, metrics, pictures) and a failed test's all stay
LARGE_FILE = 1 << 20  # bytes
_CALL_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    yield  # after the test's fixtures are torn down: none of them needs its files any more
    if isinstance(tmp, Path) and item.stash.get(_CALL_PASSED, False):
        remove_large_files(tmp)


@pytest.fixture(scope="session", autouse=True)
def _large_files_removed_after_a_passed_session(request: pytest.FixtureRequest,
                                               tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The same for the module and session fixtures' folders (tmp_path_factory), once every test passed."""
    yield
    if request.session.testsfailed == 0:
        remove_large_files(tmp_path_factory.getbasetemp())


def remove_large_files(folder: Path, limit: int = LARGE_FILE) -> int:
    """Delete the files of at least ``limit`` bytes under ``folder`` (links left alone); returns the bytes freed."""
    freed = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):  # e.g. removed meanwhile
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_size >= limit:
                path.unlink()
                freed += info.st_size
    return freed


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


def same_records(a: list[dict], b: list[dict], backend: str = "the other backend") -> None:
    """Two predictions.json record lists hold the same detections (any order among near-equal scores): labels equal, boxes within 1e-3 relative
    (+ the 0.01 px rounding of predictions.json), scores within 1e-4."""
    assert len(a) == len(b) and a
    unused = list(b)
    for r in a:
        for i, s in enumerate(unused):
            if (s["file_name"] == r["file_name"] and s["category_id"] == r["category_id"]
                    and abs(s["score"] - r["score"]) <= 1e-4
                    and all(abs(x - y) <= 1e-3 * abs(x) + 0.011 for x, y in zip(r["bbox"], s["bbox"]))):
                del unused[i]
                break
        else:
            raise AssertionError(f"no {backend} detection matches {r}")


def one_line_export_error(capsys: pytest.CaptureFixture[str], *fragments: str) -> None:
    """The CLI said exactly one ``dinodet: error:`` line (besides warnings and the export's progress
    note), holding every fragment."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dinodet:")
             and not ln.startswith("dinodet: warning:") and not ln.startswith("dinodet: exporting")]
    assert len(lines) == 1 and lines[0].startswith("dinodet: error: "), lines
    for f in fragments:
        assert f in lines[0], lines
