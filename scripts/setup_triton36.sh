#!/usr/bin/env bash
# Install triton 3.6.0 — the oldest Triton pyproject.toml allows, the one torch 2.11 ships with — into
# .triton36/, beside the venv's newer Triton, so that the ahead-of-time compile check runs under both
# (tests/test_kernel_report.py; `PYTHONPATH=.triton36 python scripts/kernel_report.py` by hand).
# PYTHONPATH puts .triton36 in front of the venv's site-packages: triton 3.6, and a numpy its
# interpreter accepts (< 2.4), shadow the venv's own, while torch and the rest still come from the venv.
# Run with the venv's python on PATH (scripts/test.sh runs it after activating .venv). The first run
# fetches a 190 MB wheel (~10 s here); later runs find .triton36 and install nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .triton36/triton-3.6.0.dist-info ]; then
    rm -rf .triton36 .triton36.partial
    python -m pip install --quiet --no-deps --target .triton36.partial "triton==3.6.0" "numpy<2.4"
    mv .triton36.partial .triton36  # only a complete install is ever found
fi
