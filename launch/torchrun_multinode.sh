#!/usr/bin/env bash
# Multi-node torchrun with c10d rendezvous. Run the SAME command on every node.
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node-a:29400 launch/torchrun_multinode.sh [-- entry args]
#
# Environment:
#   NNODES          number of nodes (default 1)
#   NPROC_PER_NODE  processes per node (default 1)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous; any node's reachable address, the node whose
#                   address it is hosts the store (default 127.0.0.1:29400)
#   RDZV_ID         job id shared by all nodes (default dist_muonclip)
#   LOCAL_ADDR      this node's address as the other nodes reach it (optional; default: torchrun
#                   uses the host name, which must then resolve to a reachable address)
#   RDZV_CONF       extra rendezvous options, e.g. is_host=1 on the node whose address is
#                   RDZV_ENDPOINT when torchrun cannot tell by itself (secondary NICs, namespaces)
#   TORCHRUN        torchrun executable (default torchrun)
# Entry (after --): a script and its arguments, default launch/train.py. The DeepSpeed entry point
# runs under torchrun too:  -- -m dist_muonclip.deepspeed --deepspeed_config configs/zero1.json
# Pick the network interface of gloo/NCCL with GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME if needed.
#
# Example, two nodes, 8 GPUs each (run on node-a and on node-b):
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node-a:29400 launch/torchrun_multinode.sh -- launch/train.py --steps 1000
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-127.0.0.1:29400}"
RDZV_ID="${RDZV_ID:-dist_muonclip}"
TORCHRUN="${TORCHRUN:-torchrun}"
[[ "${1:-}" == "--" ]] && shift
[[ $# -eq 0 ]] && set -- "$ROOT/launch/train.py"
entry=()
if [[ "$1" == "-m" ]]; then entry=(--module "$2"); shift 2; else entry=("$1"); shift; fi

local_addr=()
[[ -n "${LOCAL_ADDR:-}" ]] && local_addr=(--local-addr "$LOCAL_ADDR")
[[ -n "${RDZV_CONF:-}" ]] && local_addr+=(--rdzv-conf "$RDZV_CONF")

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$TORCHRUN" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" "${local_addr[@]}" \
    "${entry[@]}" "$@"
