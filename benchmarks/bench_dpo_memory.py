"""DPO step peak memory: per-sequence log-probs without the logits vs from materialised logits, V = 128k.

    python benchmarks/bench_dpo_memory.py            (CPU section always; GPU section where CUDA is)

One DPO step's forward and backward (no optimizer) of a small Llama-style model with Llama 3's
128,256-token vocabulary, on 4 pairs (8 sequences) of 512 tokens: a 384-token prompt and a
128-token answer, the answer's log-probs summed per sequence, the sigmoid DPO loss against fixed
reference log-probs. Three ways to get the log-probs:

  materialised   logits = h·Wᵀ for every position, (8, 512, V), then log_softmax in fp32 and a
                 gather: what TRL's DPOTrainer and most DPO code do
  chunked torch  minisft's CPU path (loss.py): the answer rows only, a chunk of rows' logits at a
                 time under activation checkpointing (recomputed in the backward)
  fused triton   minisft's GPU path: the fused linear log-prob kernel (triton_kernels/cross_entropy.py),
                 chunks of logits turned into their gradient in place (GPU only)

CPU: each variant runs in a subprocess of its own; its peak is the process's resident-set
high-water mark (VmHWM) during the step, reset just before it (/proc/self/clear_refs), minus the
resident set before the step: what the step adds on top of the model and its inputs. GPU: peak
allocated bytes beyond those allocated before the step (torch.cuda.max_memory_allocated).
Times are the median of 3 steps after one warm-up, side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import cpu_facts, markdown_table, save_results  # noqa: E402
from minisft.dpo import DPOConfig, dpo_losses  # noqa: E402
from minisft.labels import IGNORE_INDEX  # noqa: E402
from minisft.model import Backends, ModelConfig, Transformer  # noqa: E402

VOCAB = 128256
PAIRS, PROMPT, ANSWER = 4, 384, 128
MODEL = ModelConfig(vocab_size=VOCAB, dim=512, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=1536, max_seq_len=1024)
VARIANTS = {"cpu": ("materialised", "chunked torch"), "cuda": ("materialised", "fused triton")}


def inputs(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels with the answers trained, reference log-probs) for 2·PAIRS sequences."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2 * PAIRS, PROMPT + ANSWER + 1), generator=gen)
    labels = ids[:, 1:].clone()
    labels[:, : PROMPT - 1] = IGNORE_INDEX
    reference = -torch.rand(2 * PAIRS, generator=gen) * 50 - 600
    return ids[:, :-1].to(device), labels.to(device), reference.to(device)


def materialised_log_probs(model: Transformer, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model.logits(model(input_ids))  # (2P, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return torch.where(labels != IGNORE_INDEX, picked, 0.0).sum(-1)


def step(model: Transformer, variant: str, batch: tuple) -> float:
    """One DPO forward + backward; -> the loss."""
    input_ids, labels, reference = batch
    if variant == "materialised":
        logps = materialised_log_probs(model, input_ids, labels)
    else:
        logps = model.sequence_log_probs(input_ids, labels)
    losses, _, _ = dpo_losses(logps[:PAIRS], logps[PAIRS:], reference[:PAIRS], reference[PAIRS:], DPOConfig())
    loss = losses.mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def build(variant: str, device: str) -> Transformer:
    torch.manual_seed(0)
    backend = "triton" if variant == "fused triton" else "torch"
    return Transformer(MODEL, Backends(attention="torch", loss=backend)).to(device)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(variant: str) -> None:
    """Runs in its own process: one variant's CPU peak and time, printed as JSON."""
    torch.set_num_threads(1)
    model, batch = build(variant, "cpu"), inputs("cpu")
    times = []
    for i in range(4):
        if i == 1:  # after the warm-up: measure the second step's peak
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            before = rss_kib("VmRSS")
        start = time.perf_counter()
        loss = step(model, variant, batch)
        times.append(time.perf_counter() - start)
        if i == 1:
            peak = rss_kib("VmHWM") - before
    print(json.dumps({"variant": variant, "peak_gib": peak / 2**20, "s": statistics.median(times[1:]), "loss": loss}))


def cpu_rows() -> list[dict]:
    rows = []
    for variant in VARIANTS["cpu"]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant], capture_output=True, text=True, check=True
        ).stdout
        rows.append(json.loads(out.splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


def cuda_rows() -> list[dict]:
    rows = []
    for variant in VARIANTS["cuda"]:
        model, batch = build(variant, "cuda"), inputs("cuda")
        step(model, variant, batch)  # warm-up (compiles the kernel)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            loss = step(model, variant, batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30
        rows.append({"variant": variant, "peak_gib": peak, "s": statistics.median(times), "loss": loss})
        print(rows[-1], flush=True)
        del model
    return rows


def table(rows: list[dict]) -> str:
    base = rows[0]
    shown = [
        {
            "variant": r["variant"], "peak GiB (step)": f"{r['peak_gib']:.2f}",
            "vs materialised": f"{r['peak_gib'] / base['peak_gib']:.2f}×", "s / step": f"{r['s']:.2f}",
            "loss": f"{r['loss']:.6f}",
        }
        for r in rows
    ]  # fmt: skip
    return markdown_table(shown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    load_start = os.getloadavg()[0]
    shape = {"vocab": VOCAB, "pairs": PAIRS, "prompt": PROMPT, "answer": ANSWER, "dim": MODEL.dim}
    rows = cpu_rows()
    print(table(rows))
    load = {"load average": f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"}
    save_results("dpo_memory_cpu", cpu_facts() | {"threads": 1} | shape | load, rows, table(rows))
    if torch.cuda.is_available():
        from benchmarks.common import device_facts

        rows = cuda_rows()
        print(table(rows))
        save_results("dpo_memory_gpu", device_facts() | shape, rows, table(rows))
    else:
        print("no CUDA device: the GPU section (fused triton vs materialised) was not run")


if __name__ == "__main__":
    main()
