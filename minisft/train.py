"""The training loop: AdamW, warmup + cosine, gradient accumulation, clipping, bf16 on CUDA.

One optimizer step, top to bottom:
  1. take `grad_accum` micro-batches from the (seeded, reshuffled every epoch) example stream;
  2. count their trained tokens N — the loss normaliser of the whole step (see `loss.py`);
  3. for each micro-batch: loss = Σ token losses / N, backward (gradients add up);
  4. clip the gradient norm, step, zero the gradients;
  5. every `log_every` steps read the loss back (the only CPU-GPU sync), every `eval_every`
     steps evaluate each held-out set; both go to `metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from minisft.chat import Example
from minisft.loss import count_trained_tokens
from minisft.model import Transformer
from minisft.packing import Batch, pack_examples, packed_batch, packing_efficiency, pad_batch

Item = TypeVar("Item")  # what a micro-batch is made of: an Example, or a packed row of them


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 32  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 20  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.1  # on matrices only, never on norms
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    eval_every: int = 50  # steps between held-out evaluations (0: only after the last step)
    eval_batch_size: int = 64
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to lr * min_lr_ratio over the remaining steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - 1 - cfg.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def example_stream(examples: list[Item], batch_size: int, seed: int) -> Iterator[list[Item]]:
    """Endless micro-batches of examples (or packed rows); a fresh seeded shuffle every epoch, a
    short last batch kept."""
    if not examples:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]


def autocast(device: torch.device):
    """bf16 autocast on CUDA (weights and optimizer state stay fp32); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate(model: Transformer, examples: list[Example], pad_id: int, batch_size: int) -> float:
    """Mean loss per trained token over all examples."""
    device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        input_ids, labels = pad_batch(examples[start : start + batch_size], pad_id)
        n = count_trained_tokens(labels)
        with autocast(device):
            total += model.loss(input_ids.to(device), labels.to(device), n).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


class Progress:
    """One status line: redrawn in place on a terminal, printed every log_every steps otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.start = total, label, time.perf_counter()
        self.live = sys.stderr.isatty()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.total - step)
        bar = "#" * (20 * step // self.total)
        line = (
            f"{self.label} [{bar:<20}] {step}/{self.total} | loss {loss:.4f} | "
            f"{tokens_per_s / 1e3:.1f}k tok/s | ETA {int(eta // 60)}:{int(eta % 60):02d}"
        )
        end = "" if self.live and step < self.total else "\n"
        print(("\r" if self.live else "") + line, end=end, file=sys.stderr, flush=True)


def optimizer_step(
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch | tuple[Tensor, Tensor]],
    num_trained: int,
    grad_clip: float,
) -> tuple[Tensor, Tensor]:
    """Accumulate Σ loss / num_trained over the micro-batches, clip, step. -> (loss, grad norm)."""
    device = model.embed_tokens.weight.device
    step_loss = torch.zeros((), device=device)
    for batch in batches:
        # A packed batch brings position and document ids; a padded one (or a bare tuple) has None.
        input_ids, labels, position_ids, document_ids, _ = (None if t is None else t.to(device) for t in Batch(*batch))
        with autocast(device):
            loss = model.loss(input_ids, labels, num_trained, position_ids, document_ids)
        loss.backward()
        step_loss += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


def train_loop(
    model: Transformer,
    train_set: list[Example],
    eval_sets: dict[str, list[Example]],
    cfg: TrainConfig,
    pad_id: int,
    run_dir: str | Path,
    label: str = "train",
    pack_to: int = 0,
) -> dict[str, float]:
    """Train in place; append every logged number to run_dir/metrics.jsonl; return the last eval.

    pack_to=0: each micro-batch is `batch_size` examples, padded. pack_to=N: the training set is
    packed once into rows of N tokens (best-fit decreasing, `packing.py`) and each micro-batch is
    `batch_size` such rows. Packing once is enough: best-fit decreasing is deterministic, so
    repacking every epoch would give the same rows; the rows are reshuffled every epoch instead.

    A step whose batches hold no trained token is skipped — AdamW's decay and momentum would still
    move the weights — and logged, warned about and counted (`skipped_steps` in the result).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    if pack_to:
        rows = pack_examples(train_set, pack_to)
        efficiency = packing_efficiency(rows, pack_to)
        print(
            f"{label}: packed {len(train_set)} examples into {len(rows)} rows of {pack_to} tokens, "
            f"{efficiency:.1%} of them real (packing efficiency)"
        )
        stream = example_stream(rows, cfg.batch_size, cfg.seed)
        collate = lambda rows: packed_batch(rows, pad_id)
    else:
        stream = example_stream(train_set, cfg.batch_size, cfg.seed)
        collate = lambda examples: Batch(*pad_batch(examples, pad_id))
    progress = Progress(cfg.steps, label)
    model.train()
    last_eval: dict[str, float] = {}
    skipped = 0
    tokens_since_log, log_clock = 0, time.perf_counter()
    with open(run_dir / "metrics.jsonl", "a") as metrics:

        def log(record: dict) -> None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

        for step in range(1, cfg.steps + 1):
            batches = [collate(next(stream)) for _ in range(cfg.grad_accum)]
            num_trained = sum(count_trained_tokens(batch.labels) for batch in batches)
            lr = learning_rate(step - 1, cfg)
            if num_trained == 0:
                skipped += 1
                log({"step": step, "skipped": "no trained tokens in this step's batches"})
                print(f"{label}: step {step} skipped: its batches hold no trained token", file=sys.stderr)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss, grad_norm = optimizer_step(model, optimizer, batches, num_trained, cfg.grad_clip)
                tokens_since_log += sum(int((batch.input_ids != pad_id).sum()) for batch in batches)  # pads excluded

            if num_trained and (step % cfg.log_every == 0 or step == cfg.steps):
                now = time.perf_counter()
                tokens_per_s = tokens_since_log / (now - log_clock)
                record = {
                    "step": step,
                    "train_loss": step_loss.item(),  # .item() waits for the GPU: the loop's only sync
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "trained_tokens": num_trained,
                    "tokens_per_s": tokens_per_s,
                }
                log(record)
                progress.update(step, record["train_loss"], tokens_per_s)
                tokens_since_log, log_clock = 0, now
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                last_eval = {
                    name: evaluate(model, examples, pad_id, cfg.eval_batch_size) for name, examples in eval_sets.items()
                }
                log({"step": step, **{f"eval_loss/{name}": value for name, value in last_eval.items()}})
    return last_eval | {"skipped_steps": skipped}
