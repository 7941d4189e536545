#!/usr/bin/env bash
# The test command: set up the environment from nothing (first run) and run the whole suite.
#   bash tests/run.sh [pytest args]        (~15 min on an idle 2-core CPU box; e.g. --co -q only collects)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_env.sh test
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q "$@"
