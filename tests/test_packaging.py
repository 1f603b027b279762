"""The package as users get it: the sdist and wheel build, and the wheel works outside the source tree.

``python -m build`` makes the sdist and, from the unpacked sdist, the wheel (so a file missing from the
sdist breaks the wheel too).  The wheel is installed with ``--no-deps`` into a fresh venv outside the
source tree whose dependencies come from this test venv (a ``.pth`` line naming its site-packages:
torch is not installed twice); from ``/`` that venv's ``dinodet`` then reports its version and predicts
on a vendored photo, and ``import dinodet`` resolves to the wheel, not to ``src/``.  The wheel's
metadata must say what pyproject.toml says, ``all`` must be the union of the feature extras, pip must resolve
the wheel with ``[all]`` from the package index (a dry run), and ``pip check`` must be clean in both venvs.

Marked ``packaging`` (deselect with ``-m 'not packaging'``); it runs by default and in CI (~1 min).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from conftest import COCO128_IMAGES, REPO_ROOT

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(600)]

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# what a copy of the source tree leaves out (a checkout's venv, build outputs, caches, run folders)
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                    ".pytest_cache", ".ruff_cache", "runs", "parity-run", "out")


def _env(**extra: str) -> dict[str, str]:
    """A clean environment: nothing may point Python back at the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return {**env, "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1", **extra}


def _run(cmd: list[str | Path], cwd: Path | str = "/", timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _source_version() -> str:
    init = (REPO_ROOT / "src" / "dinodet" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', init, re.M).group(1)


def _requirements(lines: list[str]) -> set[str]:
    from packaging.requirements import Requirement

    return {str(Requirement(x)) for x in lines}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel, built from a copy of the source tree (the checkout itself is not touched)."""
    pytest.importorskip("build", reason="the 'build' package (in the test extra: pip install -e '.[test]')")
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src-copy"
    shutil.copytree(REPO_ROOT, src, ignore=NOT_SOURCE)
    out = tmp / "dist"
    # --no-isolation: the build requirements (setuptools>=77) come from the test extra, so no download
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], cwd=tmp)
    sdists, wheels = sorted(out.glob("dinodet-*.tar.gz")), sorted(out.glob("dinodet-*-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(out.iterdir())
    return {"sdist": sdists[0], "wheel": wheels[0], "src": src}


@pytest.fixture(scope="module")
def venv(dists: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the source tree with the wheel installed (no deps: they come from this venv).

    Created without pip (whose bundled setuptools would shadow this venv's): pip, like every dependency,
    is this venv's, found through the .pth line, and installs into the new venv (its sys.prefix)."""
    root = tmp_path_factory.mktemp("fresh") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", root])
    python = root / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # appended after the new venv's own site-packages: the wheel's dinodet comes first
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "zz_test_venv_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", dists["wheel"]])
    return root


def test_sdist_holds_the_sources_and_the_license(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        top = tar.getnames()[0].split("/")[0]
        pkg_info = Parser().parsestr(tar.extractfile(f"{top}/PKG-INFO").read().decode())
    for name in ("LICENSE", "NOTICE", "README.md", "pyproject.toml", "src/dinodet/__init__.py", "src/dinodet/cli.py"):
        assert name in names, name
    sources = {p.relative_to(dists["src"]).as_posix() for p in (dists["src"] / "src" / "dinodet").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert sources <= names, sorted(sources - names)
    assert pkg_info["License-Expression"] == "Apache-2.0"


def test_wheel_contents_and_metadata(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        meta = Parser().parsestr(whl.read(f"{dist_info}/METADATA").decode())
        entry_points = whl.read(f"{dist_info}/entry_points.txt").decode()
    # every file of the package, .py or not (package data), and nothing from outside it
    package = {p.relative_to(dists["src"] / "src").as_posix() for p in (dists["src"] / "src" / "dinodet").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    in_wheel = {n for n in names if not n.startswith(dist_info)}
    assert in_wheel == package, (sorted(package - in_wheel), sorted(in_wheel - package))
    assert {f"{dist_info}/licenses/LICENSE", f"{dist_info}/licenses/NOTICE"} <= names

    project = PYPROJECT["project"]
    assert meta["Name"] == "dinodet" and meta["License-Expression"] == project["license"] == "Apache-2.0"
    assert sorted(meta.get_all("License-File")) == sorted(project["license-files"])
    assert meta["Requires-Python"] == project["requires-python"]
    assert set(meta.get_all("Classifier")) == set(project["classifiers"])
    assert "dinodet = dinodet.cli:main" in entry_points
    # Requires-Dist: the dependencies, then each extra's packages under its marker
    extras = project["optional-dependencies"]
    assert set(meta.get_all("Provides-Extra")) == set(extras)
    want = _requirements(project["dependencies"])
    want |= {f'{r}; extra == "{name}"' for name, reqs in extras.items() for r in _requirements(reqs)}
    assert _requirements(meta.get_all("Requires-Dist")) == _requirements(sorted(want))


def test_all_is_every_optional_feature():
    extras = PYPROJECT["project"]["optional-dependencies"]
    # the features; test and dev are for working on dinodet, not using it
    others = set().union(*(_requirements(reqs) for name, reqs in extras.items() if name not in ("all", "test", "dev")))
    assert _requirements(extras["all"]) == others


def test_wheel_runs_outside_the_source_tree(venv: Path, dists, tmp_path: Path):
    from importlib.metadata import version

    bin_dir = venv / "bin"
    out = _run([bin_dir / "dinodet", "--version"]).stdout.strip()
    assert out == f"dinodet {version('dinodet')}" == f"dinodet {_source_version()}"
    code = ("import dinodet, json, sys; from importlib.metadata import distribution; "
            "print(json.dumps([dinodet.__file__, str(distribution('dinodet').locate_file('')), dinodet.__version__, "
            "dinodet.Detector.__module__]))")
    file, dist_root, ver, det_module = json.loads(_run([bin_dir / "python", "-c", code], cwd=tmp_path).stdout)
    assert Path(file).is_relative_to(venv) and Path(dist_root).is_relative_to(venv), (file, dist_root)
    assert not Path(file).is_relative_to(REPO_ROOT)
    assert ver == version("dinodet") and det_module == "dinodet.inference.detector"

    photo = COCO128_IMAGES / "000000000009.jpg"
    pred = tmp_path / "pred"
    _run([bin_dir / "dinodet", "predict", "--random-weights", "--preset", "tiny", photo, "--out", pred,
          "--size", "64", "--max-size", "96", "--threshold", "0"])
    records = json.loads((pred / "predictions.json").read_text())
    assert isinstance(records, list) and records and records[0]["file_name"] == photo.name
    assert (pred / "000000000009.jpg").is_file()
    # the wheel's requirements are met where it is installed (its dependencies: this test venv's)
    _run([bin_dir / "python", "-m", "pip", "check"])


def test_pip_check_is_clean_in_the_test_venv():
    _run([sys.executable, "-m", "pip", "check"])


def test_every_extra_resolves(dists, tmp_path: Path):
    """pip resolves the wheel with all its extras from the package index alone, as for a fresh install
    (``--ignore-installed``; a dry run: nothing is downloaded but metadata, nothing installed)."""
    report = tmp_path / "report.json"
    _run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", report,
          f"{dists['wheel']}[all]"], timeout=300)
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name  # prometheus-client's metadata says prometheus_client

    names = {canonicalize_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    wanted = {"dinodet", "torch", "torchvision"}
    wanted |= {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["optional-dependencies"]["all"]}
    assert wanted <= names, sorted(wanted - names)
