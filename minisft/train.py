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
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from minisft.chat import Example
from minisft.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint, step_checkpoints
from minisft.distributed import Replica, ranks, sum_across_ranks
from minisft.labels import count_trained_tokens
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
    save_every: int = 100  # steps between checkpoints in run_dir/checkpoints/step_N (0: no checkpoints at all)
    keep_checkpoints: int = 3  # the newest step_N folders kept; checkpoints/best is kept besides them
    max_bad_steps: int = 3  # consecutive steps with a non-finite loss or gradient norm that stop the run
    early_stop_patience: int = 0  # stop after this many evals without a better held-out loss (0: never)
    fsdp: bool = False  # under torchrun, shard parameters, gradients and AdamW state over the ranks (FSDP2)

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "log_every", "eval_batch_size", "keep_checkpoints")
        for name in (*positive, "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "early_stop_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be at least 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")


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

    def __init__(self, total: int, label: str, first_step: int = 1) -> None:
        self.total, self.label, self.first_step, self.start = total, label, first_step, time.perf_counter()
        self.live = sys.stderr.isatty()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / (step - self.first_step + 1) * (self.total - step)
        bar = "#" * (20 * step // self.total)
        line = (
            f"{self.label} [{bar:<20}] {step}/{self.total} | loss {loss:.4f} | "
            f"{tokens_per_s / 1e3:.1f}k tok/s | ETA {int(eta // 60)}:{int(eta % 60):02d}"
        )
        end = "" if self.live and step < self.total else "\n"
        print(("\r" if self.live else "") + line, end=end, file=sys.stderr, flush=True)


class TrainingError(RuntimeError):
    """The run cannot go on as asked; the message says why and what to do, printable as is."""


class DivergedError(TrainingError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class RunState:
    """Where a run stands: everything besides weights, optimizer and RNG that resuming needs."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # taken from the example stream (all ranks together): its position
    best_eval_loss: float | None = None  # on the first eval set
    best_step: int = 0
    evals_since_best: int = 0  # early stopping's count
    bad_steps: int = 0  # consecutive steps with a non-finite loss or gradient norm
    skipped_steps: int = 0  # steps without a trained token


class MetricsLog:
    """metrics.jsonl, one JSON record per line, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.file = open(path, "a") if enabled else None  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop what an interrupted run logged after its checkpoint's step (and a torn last line), so
    the resumed run's records follow on without a duplicate or missing step."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the process died mid-line
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def optimizer_step(
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch | tuple[Tensor, Tensor]],
    num_trained: int,
    grad_clip: float,
    replica: Replica | None = None,
) -> tuple[float, float]:
    """Accumulate Σ loss / num_trained over the micro-batches, clip, step. -> (loss, grad norm).

    A non-finite loss or gradient norm skips the update: the gradients are dropped, the weights
    and AdamW's moments stay as they were. Under torchrun pass the loop's `replica` (one DDP
    wrapper for the whole run); the loss returned is then the global one, summed over ranks.
    """
    device = model.embed_tokens.weight.device
    replica = replica or Replica(model)
    step_loss = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        # A packed batch brings position and document ids; a padded one (or a bare tuple) has None.
        input_ids, labels, position_ids, document_ids, _ = (None if t is None else t.to(device) for t in Batch(*batch))
        with replica.sync_gradients(now=i == len(batches) - 1):
            with autocast(device):
                loss = replica.loss(input_ids, labels, num_trained, position_ids, document_ids)
            # Each rank's loss is its share of the global loss (its token losses / the global N),
            # so the gradient we want is the *sum* over ranks; DDP averages (and so does FSDP2's
            # reduce-scatter), so scale by the ranks.
            (loss * replica.world).backward()
        step_loss += loss.detach()
    step_loss = sum_across_ranks(step_loss)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if isinstance(grad_norm, DTensor):  # FSDP2: the norm over all ranks' gradient shards, replicated
        grad_norm = grad_norm.full_tensor()
    # The step's one CPU-GPU sync: whether to update depends on these two values.
    loss_value, norm_value = torch.stack([step_loss, grad_norm.to(step_loss.dtype)]).tolist()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


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


def batching(train_set: list[Example], pack_to: int, pad_id: int, label: str) -> tuple[list, Callable[[list], Batch]]:
    """-> (the stream's items: examples or packed rows, how a list of them becomes a Batch)."""
    if not pack_to:
        return train_set, lambda examples: Batch(*pad_batch(examples, pad_id))
    rows = pack_examples(train_set, pack_to)
    if ranks().is_main:
        print(
            f"{label}: packed {len(train_set)} examples into {len(rows)} rows of {pack_to} tokens, "
            f"{packing_efficiency(rows, pack_to):.1%} of them real (packing efficiency)"
        )
    return rows, lambda rows: packed_batch(rows, pad_id)


def resume_state(
    checkpoints: Path,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    replica: Replica | None = None,
) -> RunState:
    """Load the newest complete checkpoint into model, optimizer and RNGs; -> its RunState."""
    found = step_checkpoints(checkpoints)
    if not found:
        raise TrainingError(f"nothing to resume: {checkpoints} holds no complete step_N checkpoint")
    load_states = partial(replica.load_full_state, optimizer) if replica is not None and replica.fsdp else None
    saved = load_checkpoint(found[-1], model, optimizer, load_states)
    changed = [
        f"{k} (saved {v!r}, now {getattr(cfg, k)!r})"
        for k, v in saved["train_config"].items()
        if getattr(cfg, k) != v and k != "fsdp"  # the same checkpoint format with and without FSDP2
    ]
    if changed:
        raise TrainingError(
            f"{found[-1]} was trained with other settings: {', '.join(changed)}; an exact resume needs the same"
        )
    state = RunState(**saved["run"])
    print(f"resuming from {found[-1]} (step {state.step})", file=sys.stderr)
    return state


def track_best(state: RunState, losses: dict[str, float]) -> bool:
    """Update the best held-out loss (the first eval set's) and early stopping's count; -> improved?"""
    loss = next(iter(losses.values()))
    if state.best_eval_loss is not None and loss >= state.best_eval_loss:
        state.evals_since_best += 1
        return False
    state.best_eval_loss, state.best_step, state.evals_since_best = loss, state.step, 0
    return True


def report_bad_step(
    step: int, bad: list[str], state: RunState, cfg: TrainConfig, log: MetricsLog, checkpoints: Path
) -> None:
    """Log a skipped non-finite step; after max_bad_steps of them in a row, stop the run."""
    what = " and ".join(bad)
    log.write({"step": step, "skipped": f"non-finite {what}"})
    if ranks().is_main:
        print(f"step {step} skipped: non-finite {what} ({state.bad_steps} in a row)", file=sys.stderr)
    if state.bad_steps >= cfg.max_bad_steps:
        found = step_checkpoints(checkpoints)
        kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved (train.save_every = 0)"
        raise DivergedError(
            f"training diverged: {state.bad_steps} steps in a row had a non-finite {what} (last: step {step}); "
            f"{kept}; lower train.lr, raise train.warmup_steps, or check the data"
        )


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
) -> dict[str, float]:
    """Train in place; append every logged number to run_dir/metrics.jsonl; return the last eval.

    pack_to=0: each micro-batch is `batch_size` examples, padded. pack_to=N: the training set is
    packed once into rows of N tokens (best-fit decreasing, `packing.py`) and each micro-batch is
    `batch_size` such rows. Packing once is enough: best-fit decreasing is deterministic, so
    repacking every epoch would give the same rows; the rows are reshuffled every epoch instead.

    A step whose batches hold no trained token is skipped — AdamW's decay and momentum would still
    move the weights — and logged, warned about and counted (`skipped_steps` in the result).

    With cfg.save_every > 0, checkpoints go to run_dir/checkpoints (`checkpoint.py`; write_extra
    adds files of the caller's to each) and resume=True continues from the newest one exactly: the
    same batches, losses and (on CPU, bitwise) weights as a run never interrupted.
    """
    run_dir, checkpoints, me = Path(run_dir), Path(run_dir) / "checkpoints", ranks()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = model.embed_tokens.weight.device
    torch.manual_seed(cfg.seed)
    replica = Replica(model, cfg.fsdp)  # before the optimizer: FSDP2 replaces the parameters by shards
    optimizer = make_optimizer(model, cfg)
    items, collate = batching(train_set, pack_to, pad_id, label)
    state = resume_state(checkpoints, model, optimizer, cfg, replica) if resume else RunState()
    if resume and me.is_main:
        truncate_metrics(run_dir / "metrics.jsonl", state.step)
    stream = example_stream(items, cfg.batch_size, cfg.seed, skip=state.micro_batches)
    log = MetricsLog(run_dir / "metrics.jsonl", me.is_main)

    def save(folder: Path) -> None:
        states = replica.full_state(optimizer)  # under FSDP2 a collective: every rank takes part
        if me.is_main:
            trainer_state = {"run": asdict(state), "train_config": asdict(cfg)}
            save_checkpoint(folder, model, optimizer, trainer_state, write_extra, states)

    progress = Progress(cfg.steps, label, state.step + 1)
    model.train()
    last_eval: dict[str, float] = {}
    tokens_since_log, log_clock = 0, time.perf_counter()
    for step in range(state.step + 1, cfg.steps + 1):
        # Every rank takes the micro-batches one process with grad_accum × ranks would, and builds its share.
        taken = [next(stream) for _ in range(cfg.grad_accum * me.world)]
        batches = [collate(items) for items in taken[me.rank :: me.world]]
        state.step, state.micro_batches = step, state.micro_batches + len(taken)
        num_trained, num_tokens = count_tokens(batches, pad_id, device)
        lr = learning_rate(step - 1, cfg)
        bad: list[str] = []
        if num_trained == 0:
            state.skipped_steps += 1
            log.write({"step": step, "skipped": "no trained tokens in this step's batches"})
            print(f"{label}: step {step} skipped: its batches hold no trained token", file=sys.stderr)
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = optimizer_step(model, optimizer, batches, num_trained, cfg.grad_clip, replica)
            bad = [name for name, value in (("loss", loss), ("grad_norm", grad_norm)) if not math.isfinite(value)]
            state.bad_steps = state.bad_steps + 1 if bad else 0
            tokens_since_log += num_tokens  # pads excluded
        if bad:
            report_bad_step(step, bad, state, cfg, log, checkpoints)

        if num_trained and not bad and (step % cfg.log_every == 0 or step == cfg.steps):
            now = time.perf_counter()
            tokens_per_s = tokens_since_log / (now - log_clock)
            record = {"step": step, "train_loss": loss, "lr": lr, "grad_norm": grad_norm}
            log.write(record | {"trained_tokens": num_trained, "tokens_per_s": tokens_per_s})
            if me.is_main:
                progress.update(step, loss, tokens_per_s)
            tokens_since_log, log_clock = 0, now
        # Every rank evaluates (the same weights, the same numbers), so all agree on when to stop.
        if eval_sets and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            last_eval = {
                name: evaluate(model, examples, pad_id, cfg.eval_batch_size) for name, examples in eval_sets.items()
            }
            log.write({"step": step, **{f"eval_loss/{name}": value for name, value in last_eval.items()}})
            if track_best(state, last_eval) and cfg.save_every:
                save(checkpoints / "best")
        stop_early = bool(cfg.early_stop_patience) and state.evals_since_best >= cfg.early_stop_patience
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps or stop_early):
            save(checkpoints / f"step_{step}")
            if me.is_main:
                prune_checkpoints(checkpoints, cfg.keep_checkpoints)
        if stop_early:
            log.write({"step": step, "early_stop": f"no better held-out loss in {state.evals_since_best} evals"})
            print(
                f"{label}: early stop at step {step}; the best held-out loss, {state.best_eval_loss:.4f}, "
                f"was at step {state.best_step}",
                file=sys.stderr,
            )
            break
    log.close()
    return last_eval | {"skipped_steps": state.skipped_steps, "last_step": state.step}
