#!/usr/bin/env bash
# All GPU checks and benchmarks of one (short) device session, in priority order, each under its own
# time limit, so that a stage that breaks or hangs costs only its own limit.  Run from the repository
# root on a CUDA machine whose python3 has torch + triton (the package itself is used from src/):
#
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh                 # every stage
#     STAGES="kernel infer" OUT=/tmp/gpu bash benchmarks/gpu_session.sh
#
# Stages: env tests kernel infer train compile profile agree shapes.  Results (JSON per stage) and the whole
# log land in $OUT.  "agree" (not in the default list) evaluates every CUDA mode against exact on a
# trained demo checkpoint: AGREE_CKPT / AGREE_DATA (default runs/agree/checkpoint_best.pt and
# runs/agree/data: copy a CPU demo run's checkpoint_best.pt and data/ there and carry runs/agree,
# ~50 MB); without them it first trains the demo on the GPU.  Wheels found in .whl/ (the device image
# lacks pycocotools) are installed to /tmp/site.  Both are git-ignored, so a fresh checkout lacks them:
# `bash benchmarks/prepare_gpu_session.sh` makes them on the CPU machine (about 15 minutes) first.
#
# With the device tool (600 s per call; 15 minutes of device time per session, start-up included, so
# plan one call): `STAGES="env tests agree" OUT=$OUT bash benchmarks/gpu_session.sh` with timeout_s 590,
# carrying runs/agree and .whl (stages run in the order of this file: about 8 minutes).  Sessions with
# more time: `STAGES="infer train compile"`, then `STAGES="shapes"` (compiled inference on a stream of
# 9 image sizes).
set -u
OUT=${OUT:-/tmp/dinodet_gpu}
STAGES=${STAGES:-"env tests kernel infer train compile profile"}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/session.log"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

stage() {  # stage LIMIT_S CMD...: run CMD under a time limit; all output to the log, its end to stdout
    local limit=$1 rc part="$OUT/.stage"; shift
    echo "=== [$(date +%T)] $* (limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" "$@" >"$part" 2>&1
    rc=$?
    cat "$part" >>"$LOG"
    grep -v -E "^\s*$|Warning|warn\(" "$part" | tail -n "${TAIL:-14}"
    rm -f "$part"
    echo "=== [$(date +%T)] rc=$rc" | tee -a "$LOG"
}
want() { [[ " $STAGES " == *" $1 "* ]]; }

if want env; then
    stage 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
    stage 60 "$PY" -c "import torch, triton, torchvision; print('torch', torch.__version__, 'triton', triton.__version__, 'tv', torchvision.__version__, torch.cuda.get_device_name())"
fi
if want tests; then
    stage 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_msda_triton.py tests/test_models.py -k "cuda"
fi
if want kernel; then
    stage 90 "$PY" benchmarks/msda_kernel.py --json "$OUT/msda_fp32.json"
    stage 90 "$PY" benchmarks/msda_kernel.py --dtype bf16 --json "$OUT/msda_bf16.json"
fi
if want infer; then
    stage 150 "$PY" -m dinodet bench --device cuda --task infer --modes reference,exact,channels_last,bf16,fp16 \
        --warmup 5 --iters 20 --json "$OUT/bench_infer.json"
fi
if want train; then
    stage 180 "$PY" -m dinodet bench --device cuda --task train --batch 2 --warmup 3 --iters 10 \
        --json "$OUT/bench_train.json"
fi
if want compile; then
    stage ${COMPILE_LIMIT:-300} "$PY" -m dinodet bench --device cuda --task infer --modes reference,compile_bf16,compile \
        --warmup 5 --iters 20 --json "$OUT/bench_compile.json"
fi
if want profile; then
    stage 90 "$PY" benchmarks/profile_modes.py --device cuda --task infer --mode ${PROFILE_INFER_MODE:-bf16} --json "$OUT/profile_infer.json"
    stage 120 "$PY" benchmarks/profile_modes.py --device cuda --task train --mode bf16 --json "$OUT/profile_train.json"
fi
if want agree; then
    AGREE_CKPT=${AGREE_CKPT:-runs/agree/checkpoint_best.pt}
    AGREE_DATA=${AGREE_DATA:-runs/agree/data}
    if [[ ! -f "$AGREE_CKPT" ]]; then  # no carried model: train the demo here (same recipe as on CPU)
        rm -rf /tmp/dinodet_demo
        stage ${DEMO_LIMIT:-400} "$PY" -m dinodet demo --device "${AGREE_DEVICE:-cuda}" --out /tmp/dinodet_demo --no-progress ${DEMO_ARGS:-}
        cp /tmp/dinodet_demo/metrics.json "$OUT/demo_metrics_${AGREE_DEVICE:-cuda}.json" 2>/dev/null
        AGREE_CKPT=/tmp/dinodet_demo/checkpoint_best.pt AGREE_DATA=/tmp/dinodet_demo/data
    fi
    stage ${AGREE_LIMIT:-300} "$PY" benchmarks/mode_agreement.py --device "${AGREE_DEVICE:-cuda}" --checkpoint "$AGREE_CKPT" \
        --data "$AGREE_DATA" --modes ${AGREE_MODES:-exact,bf16,fp16,compile_bf16,compile} --json "$OUT/mode_agreement_${AGREE_DEVICE:-cuda}.json"
fi
if want shapes; then
    stage ${SHAPES_LIMIT:-540} "$PY" benchmarks/compile_shapes.py --device cuda --mode compile_bf16 --static \
        --json "$OUT/compile_shapes.json"
fi
echo "=== done; full log: $LOG"
