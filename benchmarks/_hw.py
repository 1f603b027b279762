"""Hardware names for benchmark records (imported by the scripts in benchmarks/, which run as
``python benchmarks/x.py``: this folder is then first on ``sys.path``)."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it ("AMD EPYC 7763 64-Core Processor"), else what
    ``platform`` knows (non-Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
