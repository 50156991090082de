"""The training loop: AdamW, warmup + cosine, gradient accumulation, clipping, bf16 on CUDA.

One optimizer step, top to bottom:
  1. take `grad_accum` micro-batches from the (seeded, reshuffled every epoch) example stream —
     under torchrun, grad_accum × ranks of them, each rank building its own share;
  2. count their trained tokens N over all ranks — the loss normaliser of the step (`loss.py`);
  3. for each micro-batch: loss = Σ token losses / N, backward (gradients add up);
  4. clip the gradient norm; read loss and norm back (the one CPU-GPU sync of a step): if either
     is not finite, drop the gradients instead of stepping (the NaN guard), else step;
  5. every `log_every` steps log the loss, every `eval_every` steps evaluate each held-out set
     (the first one picks checkpoints/best and drives early stopping), every `save_every` steps
     write a checkpoint that `resume=True` continues from exactly.

This file holds the maths of a step and the loop's control flow; what the run remembers, writes
and prints (metrics, checkpoints, resume, the NaN guard's count, progress) is `bookkeeping.py`'s,
and what builds a run from a config (model, data, run folder) is `recipe.py`'s.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from minisft.bookkeeping import Bookkeeper
from minisft.chat import Example
from minisft.distributed import Replica, is_sharded, ranks, sum_across_ranks
from minisft.labels import count_trained_tokens
from minisft.model import Transformer
from minisft.packing import Batch, pack_examples, packed_batch, packing_efficiency, pad_batch

PRECISIONS = ("auto", "bf16", "fp32")
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
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    eval_every: int = 50  # steps between held-out evaluations (0: only after the last step)
    eval_batch_size: int = 64  # examples per held-out forward pass
    log_every: int = 10  # steps between metrics.jsonl records and progress lines
    seed: int = 0  # seeds the weight init and the data order: two runs with one seed train alike
    save_every: int = 100  # steps between checkpoints in run_dir/checkpoints/step_N (0: no checkpoints at all)
    keep_checkpoints: int = 3  # the newest step_N folders kept; checkpoints/best is kept besides them
    max_bad_steps: int = 3  # consecutive steps with a non-finite loss or gradient norm that stop the run
    early_stop_patience: int = 0  # stop after this many evals without a better held-out loss (0: never)
    fsdp: bool = False  # under torchrun, shard parameters, gradients and AdamW state over the ranks (FSDP2)
    # CPU threads torch uses from the start of the loop on (0: torch's default, one per core). One is
    # the safe default on a shared machine: each op's threads wait at its barrier for the slowest, so
    # a core busy with other work made the default 7-15× slower (benchmarks/bench_threads.py).
    threads: int = 1
    # Matmuls under bf16 autocast (weights and AdamW state stay fp32): "auto" on CUDA only, "bf16"
    # on a CPU too (~1.7x faster where it has AMX or AVX-512 bf16), "fp32" never.
    precision: str = "auto"
    # Recompute each block's activations in the backward instead of keeping them (Chen et al. 2016):
    # about a third more compute; activation memory down to one block's plus the residual stream.
    activation_checkpointing: bool = False
    # λ of a pull toward the model as it started, against forgetting: SFT's loss + λ · KL(base ‖ model)
    # on the prompts' tokens, the ones SFT does not train (base_kl.py; 0: off). SFT only.
    base_kl: float = 0.0
    # The base's distributions are kept as their k likeliest tokens plus the rest's mass, computed once
    # before the first step: 8k + 4 bytes per prompt token, in CPU memory (the vocabulary size: exact).
    base_kl_top_k: int = 64
    # Pull on one prompt position in n (each item's columns t ≡ its phase mod n): the base's pass and
    # each step's pull cost ~1/n as much in their LM head and KL; the body's forward stays.
    base_kl_every: int = 1

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "log_every", "eval_batch_size", "keep_checkpoints")
        for name in (*positive, "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "early_stop_patience", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be at least 0, got {getattr(self, name)}")
        if self.base_kl < 0:
            raise ValueError(f"train.base_kl must be at least 0 (0: off), got {self.base_kl}")
        if self.base_kl_top_k < 1:
            raise ValueError(f"train.base_kl_top_k must be at least 1, got {self.base_kl_top_k}")
        if self.base_kl_top_k != 64 and not self.base_kl:
            raise ValueError("train.base_kl_top_k does nothing without train.base_kl > 0")
        if self.base_kl_every < 1:
            raise ValueError(f"train.base_kl_every must be at least 1, got {self.base_kl_every}")
        if self.base_kl_every != 1 and not self.base_kl:
            raise ValueError("train.base_kl_every does nothing without train.base_kl > 0")
        if self.base_kl and self.fsdp:
            raise ValueError("train.base_kl with train.fsdp is not supported: the base's forward is not sharded")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to lr * min_lr_ratio over the remaining steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - 1 - cfg.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def example_stream(examples: list[Item], batch_size: int, seed: int, skip: int = 0) -> Iterator[list[Item]]:
    """Endless micro-batches of examples (or packed rows); a fresh seeded shuffle every epoch, a
    short last batch kept.

    The stream's position is the number of micro-batches taken so far: `skip` of them are passed
    over without being built, so a resumed run goes on exactly where the interrupted one stopped.
    """
    if not examples:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    per_epoch = -(-len(examples) // batch_size)
    epochs_done, batches_done = divmod(skip, per_epoch)
    for epoch in itertools.count():
        order = list(range(len(examples)))
        rng.shuffle(order)  # replayed for skipped epochs too: each epoch's order depends on the ones before
        if epoch < epochs_done:
            continue
        first = batches_done * batch_size if epoch == epochs_done else 0
        for start in range(first, len(order), batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast around a forward pass (weights and optimizer state stay fp32): on CUDA unless
    precision is "fp32", on a CPU when it is "bf16". Never around an optimizer step: autocast keeps
    the bf16 copy of each weight it made until the context closes, so weights updated inside it
    would be read stale."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_precision() -> str:
    """The precision that pays on this CPU: bf16 where it has bf16 matrix instructions (AVX-512 BF16
    or AMX: ~1.7x faster matmuls than fp32, measured on an Intel Xeon), else fp32 — without them
    oneDNN emulates bf16, 6x slower than fp32 on an AVX2-only AMD EPYC (measured). oneDNN's own
    "bf16 supported" is true on any AVX-512 CPU, emulation included, so it is not asked."""
    return "bf16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "fp32"


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate(
    model: Transformer, examples: list[Example], pad_id: int, batch_size: int, precision: str = "auto"
) -> float:
    """Mean loss per trained token over all examples."""
    device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        input_ids, labels = pad_batch(examples[start : start + batch_size], pad_id)
        n = count_trained_tokens(labels)
        with autocast(device, precision):
            total += model.loss(input_ids.to(device), labels.to(device), n).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def optimizer_step(
    replica: Replica,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    num_trained: int,
    grad_clip: float,
    precision: str = "auto",
    objective: Objective | None = None,
) -> tuple[float, float, dict[str, float]]:
    """Accumulate Σ loss / num_trained over the micro-batches, clip, step. -> (loss, grad norm, the
    objective's step statistics, each summed over the micro-batches and ranks).

    A non-finite loss or gradient norm skips the update: the gradients are dropped, the weights
    and AdamW's moments stay as they were. `replica` is the model as this rank trains it (one for
    the whole run: under torchrun it holds the DDP wrapper); the loss returned is the global one,
    summed over ranks. `objective` is SFT's token loss unless given (DPO's: dpo.py), and
    num_trained its normaliser (trained tokens for SFT, pairs for DPO).
    """
    objective = objective or Objective()
    model = replica.model
    device = model.embed_tokens.weight.device
    sums = torch.zeros(1 + len(objective.stats), device=device)  # the loss, then the objective's statistics
    for i, batch in enumerate(batches):
        batch = type(batch)(*(None if t is None else t.to(device) for t in batch))  # a padded batch has no packing ids
        with replica.sync_gradients(now=i == len(batches) - 1):
            with autocast(device, precision):
                loss, stats = objective.loss(replica, batch, num_trained)
            # Each rank's loss is its share of the global loss (its token losses / the global N),
            # so the gradient we want is the *sum* over ranks; DDP averages (and so does FSDP2's
            # reduce-scatter), so scale by the ranks.
            (loss * replica.world).backward()
        sums += torch.stack([loss.detach().float(), *stats])
    sums = sum_across_ranks(sums)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if is_sharded(grad_norm):  # FSDP2: the norm over all ranks' gradient shards, replicated
        grad_norm = grad_norm.full_tensor()
    # The step's one CPU-GPU sync: whether to update depends on the loss and the norm.
    loss_value, *stat_values, norm_value = torch.cat([sums, grad_norm.to(sums.dtype).reshape(1)]).tolist()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value, dict(zip(objective.stats, stat_values, strict=True))


def count_tokens(batches: list[Batch], pad_id: int, device: torch.device) -> tuple[int, int]:
    """(trained tokens, real tokens) in this step's batches on all ranks: N and the throughput."""
    counts = [
        sum(count_trained_tokens(b.labels) for b in batches),
        sum(int((b.input_ids != pad_id).sum()) for b in batches),
    ]
    if ranks().world == 1:
        return counts[0], counts[1]
    trained, real = sum_across_ranks(torch.tensor(counts, device=device)).tolist()  # a sync, under torchrun only
    return trained, real


