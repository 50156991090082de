"""The benchmark scripts run anywhere: on a machine without a GPU they say so and exit 0."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the benchmark really runs (scripts/gpu_suite.sh)")
@pytest.mark.parametrize("script", sorted((REPO_ROOT / "benchmarks").glob("bench_*.py")), ids=lambda p: p.name)
def test_benchmark_on_cpu_says_so_and_exits_0(script):
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device here" in result.stdout
