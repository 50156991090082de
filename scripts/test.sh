#!/usr/bin/env bash
# Install minisft with its test extra into .venv (CPU torch) and run the whole test suite,
# slow tests included — this is what CI runs. For the fast set alone: `.venv/bin/pytest`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
bash scripts/setup_triton36.sh  # triton 3.6 for the compile check under the oldest Triton we allow
python -m pytest -m "slow or not slow" "$@"
