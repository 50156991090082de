"""Causal attention, forward and forward + backward: ours vs SDPA (flash / efficient / math)
vs FlexAttention, bf16, with and without packed documents.

    python benchmarks/bench_attention.py                (needs a CUDA GPU; on a CPU it says so)

Every case holds 16k tokens (batch = 16384 / T) of a 2048-wide model: 16 heads of 128 or 32 of 64.
FLOPs are counted for the visible (query, key) pairs only, as the Triton tutorial does: each of
the two forward matmuls costs 2·D per pair, causal halves the pairs, and the backward costs 2.5×
the forward (its 4 matmuls + the recomputed scores) — fwd + bwd = 3.5 × fwd. With packed documents
only same-document pairs count (Σ len²/2 instead of T²/2). "% peak" divides by the device's dense
bf16 peak.
"""

from __future__ import annotations

import random
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
from triton_kernels.attention import attention  # noqa: E402

TOKENS = 16384
MODEL_DIM = 2048


def document_lengths(T: int, rng: random.Random) -> list[int]:
    """SFT-like documents: 64 to 1500 tokens each, packed until the row is full."""
    lengths = []
    while sum(lengths) < T:
        lengths.append(min(rng.randint(64, 1500), T - sum(lengths)))
    return lengths


def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )

    return run


def flex(document_ids: torch.Tensor | None, T: int, B: int):
    """FlexAttention (compiled) with a causal, optionally same-document, block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def visible(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        return causal if document_ids is None else causal & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    mask = create_block_mask(visible, B=B if document_ids is not None else None, H=None, Q_LEN=T, KV_LEN=T)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)


def measure(fn, q, k, v, backward: bool):
    def step():
        out = fn(q, k, v)
        if backward:
            out.backward(grad_out[: out.numel()].view_as(out))

    grad_out = torch.randn(q.numel(), device="cuda", dtype=q.dtype)
    try:
        return time_ms(step, grad_to_none=[q, k, v]), peak_memory_gib(step)
    except (torch.OutOfMemoryError, RuntimeError) as err:  # a backend refusing a shape says so
        torch.cuda.empty_cache()
        return f"n/a ({type(err).__name__})", None


def main() -> None:
    require_cuda("bench_attention")
    from torch.nn.attention import SDPBackend

    facts = device_facts()
    print(facts)
    peak = facts["bf16_peak_tflops"]
    rng = random.Random(0)
    rows = []
    for head_dim in (64, 128):
        heads = MODEL_DIM // head_dim
        for T in (1024, 4096, 16384):
            B = TOKENS // T
            q, k, v = (torch.randn(B, T, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))  # fmt: skip
            lengths = document_lengths(T, rng)
            docs = torch.cat([torch.full((n,), i, device="cuda") for i, n in enumerate(lengths)]).expand(B, T)
            cases = {
                ("causal", "minisft"): lambda q, k, v: attention(q, k, v),
                ("causal", "SDPA flash"): sdpa(SDPBackend.FLASH_ATTENTION),
                ("causal", "SDPA efficient"): sdpa(SDPBackend.EFFICIENT_ATTENTION),
                ("causal", "flex"): flex(None, T, B),
                ("packed docs", "minisft"): lambda q, k, v, docs=docs: attention(q, k, v, docs),
                ("packed docs", "flex"): flex(docs, T, B),
            }
            if T <= 4096:
                cases[("causal", "SDPA math")] = sdpa(SDPBackend.MATH)
            for (mask, impl), fn in cases.items():
                pairs = B * (T * (T + 1) / 2 if mask == "causal" else sum(n * (n + 1) / 2 for n in lengths))
                fwd_flops = 2 * 2 * heads * head_dim * pairs
                for direction, flops, backward in (("fwd", fwd_flops, False), ("fwd+bwd", 3.5 * fwd_flops, True)):
                    ms, gib = measure(fn, q, k, v, backward)
                    row = {"D": head_dim, "T": T, "mask": mask, "pass": direction, "impl": impl, "ms": ms}
                    if isinstance(ms, float):
                        tflops = flops / ms / 1e9
                        row.update({"ms": round(ms, 3), "TFLOP/s": round(tflops), "peak GiB": round(gib, 2)})
                        if peak:
                            row["% peak"] = round(100 * tflops / peak, 1)
                    rows.append(row)
                    print(row)
    add_speedups(rows)
    table = markdown_table(rows)
    print(table)
    save_results("attention", facts, rows, table)


def add_speedups(rows: list[dict]) -> None:
    """'ours ×': that row's time / ours for the same D, T, mask and pass (measured in this run)."""
    key = lambda row: (row["D"], row["T"], row["mask"], row["pass"])  # noqa: E731
    ours = {key(row): row["ms"] for row in rows if row["impl"] == "minisft" and isinstance(row["ms"], float)}
    for row in rows:
        if isinstance(row["ms"], float) and key(row) in ours:
            row["ours ×"] = round(row["ms"] / ours[key(row)], 2)


if __name__ == "__main__":
    main()
