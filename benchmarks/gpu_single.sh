#!/usr/bin/env bash
# One device call on a single lent GPU: the GPU kernel tests, the training entry point on CUDA
# (DDP, FSDP2, DeepSpeed ZeRO-2 bf16; NCCL, one rank) and the W=1 part of multi_gpu.py's scaling
# run. Wheels that the machine lacks travel in .whl/ (see README, "Multi-GPU").
#   bash benchmarks/gpu_single.sh OUT_DIR [multi_gpu budget seconds]
set -uo pipefail
out="${1:?output dir}"; budget="${2:-240}"
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python -m pip install -q --no-index --find-links .whl deepspeed==0.19.8 transformers==5.24.0 matplotlib 2>&1 | tail -2
fi
export PYTHONPATH="$PWD" NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$out/train"
t0=$(date +%s)
python -m pytest -q -rA tests/gpu -p no:cacheprovider > "$out/gpu_tests.txt" 2>&1
grep -E "passed|failed|error" "$out/gpu_tests.txt" | tail -3
echo "[gpu_single] tests $(( $(date +%s) - t0 ))s"
port=29611
for mode in ddp fsdp deepspeed; do
  extra=()
  case $mode in
    fsdp) extra=(--fsdp --fsdp-mixed-precision bf16);;
    deepspeed) extra=(--deepspeed_config configs/zero2_bf16.json);;
    ddp) extra=(--autocast bf16);;
  esac
  port=$((port + 1))
  timeout 240 torchrun --nnodes=1 --nproc_per_node=1 --master_addr=127.0.0.1 --master_port=$port \
    launch/train.py --steps 120 --batch-size 32 --seq-len 256 --no-progress --log-every 40 \
    --out "$out/train/$mode.json" "${extra[@]}" > "$out/train/$mode.log" 2>&1
  echo "[gpu_single] train $mode rc=$? $(grep -E 'final|eval' "$out/train/$mode.log" | tail -2 | tr '\n' ' ')"
done
echo "[gpu_single] train $(( $(date +%s) - t0 ))s"
python benchmarks/multi_gpu.py --scale --tag h100x1 --budget-s "$budget" --grace-s 40 --out-dir "$out/train" \
  > "$out/train/multi_gpu.log" 2>&1
echo "[gpu_single] multi_gpu rc=$? $(( $(date +%s) - t0 ))s"
tail -25 "$out/train/multi_gpu.log"
tar -C "$out" -cf "$out/train.tar" train && rm -rf "$out/train"
