#!/usr/bin/env bash
# Create (or reuse) a virtual environment with dist_muonclip and its extras installed.
#   source launch/setup_env.sh [extras]      (default extras: test)
# On a machine without a GPU this installs torch's CPU build; torch is pinned first and every later
# install is constrained to it so pip never swaps in a multi-GB CUDA build.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_extras="${1:-test}"
_venv="${DIST_MUONCLIP_VENV:-$_root/.venv}"
_torch="${DIST_MUONCLIP_TORCH:-torch==2.13.0}"
if [[ ! -x "$_venv/bin/python" ]]; then
  python3 -m venv "$_venv"
fi
# shellcheck disable=SC1091
source "$_venv/bin/activate"
_stamp="$_venv/.dist_muonclip_${_extras//,/_}"
if [[ ! -f "$_stamp" || "$_root/setup.py" -nt "$_stamp" ]]; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  python -m pip install -q "$_torch"
  python -m pip install -q "$_torch" -e "$_root[$_extras]"
  touch "$_stamp"
fi
