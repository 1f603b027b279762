#!/usr/bin/env bash
# Prepare, on the (CPU) development machine, what benchmarks/gpu_session.sh's "agree" stage carries to a
# lent GPU machine, so that the device's short time goes to the GPU work alone:
#
#   .whl/        pycocotools as a cp312 manylinux wheel (the device image has numpy and matplotlib, not
#                pycocotools; gpu_session.sh installs every wheel it finds here)
#   runs/agree/  a trained demo model (checkpoint_best.pt) and its synthetic dataset (data/): fast modes
#                are compared with exact mode by COCO AP, which needs a model that detects something
#
# Both are ignored by git, so a fresh checkout lacks them: run this first thing in a session that has a
# device (about 15 minutes on 2 cores, mostly the demo's training), then
#     run(command='STAGES="env tests agree" OUT=$OUT bash benchmarks/gpu_session.sh', carry=["runs/agree", ".whl"])
#
#     bash benchmarks/prepare_gpu_session.sh                       # both
#     DEMO_ARGS="--set train.epochs=2" bash benchmarks/prepare_gpu_session.sh   # a quick (weak) model
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-.venv/bin/python}
PYCOCOTOOLS=${PYCOCOTOOLS:-pycocotools==2.0.11}

if ! compgen -G ".whl/pycocotools-*.whl" >/dev/null; then
    # the device runs Python 3.12 on x86-64; pip matches each manylinux tag exactly, so offer several
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$PYCOCOTOOLS"
fi
ls -1 .whl

if [[ ! -f runs/agree/checkpoint_best.pt ]]; then
    work=runs/agree_demo
    # shellcheck disable=SC2086  # DEMO_ARGS is a list of options
    "$PY" -m dinodet demo --out "$work" --no-progress ${DEMO_ARGS:-}
    rm -rf runs/agree && mkdir -p runs/agree
    # only what the agree stage reads: the carried tree is limited to 64 MiB
    cp "$work/checkpoint_best.pt" runs/agree/
    cp -r "$work/data" runs/agree/data
    cp "$work/metrics.json" runs/agree/demo_metrics_cpu.json
fi
du -sh runs/agree .whl
