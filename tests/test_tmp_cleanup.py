"""The suite's temp-disk hygiene (conftest.py): a passed test's large files in its tmp_path are
deleted when it ends; its small files, and all of a failed test's, stay for a look."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import LARGE_FILE, REPO_ROOT, remove_large_files

INNER = f'''
def _write(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(bytes({LARGE_FILE}))
    (tmp_path / "metrics.json").write_text("{{}}")

def test_passes(tmp_path):
    _write(tmp_path)

def test_fails(tmp_path):
    _write(tmp_path)
    assert False
'''

SHARED = f'''
import pytest

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared") / "model.onnx"
    path.write_bytes(bytes({LARGE_FILE}))
    return path

def test_uses_it(model):
    assert model.stat().st_size == {LARGE_FILE}
'''


def _inner_pytest(folder: Path, base: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           f"--basetemp={base}", "test_inner.py"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def test_remove_large_files_keeps_small_files_and_links(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "big.pt").write_bytes(bytes(LARGE_FILE))
    (tmp_path / "small.json").write_text("{}")
    (tmp_path / "link.pt").symlink_to(tmp_path / "small.json")
    assert remove_large_files(tmp_path) == LARGE_FILE
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["link.pt", "small.json", "sub"]


def test_a_passed_tests_large_files_go_a_failed_ones_stay(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    out = _inner_pytest(tmp_path, tmp_path / "base")
    assert "1 failed, 1 passed" in out, out[-3000:]
    assert (tmp_path / "base" / "test_passes0" / "metrics.json").is_file()
    assert not (tmp_path / "base" / "test_passes0" / "run" / "checkpoint.pt").exists()
    assert (tmp_path / "base" / "test_fails0" / "run" / "checkpoint.pt").stat().st_size == LARGE_FILE


def test_fixture_folders_are_cleaned_once_every_test_passed(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(SHARED)
    out = _inner_pytest(tmp_path, tmp_path / "base")
    assert "1 passed" in out, out[-3000:]
    assert not (tmp_path / "base" / "shared0" / "model.onnx").exists()
    assert (tmp_path / "base" / "shared0").is_dir()
