#!/usr/bin/env bash
# The GPU check, under 8 minutes on one or more GPUs: STEPS (default 300) steps of a small
# CIFAR-10-shaped U-Net (32x32x3; synthetic PNGs, or the folder given as $1) in bf16 with
# torch.compile, trained by flow matching and by a flow-map objective (lsd), each with its
# steps/s and peak GPU memory; the same flow matching run on 2 processes over NCCL when 2 GPUs
# are visible; then a one-line verdict. Without CUDA it says so and exits 0.
#   scripts/gpu_check.sh [FOLDER]      (PYTHON=..., STEPS=..., OUT=... to change the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$GPUS" = 0 ]; then
    echo "gpu_check: no CUDA device is visible to torch here; nothing to check"
    exit 0
fi
STEPS=${STEPS:-300}
OUT=${OUT:-$(mktemp -d -t flowmatch-gpu-check.XXXXXX)}
DATA=${1:-$OUT/pngs}
if [ -z "${1:-}" ]; then  # 1024 synthetic 32x32 RGB images in 2 classes
    "$PY" - "$DATA" <<'PY'
import pathlib, sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for k in range(2):
    folder = pathlib.Path(sys.argv[1]) / f"class{k}"
    folder.mkdir(parents=True)
    for i in range(512):
        pixels = np.clip(60 + 120 * k + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
PY
fi
COMMON=(--preset digits data.name=folder "data.path=$DATA" data.test_fraction=0
    model.channels=64 model.channel_mult=1,2,2 model.num_groups=32
    model.attention_resolutions=16 train.batch_size=128 train.log_every=50
    train.checkpoint_every=100000 train.precision=bf16 train.compile=true
    train.device=cuda --max-steps "$STEPS")
PASSED=0
FAILED=()

report() {  # NAME RUN_DIR EXTRA: the steps/s of the last logged interval
    "$PY" - "$@" <<'PY'
import json, pathlib, sys
name, run, extra = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
last = [r for r in rows if "steps_per_sec" in r][-1]
print(f"gpu_check: {name}: {last['steps_per_sec']:.1f} steps/s at step {last['step']}, "
      f"loss {last['loss']:.4f}{extra}")
PY
}

one_gpu() {  # NAME OVERRIDES...: the run through the CLI, and its peak memory
    local name=$1
    shift
    echo "gpu_check: $name: $STEPS steps (bf16, torch.compile) ..."
    local peak
    if peak=$("$PY" - "$OUT/$name" "${COMMON[@]}" "$@" <<'PY'
import sys
import torch
from flowmatch.cli.main import main
code = main(["train", "--out", sys.argv[1], *sys.argv[2:]])
print(f"{torch.cuda.max_memory_allocated() / 2**20:.0f}")
sys.exit(code)
PY
    ) && report "$name" "$OUT/$name" ", peak GPU memory ${peak##*$'\n'} MiB"; then
        PASSED=$((PASSED + 1))
    else
        FAILED+=("$name")
    fi
}

one_gpu unet-flow-matching
one_gpu unet-lsd objective=lsd
if [ "$GPUS" -ge 2 ]; then
    echo "gpu_check: unet-flow-matching-2-nccl: $STEPS steps on 2 processes ..."
    if "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m flowmatch train \
        --out "$OUT/unet-flow-matching-2-nccl" "${COMMON[@]}" \
        && report unet-flow-matching-2-nccl "$OUT/unet-flow-matching-2-nccl" ", 2 GPUs"; then
        PASSED=$((PASSED + 1))
    else
        FAILED+=(unet-flow-matching-2-nccl)
    fi
else
    echo "gpu_check: one GPU visible: the 2-process NCCL run is left out"
fi
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "gpu_check: PASS: $PASSED runs on $GPUS GPU(s) ($(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null || echo CUDA)); runs in $OUT"
else
    echo "gpu_check: FAIL: ${FAILED[*]} (of $((PASSED + ${#FAILED[@]})) runs); runs in $OUT"
    exit 1
fi