def collate(items: list[Example] | list[list[Example]], pad_id: int) -> Batch:
    """A micro-batch's items -> a Batch: examples are right-padded, packed rows (lists of examples) packed."""
    if isinstance(items[0], Example):
        return Batch(*pad_batch(items, pad_id))
    return packed_batch(items, pad_id)


class Objective:
    """What a step minimises, and how its micro-batches are made: SFT's masked token loss here;
    DPO's pair loss in dpo.py overrides each method. `stats` names what `loss` returns besides
    the loss (the micro-batch's share of a step's number: summed over micro-batches and ranks, the
    step's), logged every log_every steps."""

    stats: tuple[str, ...] = ()

    def collate(self, items: list, pad_id: int) -> Batch:
        return collate(items, pad_id)

    def count(self, batches: list[Batch], pad_id: int, device: torch.device) -> tuple[int, int, int]:
        """-> (the loss's normaliser, trained tokens, real tokens) over the step's batches on all ranks."""
        trained, real = count_tokens(batches, pad_id, device)
        return trained, trained, real

    def loss(self, replica: Replica, batch: Batch, normaliser: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return replica.loss(batch.input_ids, batch.labels, normaliser, batch.position_ids, batch.document_ids), []

    def evaluate(
        self, model: Transformer, items: list, pad_id: int, batch_size: int, precision: str
    ) -> dict[str, float]:
        """-> {"": held-out loss} and any other held-out number, by name."""
        return {"": evaluate(model, items, pad_id, batch_size, precision)}


def stream_items(train_set: list[Example], pack_to: int, label: str) -> list[Example] | list[list[Example]]:
    """What the example stream shuffles and batches: the examples themselves, or (pack_to > 0)
    packed rows of pack_to tokens."""
    if not pack_to:
        return train_set
    rows = pack_examples(train_set, pack_to)
    if ranks().is_main:
        print(
            f"{label}: packed {len(train_set)} examples into {len(rows)} rows of {pack_to} tokens, "
            f"{packing_efficiency(rows, pack_to):.1%} of them real (packing efficiency)"
        )
    return rows


def train_loop(
    model: Transformer,
    train_set: list[Example],
    eval_sets: dict[str, list[Example]],
    cfg: TrainConfig,
    pad_id: int,
    run_dir: str | Path,
    label: str = "train",
    pack_to: int = 0,
    resume: bool = False,
    write_extra: Callable[[Path], None] | None = None,
    objective: Objective | None = None,
) -> dict[str, float]:
    """Train in place; append every logged number to run_dir/metrics.jsonl; return the last eval (and
    with train.base_kl, the seconds its base's distributions took).

    pack_to=0: each micro-batch is `batch_size` examples, padded. pack_to=N: the training set is
    packed once into rows of N tokens (best-fit decreasing, `packing.py`) and each micro-batch is
    `batch_size` such rows. Packing once is enough: best-fit decreasing is deterministic, so
    repacking every epoch would give the same rows; the rows are reshuffled every epoch instead.

    A step whose batches hold no trained token is skipped — AdamW's decay and momentum would still
    move the weights — and logged, warned about and counted (`skipped_steps` in the result).

    With cfg.save_every > 0, checkpoints go to run_dir/checkpoints (`checkpoint.py`; write_extra
    adds files of the caller's to each) and resume=True continues from the newest one exactly: the
    same batches, losses and (on CPU, bitwise) weights as a run never interrupted. Logging, eval
    bookkeeping, checkpoints and the NaN guard are `bookkeeping.py`'s. `objective` is SFT's
    unless given (DPO: `dpo.py`); items are then whatever it collates. cfg.base_kl > 0 adds SFT's
    pull toward the model as it is when the loop starts (`base_kl.py`): its distributions over the
    training set are computed first, before any checkpoint is restored.
    """
    if cfg.base_kl and objective is not None:
        raise ValueError("train.base_kl adds to SFT's token loss, not to another objective's")
    me, device = ranks(), model.embed_tokens.weight.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # for the rest of the process, evaluation and generation too
    model.checkpoint_blocks = cfg.activation_checkpointing
    torch.manual_seed(cfg.seed)
    replica = Replica(model, cfg.fsdp)  # before the optimizer: FSDP2 replaces the parameters by shards
    items = stream_items(train_set, pack_to, label)
    if cfg.base_kl:  # after DDP's broadcast (every rank's base is rank 0's), before a resume's restore
        from minisft.base_kl import BaseKL  # here, not at the top: base_kl.py builds on this file's Objective

        objective = BaseKL(cfg.base_kl, pad_id, cfg.base_kl_every)
        items = objective.with_base(model, items, cfg, label)
    objective = objective or Objective()
    optimizer = make_optimizer(model, cfg)
    books = Bookkeeper(Path(run_dir), cfg, label, replica, optimizer, resume, write_extra)
    stream = example_stream(items, cfg.batch_size, cfg.seed, skip=books.state.micro_batches)
    model.train()
    last_eval: dict[str, float] = {}
    for step in range(books.state.step + 1, cfg.steps + 1):
        # Every rank takes the micro-batches one process with grad_accum × ranks would, and builds its share.
        taken = [next(stream) for _ in range(cfg.grad_accum * me.world)]
        batches = [objective.collate(micro, pad_id) for micro in taken[me.rank :: me.world]]
        books.begin_step(step, len(taken))
        normaliser, num_trained, num_tokens = objective.count(batches, pad_id, device)
        if num_trained == 0:
            books.skip_empty_step()
        else:
            lr = learning_rate(step - 1, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm, stats = optimizer_step(
                replica, optimizer, batches, normaliser, cfg.grad_clip, cfg.precision, objective
            )
            width = max(b.input_ids.shape[1] for b in batches)
            books.stepped(loss, grad_norm, lr, num_trained, num_tokens, width, stats)  # raises DivergedError
        # Every rank evaluates (the same weights, the same numbers), so all agree on when to stop.
        if eval_sets and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            found = {
                name: objective.evaluate(model, ex, pad_id, cfg.eval_batch_size, cfg.precision)
                for name, ex in eval_sets.items()
            }
            last_eval = {name: values[""] for name, values in found.items()}
            books.evaluated(
                last_eval, {f"{what}/{name}": v for name, vs in found.items() for what, v in vs.items() if what}
            )
        stop_early = books.should_stop_early()
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps or stop_early):
            books.save_step()
        if stop_early:
            books.stop_early()
            break
    books.close()
    result = last_eval | {"skipped_steps": books.state.skipped_steps, "last_step": books.state.step}
    return result | ({"base_kl_seconds": objective.seconds} if cfg.base_kl else {})
