#!/usr/bin/env bash
# One device call on a single lent GPU for the breadth issues, each part under its own time budget:
#   1. tests/gpu/test_offload_gpu.py (CPU-offloaded state over NCCL)     -> $OUT/gpu_tests.txt
#   2. ZeRO-1/2/3 optimizer offload, MuonClip (issue 16)                 -> $OUT/zero_offload_h200.json
#   3. every engine at W=1 on two sizes, for the time model (issue 19)    -> $OUT/multi_gpu_h200x1.json
#   4. Lightning DeepSpeedStrategy and accelerate's DeepSpeed plugin (15) -> $OUT/hf_gpu_*.json
# Wheels the machine lacks (deepspeed, pydantic, hjson, ...) travel in .whl/ (README, "Multi-GPU").
#   bash benchmarks/gpu_breadth.sh [OUT_DIR]
set -uo pipefail
out="${1:-${OUT:-benchmarks/results/gpu_breadth}}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -2
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
t0=$(date +%s)
stamp() { echo "[gpu_breadth] $1 $(( $(date +%s) - t0 ))s"; }
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.txt" 2>&1
python3 -c "import torch, triton, transformers, deepspeed; print(torch.__version__, triton.__version__, transformers.__version__, deepspeed.__version__)" >> "$out/device.txt" 2>&1

timeout 90 python3 -m pytest -q -rA tests/gpu/test_offload_gpu.py -p no:cacheprovider > "$out/gpu_tests.txt" 2>&1
grep -E "passed|failed|error" "$out/gpu_tests.txt" | tail -2; stamp tests

timeout 160 python3 benchmarks/zero_offload_gpu.py --optimizers muonclip --budget-s 130 \
  --out "$out/zero_offload_h200.json" > "$out/zero_offload.log" 2>&1
echo "offload rc=$?"; tail -5 "$out/zero_offload.log"; stamp offload

timeout 180 python3 benchmarks/multi_gpu.py --scale --worlds 1 --w1-all --sizes gpu-1b gpu-2b --budget-s 140 --isolate \
  --engines adamw_ds_zero1 muonclip_ds_zero1 muonclip_ddp adamw_ddp muonclip_optimizer muonclip_fsdp2 adamw_fsdp2 muonclip_ds_zero2 \
  --grace-s 20 --tag h200x1 --out-dir "$out" > "$out/multi_gpu.log" 2>&1
echo "multi_gpu rc=$?"; tail -5 "$out/multi_gpu.log"; stamp multi_gpu

timeout 160 python3 benchmarks/hf_gpu.py --only lightning,accelerate-deepspeed --row-timeout 60 \
  --out "$out/hf_gpu_lightning_accelerate_ds_h200.json" > "$out/hf_gpu.log" 2>&1
echo "hf_gpu rc=$?"; tail -8 "$out/hf_gpu.log"; stamp hf_gpu
