#!/usr/bin/env bash
# Create (or reuse) a virtual environment with dist_muonclip and its extras installed.
#   source launch/setup_env.sh [extras]      (default extras: test)
# Environment:
#   DIST_MUONCLIP_VENV   the environment to create or reuse (default: .venv in the repository);
#                        point it at your own (DIST_MUONCLIP_VENV="$VIRTUAL_ENV") to keep its torch
#   DIST_MUONCLIP_TORCH  the torch requirement installed when no compatible torch is there
#                        (default: torch==2.13.0)
#   DIST_MUONCLIP_TORCH_INDEX  the CPU wheel index (default: https://download.pytorch.org/whl/cpu)
# torch first (launch/torch_choice.py): a torch >= 2.5 already importable in the environment is
# kept; else, without an NVIDIA GPU on Linux, a local CPU build or PyTorch's CPU wheel index (plain
# PyPI if that index is unreachable), with a GPU the pinned PyPI build. Every later install is
# constrained to the torch now present, so pip never swaps in a multi-GB CUDA build.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_extras="${1:-test}"
_venv="${DIST_MUONCLIP_VENV:-$_root/.venv}"
_torch="${DIST_MUONCLIP_TORCH:-torch==2.13.0}"
if [[ ! -x "$_venv/bin/python" ]]; then
  python3 -m venv "$_venv"
fi
if [[ -f "$_venv/bin/activate" && -f "$_venv/pyvenv.cfg" ]]; then
  # shellcheck disable=SC1091
  source "$_venv/bin/activate"
else  # a conda prefix or a plain install tree: its python first on PATH
  export PATH="$_venv/bin:$PATH"
fi
_stamp="$_venv/.dist_muonclip_${_extras//,/_}"
if [[ ! -f "$_stamp" || "$_root/setup.py" -nt "$_stamp" || "$_root/launch/setup_env.sh" -nt "$_stamp" ]]; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  python "$_root/launch/torch_choice.py" --pin "$_torch"
  _constraint="$_venv/.dist_muonclip_torch_constraint.txt"
  python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > "$_constraint"
  python -m pip install -q -c "$_constraint" -e "$_root[$_extras]"
  touch "$_stamp"
fi
