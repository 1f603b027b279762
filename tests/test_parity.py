"""The official parity contract: ``check_parity.py`` must report 17/17 on every shared fixture."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NO_SHARED_REFERENCE, SHARED_REFERENCE

ROOT = Path(__file__).resolve().parents[1]
REF = SHARED_REFERENCE  # ../shared/reference (or $DINODET_REFERENCE_DIR): too large to vendor
FIXTURES = sorted(p.name for p in REF.glob("fixture_*.pt") if not p.name.endswith(".debug.pt")) if REF.exists() else []
SUPPORTED = ("fixture_4scale", "fixture_5scale", "fixture_swinl_4scale", "fixture_swinl_5scale")


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("fixture", [f for f in FIXTURES if f.startswith(SUPPORTED)] or ["<none>"])
def test_check_parity(fixture, tmp_path):
    if fixture == "<none>":
        pytest.skip(NO_SHARED_REFERENCE)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(REF / "check_parity.py"), str(REF / fixture), "--keep", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "17/17 checks hold" in proc.stdout
