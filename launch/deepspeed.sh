#!/usr/bin/env bash
# MuonClip training under the DeepSpeed launcher (single or multi node).
#
#   launch/deepspeed.sh [deepspeed launcher options] [-- entry-point options]
#
# Environment (all optional):
#   HOSTFILE  DeepSpeed hostfile (default launch/hostfile.example: edit it; see its comments)
#   CONFIG    DeepSpeed JSON with an optimizer section of type MuonClip (default configs/zero2_bf16.json)
#   ENTRY     module run on every rank (default dist_muonclip.deepspeed, which runs the tiny DeepSpeed
#             trainer of dist_muonclip/support/ds_trainer.py; it takes --steps, --global-batch,
#             --seq-len, --out, --save-dir, --resume-dir)
#
# Multi-node (run on the first node; it reaches the others by ssh/pdsh, repo at the same path):
#   HOSTFILE=my_hosts CONFIG=configs/zero2_bf16.json launch/deepspeed.sh --master_addr node-a -- --steps 1000
# Multi-node without ssh (run on every node, node_rank 0..N-1):
#   launch/deepspeed.sh --no_ssh --node_rank $NODE_RANK --master_addr node-a -- --steps 1000
# One machine, 2 CPU processes (what tests/test_launchers.py runs):
#   echo "localhost slots=2" > /tmp/hosts
#   HOSTFILE=/tmp/hosts CONFIG=configs/zero1.json launch/deepspeed.sh --no_ssh --node_rank 0 --master_addr 127.0.0.1 -- --steps 5
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTFILE="${HOSTFILE:-$ROOT/launch/hostfile.example}"
CONFIG="${CONFIG:-$ROOT/configs/zero2_bf16.json}"
ENTRY="${ENTRY:-dist_muonclip.deepspeed}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"

launcher_args=()
while [[ $# -gt 0 && "$1" != "--" ]]; do launcher_args+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$DEEPSPEED" --hostfile "$HOSTFILE" "${launcher_args[@]}" \
    --module "$ENTRY" --deepspeed_config "$CONFIG" "$@"
