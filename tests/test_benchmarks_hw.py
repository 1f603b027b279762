"""benchmarks/_hw.py: the one CPU-naming helper of the benchmark scripts, which import it as
``from _hw import cpu_name`` when run as ``python benchmarks/x.py`` (from any working directory)."""
from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"


def test_cpu_name_is_the_cpuinfo_model_name() -> None:
    name = runpy.run_path(str(BENCHMARKS / "_hw.py"))["cpu_name"]()
    cpuinfo = Path("/proc/cpuinfo")
    models = ([ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
              if cpuinfo.is_file() else [])
    assert isinstance(name, str) and name
    if models:
        assert name == models[0]


def test_a_benchmark_script_finds_the_helper_from_another_folder(tmp_path: Path) -> None:
    pytest.importorskip("httpx")  # serve_load.py's only import beyond the standard library
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "serve_load.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: serve_load.py")
