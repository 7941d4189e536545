#!/usr/bin/env bash
# MuonClip training under mpirun/mpiexec (MPICH or Open MPI). Ranks are discovered from MPI by
# mpi4py (python -m dist_muonclip.launch_env sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
# MASTER_PORT before torch.distributed starts).
#
#   NP=16 HOSTS=node-a:8,node-b:8 launch/mpirun.sh [-- entry args]
#
# Environment:
#   NP       total number of processes (default 2)
#   HOSTS    host:slots list for multi-node (default: this machine only)
#   MPIRUN   mpirun executable (default mpirun)
#   MASTER_ADDR / MASTER_PORT  optional; default rank 0's address and a free port on it
# Entry (after --): a script and its arguments (default launch/train.py), or
#   -- -m dist_muonclip.deepspeed --deepspeed_config configs/zero1.json --steps 100
# Needs mpi4py and an MPI runtime: pip install mpi4py mpich (or Debian's openmpi-bin).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NP="${NP:-2}"
MPIRUN="${MPIRUN:-mpirun}"
PYTHON="${PYTHON:-python}"
[[ "${1:-}" == "--" ]] && shift
[[ $# -eq 0 ]] && set -- "$ROOT/launch/train.py"

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
args=(-n "$NP")
if "$MPIRUN" --version 2>&1 | grep -q "Open MPI"; then
    # Open MPI: no core binding (the torch processes run their own threads), export our env
    args+=(--bind-to none -x PYTHONPATH -x MASTER_ADDR -x MASTER_PORT -x DIST_MUONCLIP_DS_SHM)
    [[ -n "${HOSTS:-}" ]] && args+=(-H "$HOSTS")
    [[ "$(id -u)" == 0 ]] && args+=(--allow-run-as-root)
else
    # MPICH (Hydra) forwards the whole environment by default
    [[ -n "${HOSTS:-}" ]] && args+=(-hosts "$HOSTS")
fi
exec "$MPIRUN" "${args[@]}" "$PYTHON" -m dist_muonclip.launch_env "$@"
