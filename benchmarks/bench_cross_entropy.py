"""Cross-entropy and linear + cross-entropy, forward + backward: ours vs PyTorch vs Liger-Kernel.

    python benchmarks/bench_cross_entropy.py            (needs a CUDA GPU; on a CPU it says so)

Cross-entropy is memory-bound: the least any implementation can move is one read of the bf16
logits and one write of their gradient, 2·N·V·2 bytes. "GB/s" divides those bytes by the time,
and "% copy" compares that with a device-to-device copy measured in the same run.

Linear + cross-entropy is matmul-bound: three matmuls of 2·N·d·V FLOPs each (logits, ∂hidden,
∂W). "TFLOP/s" counts those, "% peak" compares with the device's dense bf16 peak. Its point is
memory: "peak GiB" is what one forward + backward allocates beyond its inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import (  # noqa: E402
    device_facts,
    markdown_table,
    peak_memory_gib,
    require_cuda,
    save_results,
    time_ms,
)
from triton_kernels.cross_entropy import cross_entropy, linear_cross_entropy  # noqa: E402

VOCABS = (32768, 128256, 256000)
ROWS = (4096, 16384)
HIDDEN = 2048  # a ~1B-parameter model's width


def eager_ce(logits, labels):
    return F.cross_entropy(logits.float(), labels)


def eager_linear_ce(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels)


def liger():
    """Liger-Kernel's functions if it is installed, else None (it is a benchmark reference only)."""
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        return None
    return {
        "ce": lambda logits, labels: LigerCrossEntropyFunction.apply(logits, labels)[0],
        "linear": lambda hidden, weight, labels: LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, labels)[0],
    }


def measure(fn, inputs: list[torch.Tensor]) -> tuple[float | str, float | str]:
    """(ms, peak GiB) of forward + backward, or ('OOM', 'OOM')."""

    def step():
        fn(*inputs).backward()

    try:
        return time_ms(step, grad_to_none=[t for t in inputs if t.requires_grad]), peak_memory_gib(step)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM", "OOM"


def bench_cross_entropy(facts: dict, peers: dict) -> list[dict]:
    rows = []
    for n in ROWS:
        for vocab in VOCABS:
            logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16).requires_grad_()
            labels = torch.randint(0, vocab, (n,), device="cuda")
            labels[::10] = -100
            min_bytes = 2 * n * vocab * logits.element_size()
            times = {}
            for name, fn in peers.items():
                ms, gib = measure(fn, [logits, labels])
                times[name] = ms
                row = {"op": "CE", "rows": n, "V": vocab, "impl": name, "ms": ms, "peak GiB": gib}
                if isinstance(ms, float):
                    gbs = min_bytes / ms / 1e6
                    row.update({"ms": round(ms, 3), "peak GiB": round(gib, 2), "GB/s": round(gbs)})
                    row["% copy"] = round(100 * gbs / facts["copy_gb_per_s"], 1)
                rows.append(row)
            add_speedups(rows[-len(peers) :], times)
            del logits
    return rows


def bench_linear_cross_entropy(facts: dict, peers: dict) -> list[dict]:
    rows = []
    for n in ROWS:
        for vocab in VOCABS:
            hidden = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16).requires_grad_()
            weight = (torch.randn(vocab, HIDDEN, device="cuda", dtype=torch.bfloat16) / HIDDEN**0.5).requires_grad_()
            labels = torch.randint(0, vocab, (n,), device="cuda")
            labels[::10] = -100
            flops = 3 * 2 * n * HIDDEN * vocab
            times = {}
            for name, fn in peers.items():
                ms, gib = measure(fn, [hidden, weight, labels])
                times[name] = ms
                row = {"op": "linear+CE", "rows": n, "V": vocab, "impl": name, "ms": ms, "peak GiB": gib}
                if isinstance(ms, float):
                    tflops = flops / ms / 1e9
                    row.update({"ms": round(ms, 2), "peak GiB": round(gib, 2), "TFLOP/s": round(tflops)})
                    if facts["bf16_peak_tflops"]:
                        row["% peak"] = round(100 * tflops / facts["bf16_peak_tflops"], 1)
                rows.append(row)
            add_speedups(rows[-len(peers) :], times)
            del hidden, weight
    return rows


def add_speedups(rows: list[dict], times: dict) -> None:
    """'ours ×': how many times faster ours is than each row's implementation (same shape, same run)."""
    ours = times.get("minisft")
    for row in rows:
        if isinstance(ours, float) and isinstance(times[row["impl"]], float):
            row["ours ×"] = round(times[row["impl"]] / ours, 2)


def main() -> None:
    require_cuda("bench_cross_entropy")
    facts = device_facts()
    print(facts)
    peer_fns = liger()
    ce = {
        "minisft": lambda logits, labels: cross_entropy(logits, labels),
        "eager": eager_ce,
        "torch.compile": torch.compile(eager_ce),
    }
    linear = {
        "minisft": lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels),
        "eager": eager_linear_ce,
        "torch.compile": torch.compile(eager_linear_ce),
    }
    if peer_fns:
        ce["liger"], linear["liger"] = peer_fns["ce"], peer_fns["linear"]
    rows = bench_cross_entropy(facts, ce) + bench_linear_cross_entropy(facts, linear)
    table = markdown_table(rows)
    print(table)
    save_results("cross_entropy", facts, rows, table)


if __name__ == "__main__":
    main()
