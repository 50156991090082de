"""Shared by the benchmark scripts: device facts, timing, peak memory, and where results go.

Every number a benchmark reports is measured in the same run as the numbers it is compared to,
on the same device; the copy bandwidth that percentages refer to is measured too, not assumed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def require_cuda(name: str) -> None:
    """Benchmarks time GPU kernels: on a machine without one, say so and exit successfully."""
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA device here; this benchmark times GPU kernels, so there is nothing to measure.")
        sys.exit(0)


def device_facts() -> dict:
    import triton

    from minisft.flops import peak_flops  # the datasheet's dense bf16 peak, the one training's MFU uses

    peak = peak_flops(torch.device("cuda"))
    return {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "bf16_peak_tflops": peak and peak / 1e12,
        "copy_gb_per_s": measure_copy_bandwidth(),
    }


def cpu_facts() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    model = platform.processor() or platform.machine()
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        model = names[0] if names else model
    return {
        "device": model,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def time_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds of fn() (triton's do_bench: L2 flushed between runs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def measure_copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy (read + write counted): the memory roofline here."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def peak_memory_gib(fn: Callable[[], object]) -> float:
    """Peak memory allocated during one fn() beyond what was allocated before it, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def save_results(name: str, facts: dict, rows: list[dict], table: str, folder: Path = RESULTS) -> None:
    """Write <folder>/<name>.json (machine-readable) and <name>.md (the table); the folder is
    benchmarks/results unless a script's --results names another."""
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({**facts, "rows": rows}, indent=2) + "\n")
    header = ", ".join(f"{k} {v}" for k, v in facts.items())
    (folder / f"{name}.md").write_text(f"# {name}\n\n{header}\n\n{table}\n")
    print(f"wrote {folder / name}.json and .md")


def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
