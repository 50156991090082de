"""One SFT optimizer step, end to end: minisft's Triton kernels vs its PyTorch backends (eager and
torch.compile) vs a plain transformers LlamaForCausalLM step, at equal shapes.

    python benchmarks/bench_train_step.py          on a GPU: ~125M and ~1B Llama shapes, vocab 128k
    python benchmarks/bench_train_step.py --cpu    tiny shapes in seconds (what CI runs): checks
                                                   the script, not the speed

A step is forward + backward + AdamW on one micro-batch of packed rows, under bf16 autocast on a GPU.
Rows are packed with SFT-like documents (64 to 1500 tokens); minisft passes position_ids and
document_ids so attention stays inside each document.

MFU = achieved model FLOP/s / the device's dense bf16 peak. Model FLOPs per step are counted from
the config (ModelConfig.flops_per_token, PaLM appendix B): per document of n tokens,
n · (6N + 6·L·d·n) — the 6N of the matmuls plus causal attention over that document only.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minisft.model import Backends, ModelConfig, Transformer  # noqa: E402
from minisft.train import TrainConfig, autocast, make_optimizer  # noqa: E402

SHAPES = {  # Llama-3 proportions, vocabulary 128256
    "~125M body": ModelConfig(vocab_size=128256, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                              max_seq_len=4096, rope_theta=500000.0),
    "~1B (Llama-3.2-1B)": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                                      ffn_dim=8192, max_seq_len=4096, rope_theta=500000.0),
}  # fmt: skip
CPU_SHAPE = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)


def packed_batch(batch: int, seq_len: int, vocab: int, seed: int, device: str) -> dict:
    """Rows filled with documents of 64-1500 tokens (shorter ones when seq_len is small)."""
    rng = random.Random(seed)
    lengths_per_row, tensors = [], {"input_ids": [], "labels": [], "position_ids": [], "document_ids": []}
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq_len:
            lengths.append(min(rng.randint(min(64, seq_len), min(1500, seq_len)), seq_len - sum(lengths)))
        lengths_per_row.append(lengths)
        ids = torch.randint(0, vocab, (seq_len,), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        tensors["input_ids"].append(ids)
        tensors["labels"].append(ids.roll(-1))  # every token trained: the step's cost is what is measured
        tensors["position_ids"].append(torch.cat([torch.arange(n) for n in lengths]))
        tensors["document_ids"].append(torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]))
    batch_tensors = {name: torch.stack(rows).to(device) for name, rows in tensors.items()}
    return batch_tensors | {"lengths": lengths_per_row}


def step_flops(config: ModelConfig, lengths_per_row: list[list[int]]) -> int:
    """Model FLOPs of one training step: Σ over documents of n · flops_per_token(n)."""
    return sum(n * config.flops_per_token(n) for lengths in lengths_per_row for n in lengths)


def minisft_step(config: ModelConfig, kernels: str, compile_model: bool, device: str):
    model = Transformer(config, Backends(kernels, kernels)).to(device)
    optimizer = make_optimizer(model, TrainConfig())
    forward = torch.compile(model.loss) if compile_model else model.loss

    def step(batch: dict) -> None:
        n = int(batch["labels"].numel())
        with autocast(torch.device(device)):
            loss = forward(batch["input_ids"], batch["labels"], n, batch["position_ids"], batch["document_ids"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def transformers_step(config: ModelConfig, device: str):
    """The same step with transformers' LlamaForCausalLM (SDPA attention, its own loss).
    It gets position_ids but no document mask: its attention is plain causal over the row."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(hf_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(batch: dict) -> None:
        with autocast(torch.device(device)):
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["input_ids"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_step(step, batch: dict, device: str, repeats: int) -> float:
    """Seconds per step, after two warm-up steps (compilation, allocator, autotuning)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        step(batch)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step(batch)
    sync()
    return (time.perf_counter() - start) / repeats


def largest_batch(make, config: ModelConfig, seq_len: int, limit: int = 64) -> int:
    """Doubling search for the most rows per micro-batch whose step fits in GPU memory."""
    fits, rows = 0, 1
    while rows <= limit:
        try:
            make(config)(packed_batch(rows, seq_len, config.vocab_size, seed=1, device="cuda"))
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        fits, rows = rows, rows * 2
    return fits


def implementations(device: str) -> dict:
    impls = {
        "minisft triton": lambda cfg: minisft_step(cfg, "triton", False, device),
        "minisft torch": lambda cfg: minisft_step(cfg, "torch", False, device),
        "minisft torch.compile": lambda cfg: minisft_step(cfg, "torch", True, device),
    }
    if device == "cpu":  # the Triton kernels need a GPU; compiling takes longer than the run
        del impls["minisft triton"], impls["minisft torch.compile"]
    try:
        import transformers  # noqa: F401

        impls["transformers Llama"] = lambda cfg: transformers_step(cfg, device)
    except ImportError:
        pass
    return impls


def run(shapes: dict[str, ModelConfig], seq_lens: tuple[int, ...], batch: int, device: str, peak: float | None):
    rows = []
    for shape_name, config in shapes.items():
        for seq_len in seq_lens:
            data = packed_batch(batch, seq_len, config.vocab_size, seed=0, device=device)
            flops = step_flops(config, data["lengths"])
            for impl, make in implementations(device).items():
                row = {"model": shape_name, "seq": seq_len, "batch": batch, "impl": impl}
                try:
                    if device == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    seconds = time_step(make(config), data, device, repeats=3 if device == "cuda" else 1)
                except torch.OutOfMemoryError:
                    rows.append(row | {"tokens/s": "OOM"})
                    continue
                row["tokens/s"] = round(batch * seq_len / seconds)
                row["TFLOP/s"] = round(flops / seconds / 1e12, 4 if device == "cpu" else 1)
                if peak:
                    row["MFU %"] = round(100 * flops / seconds / 1e12 / peak, 1)
                if device == "cuda":
                    row["peak GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
                    row["max batch"] = largest_batch(make, config, seq_len)
                rows.append(row)
                print(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU: checks the script, not speed")
    parser.add_argument("--batch", type=int, default=None, help="rows per micro-batch (default: 8 on GPU)")
    args = parser.parse_args()
    if args.cpu:
        rows = run({"tiny": CPU_SHAPE}, (128,), args.batch or 2, "cpu", None)
        print(f"cpu mode: {len(rows)} implementations ran; timings on a CPU say nothing about the kernels")
        return
    from benchmarks.common import device_facts, markdown_table, require_cuda, save_results

    require_cuda("bench_train_step")
    facts = device_facts()
    print(facts)
    rows = run(SHAPES, (2048, 4096), args.batch or 8, "cuda", facts["bf16_peak_tflops"])
    table = markdown_table(rows)
    print(table)
    save_results("train_step", facts, rows, table)


if __name__ == "__main__":
    main()
