#!/usr/bin/env bash
# Everything that needs a GPU, in one command: the whole test suite with the Triton kernels
# compiled for real (TRITON_INTERPRET=0; kernel tests then run on CUDA, GPU-only tests included),
# then every benchmark. Results land in benchmarks/results/ — each benchmark's .json/.md carries
# device, versions and date — plus gpu_env.txt and gpu_tests.txt. Commit them.
#
#   scripts/gpu_suite.sh [COPY_TO]     # e.g. on the device tool: scripts/gpu_suite.sh "$OUT"
#   ONLY="tests bench_attention" scripts/gpu_suite.sh "$OUT"   # a part of it (a device call has 10 min)
#
# Uses the machine's own torch/triton (no install: GPU machines may have no network), through
# python3 (some images have no `python`). PYTEST_ADDOPTS passes through (e.g. "-n 8" with xdist).
# COPY_TO gets one archive, gpu_results.tgz: the device tool returns a few files only.
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
results=benchmarks/results
mkdir -p "$results"
status=0
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} > "$results/gpu_env.txt" 2>&1
wanted() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
if wanted tests; then
    python3 -m pytest -m "slow or not slow" -q -rs tests 2>&1 | tee "$results/gpu_tests.txt" || status=1
fi
for bench in benchmarks/bench_*.py; do
    name=$(basename "$bench" .py)
    if wanted "$name"; then
        python3 "$bench" 2>&1 | tee "$results/$name.log" || status=1
    fi
done
if [ $# -ge 1 ]; then
    tar -czf "$1/gpu_results.tgz" -C "$results" .
fi
exit $status
