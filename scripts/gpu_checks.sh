#!/usr/bin/env bash
# The GPU checks of one short device session, in priority order, each under its own time limit:
#   1. retrain the mini ControlNet and LoRA on the committed mini U-Net (their recorded recipes, --device cuda);
#   2. the CUDA smoke tests (tests/test_cuda.py: capture, extraction fp16/fp32, probes, one notebook);
#   3. `difstudy bench --device cuda` (SD1.5 widths, 512 px, fp16): the README's GPU ratios.
# Usage: OUT=results/gpu bash scripts/gpu_checks.sh   (on a machine with a CUDA build of torch)
# Writes to $OUT: gpu_checks.log (summary), one log per step, adapters.tgz (the exported adapter
# folders, to unpack over difstudy/models/), bench_cuda.csv.
# Where the machine has no package index, wheels in .whl/ (diffusers, papermill and what they need
# beyond the machine's own packages) are installed into /tmp/site first.
set -u
OUT=${OUT:-results/gpu}
mkdir -p "$OUT" runs
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
LOG=$OUT/gpu_checks.log
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, diffusers, transformers, peft; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| transformers', \
transformers.__version__, '| peft', peft.__version__, '|', torch.cuda.get_device_name(0))"
} 2>&1 | tee -a "$LOG"

step() {  # step NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start)) s" | tee -a "$LOG"
    tail -n 6 "$OUT/$name.log" | tee -a "$LOG"
}

# 1. adapters on the committed U-Net: the recorded recipes (ControlNet 1,000 steps, LoRA 800, batch 32);
#    the ControlNet's condition is the official detector, cv2.Canny(100, 200)
step controlnet 170 python3 -m difstudy.train.controlnet --device cuda --threads 8 --steps 1000 --canny opencv \
    --out runs/gpu-controlnet --export runs/gpu-export/difstudy-mini-canny
step lora 120 python3 -m difstudy.train.lora --device cuda --threads 8 --steps 800 \
    --out runs/gpu-lora --export runs/gpu-export/difstudy-mini-lora-checkered
[ -d runs/gpu-export ] && tar czf "$OUT/adapters.tgz" -C runs/gpu-export .
# 2. CUDA smoke tests (skipped nowhere: this machine has the GPU)
step smoke 120 python3 -m pytest tests/test_cuda.py -q -rA -p no:cacheprovider
# 3. the GPU bench (full presets: 10 repeats)
step bench 170 python3 -m difstudy bench --device cuda --threads 8 --out "$OUT/bench_cuda.csv"
echo "== done $(date -u)" | tee -a "$LOG"
