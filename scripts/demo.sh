#!/usr/bin/env bash
# The main job on a fresh machine: install minisft into .venv (CPU torch) and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh
python -m minisft demo "$@"
