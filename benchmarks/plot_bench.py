"""Bar chart of ``dinodet bench`` JSON records (one or more files; a mode measured twice is drawn once,
from the first file).

    python benchmarks/plot_bench.py benchmarks/results/bench_gpu_infer_h100_a.json ... --out speed.png \
        --title "H100" --mark "infer:official fp32=58.8" --mark "train:official fp32=296"

Each record keeps the speed-up measured in its own run (against that run's reference).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dinodet.engine.plots import plot_speed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--title", default="")
    p.add_argument("--mark", action="append", default=[], metavar="TASK:LABEL=MS",
                   help="a dashed line at MS on TASK's chart (repeatable)")
    args = p.parse_args(argv)
    records, seen = [], set()
    for path in args.files:
        for r in json.loads(path.read_text()):
            if (r["task"], r["mode"]) not in seen:
                seen.add((r["task"], r["mode"]))
                records.append(r)
    marks: dict[str, dict[str, float]] = {}
    for m in args.mark:
        task, _, rest = m.partition(":")
        label, _, value = rest.rpartition("=")
        marks.setdefault(task, {})[label] = float(value)
    print(plot_speed(records, args.out, args.title, marks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
