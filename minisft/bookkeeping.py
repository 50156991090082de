"""A run's bookkeeping, beside the loop in `train.py`: everything a step does besides the maths.

    RunState      where the run stands (step, data position, best held-out loss, bad-step count)
    MetricsLog    metrics.jsonl, one JSON record per line, written by rank 0
    Progress      the status line on stderr, with elapsed time and ETA
    Bookkeeper    uses the three: logs a step, an eval, a skip; saves checkpoints (step_N, best);
                  stops the run after too many non-finite steps or evals without improvement;
                  resumes from the newest checkpoint

Nothing here changes a weight: the loop decides what to compute, this module what to remember.

The console (stderr, rank 0) says what is happening: a line before step 1 (which can take a while
on a CPU) and a warning when the whole run is warmup; then a progress line every `log_every`
steps, each held-out loss, each checkpoint saved. metrics.jsonl holds the numbers, among them
`tokens_per_s` (real tokens, pads excluded) and `mfu` (model FLOPs utilisation, `flops.py`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from minisft.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint, step_checkpoints, step_number
from minisft.distributed import Replica, ranks
from minisft.errors import CheckpointError, DivergedError, TrainingError, UnreadableFileError
from minisft.flops import peak_flops
from minisft.integrity import finite_weights, run_state, write_atomically
from minisft.model import Transformer

if TYPE_CHECKING:  # train.py imports this module
    from minisft.train import TrainConfig


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
    write_atomically(path, lambda tmp: Path(tmp).write_text("".join(kept)))  # a crash now keeps the old log


def clock(seconds: float) -> str:
    """1:05, or 1:02:05 past an hour."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def per_second(count: float, unit: str) -> str:
    """850 tok/s, 3.8k tok/s, 1.25M tok/s: never 0.0k."""
    if count >= 1e6:
        return f"{count / 1e6:.2f}M {unit}/s"
    return f"{count / 1e3:.1f}k {unit}/s" if count >= 1e3 else f"{count:.0f} {unit}/s"


class Progress:
    """One status line on stderr: redrawn in place on a terminal, a line per update otherwise."""

    def __init__(self, total: int, label: str, first: int = 1) -> None:
        self.total, self.label, self.first, self.start = total, label, first, time.perf_counter()
        self.live, self.drawn = sys.stderr.isatty(), False

    def update(self, done: int, details: str = "") -> None:
        """`done` of `total` finished (counting from `first`); details go between the count and the times."""
        elapsed = time.perf_counter() - self.start
        eta = elapsed / (done - self.first + 1) * (self.total - done)
        bar = "#" * (20 * done // self.total)
        line = f"{self.label} [{bar:<20}] {done}/{self.total}" + (f" | {details}" if details else "")
        line += f" | {clock(elapsed)} elapsed, ETA {clock(eta)}"
        self.drawn = self.live and done < self.total
        print(("\r" if self.live else "") + line, end="" if self.drawn else "\n", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line of its own, below a status line still being redrawn."""
        print(("\n" if self.drawn else "") + text, file=sys.stderr, flush=True)
        self.drawn = False


def resume_state(
    checkpoints: Path,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    replica: Replica | None = None,
) -> RunState:
    """Load the newest complete checkpoint into model, optimizer and RNGs; -> its RunState. One whose
    files cannot be read (truncated, corrupt) is passed over for the one before, with a note; one
    readable but wrong (a hand-edited trainer_state.json) is an error naming the key."""
    found = step_checkpoints(checkpoints)
    if not found:
        raise TrainingError(f"nothing to resume: {checkpoints} holds no complete step_N checkpoint")
    load_states = partial(replica.load_full_state, optimizer) if replica is not None and replica.fsdp else None
    for folder in reversed(found):
        try:
            saved = load_checkpoint(folder, model, optimizer, load_states)
            break
        except UnreadableFileError as err:
            if folder == found[0]:
                raise TrainingError(f"{err}; and no older checkpoint is left to resume from") from None
            if ranks().is_main:
                print(f"note: {err}; resuming from the checkpoint before it", file=sys.stderr)
    state_file = folder / "trainer_state.json"
    run = run_state(saved, {f.name: f.default for f in fields(RunState)}, state_file, step_number(folder))
    check_same_settings(saved.get("train_config"), cfg, folder)
    state = RunState(**run)
    print(f"resuming from {folder} (step {state.step})", file=sys.stderr)
    return state


def check_same_settings(saved: object, cfg: TrainConfig, folder: Path) -> None:
    """An exact resume needs the checkpoint's train settings; train.steps alone may be raised (the
    cosine then stretches over the new total), and fsdp may differ (one checkpoint format)."""
    names = {f.name for f in fields(cfg)}  # a key added since the checkpoint was written is not compared
    if not isinstance(saved, dict) or not isinstance(saved.get("steps"), int) or not set(saved) <= names:
        raise CheckpointError(f"{folder / 'trainer_state.json'}: 'train_config' must hold [train] keys: restore it")
    if cfg.steps < saved["steps"]:
        raise TrainingError(f"train.steps can only be raised on resume: {folder} was trained toward {saved['steps']}")
    changed = [
        f"{k} (saved {v!r}, now {getattr(cfg, k)!r})"
        for k, v in saved.items()
        if getattr(cfg, k) != v and k not in ("fsdp", "steps")
    ]
    if changed:
        raise TrainingError(
            f"{folder} was trained with other settings: {', '.join(changed)}; an exact resume needs the same"
        )
    if cfg.steps > saved["steps"] and ranks().is_main:
        print(
            f"note: train.steps raised from {saved['steps']} to {cfg.steps}: the learning rate follows the "
            f"schedule of a {cfg.steps}-step run from here on (warmup as before, the cosine stretched)",
            file=sys.stderr,
        )


class Bookkeeper:
    """What the loop in train.py remembers, writes and prints about the run in run_dir (created
    if missing); with resume=True it first loads the newest checkpoint into model and optimizer.
    write_extra adds the caller's files to every checkpoint."""

    def __init__(
        self,
        run_dir: Path,
        cfg: TrainConfig,
        label: str,
        replica: Replica,
        optimizer: torch.optim.Optimizer,
        resume: bool = False,
        write_extra: Callable[[Path], None] | None = None,
    ) -> None:
        self.run_dir, self.checkpoints = run_dir, run_dir / "checkpoints"
        self.cfg, self.label, self.write_extra = cfg, label, write_extra
        self.replica, self.optimizer = replica, optimizer
        self.is_main = ranks().is_main
        run_dir.mkdir(parents=True, exist_ok=True)
        self.state = RunState()
        if resume:
            self.state = resume_state(self.checkpoints, replica.model, optimizer, cfg, replica)
            if self.is_main:
                truncate_metrics(run_dir / "metrics.jsonl", self.state.step)
        self.log = MetricsLog(run_dir / "metrics.jsonl", self.is_main)
        model = replica.model
        self.flops_per_token, self.peak = model.config.flops_per_token, peak_flops(model.embed_tokens.weight.device)
        self.progress = Progress(cfg.steps, label, self.state.step + 1)
        self.announce()
        self.tokens_since_log, self.flops_since_log, self.log_clock = 0, 0, time.perf_counter()

    def say(self, text: str) -> None:
        """A console line, from rank 0 only."""
        if self.is_main:
            self.progress.note(text)

    def announce(self) -> None:
        """What is about to happen, before a first step that can take a while on a CPU."""
        cfg, first = self.cfg, self.state.step + 1
        if first > cfg.steps:
            return
        per_step = f"{cfg.batch_size}" + (f" × {cfg.grad_accum} micro-batches" if cfg.grad_accum > 1 else "")
        self.say(
            f"{self.label}: steps {first}-{cfg.steps}, {per_step} examples (or packed rows) each, peak lr {cfg.lr:g} "
            f"after {cfg.warmup_steps} warmup steps; a progress line every {cfg.log_every} steps"
        )
        if cfg.warmup_steps >= cfg.steps:
            top = cfg.lr * cfg.steps / cfg.warmup_steps  # learning_rate at the last step, still in warmup
            reach = "reaches train.lr at the last step" if top == cfg.lr else f"never reaches train.lr = {cfg.lr:g}"
            self.say(
                f"{self.label}: warning: the whole run is warmup (train.warmup_steps = {cfg.warmup_steps} ≥ "
                f"train.steps = {cfg.steps}): the learning rate climbs to {top:g}, {reach}, and never decays"
            )

    def begin_step(self, step: int, micro_batches: int) -> None:
        self.state.step, self.state.micro_batches = step, self.state.micro_batches + micro_batches

    def skip_empty_step(self) -> None:
        """A step whose batches hold no trained token is not taken: logged, warned about, counted."""
        self.state.skipped_steps += 1
        self.log.write({"step": self.state.step, "skipped": "no trained tokens in this step's batches"})
        self.progress.note(f"{self.label}: step {self.state.step} skipped: its batches hold no trained token")

    def stepped(
        self, loss: float, grad_norm: float, lr: float, num_trained: int, num_tokens: int, width: int, stats=None
    ) -> None:
        """After an optimizer step over num_tokens real tokens in rows of `width`: the NaN guard, then
        every log_every steps a metrics record (with the objective's `stats`) and the progress line."""
        step, cfg = self.state.step, self.cfg
        bad = [name for name, value in (("loss", loss), ("grad_norm", grad_norm)) if not math.isfinite(value)]
        self.state.bad_steps = self.state.bad_steps + 1 if bad else 0
        self.tokens_since_log += num_tokens  # pads excluded
        self.flops_since_log += num_tokens * self.flops_per_token(width)  # attention at the row width
        if bad:
            self.report_bad_step(bad)
        elif step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            tokens_per_s = self.tokens_since_log / (now - self.log_clock)
            record = {"step": step, "train_loss": loss, "lr": lr, "grad_norm": grad_norm}
            record |= {"trained_tokens": num_trained, "tokens_per_s": tokens_per_s} | (stats or {})
            if self.peak:  # every rank's device counts toward the peak
                record["mfu"] = self.flops_since_log / (now - self.log_clock) / (self.peak * ranks().world)
            self.log.write(record)
            if self.is_main:
                self.progress.update(step, f"loss {loss:.4f} | {per_second(tokens_per_s, 'tok')}")
            self.tokens_since_log, self.flops_since_log, self.log_clock = 0, 0, now

    def report_bad_step(self, bad: list[str]) -> None:
        """Log a skipped non-finite step; after max_bad_steps of them in a row, stop the run."""
        step, state, what = self.state.step, self.state, " and ".join(bad)
        self.log.write({"step": step, "skipped": f"non-finite {what}"})
        self.say(f"step {step} skipped: non-finite {what} ({state.bad_steps} in a row)")
        if state.bad_steps >= self.cfg.max_bad_steps:
            # "Good" means finite weights: an overflowing update (a huge lr) can save inf before any
            # loss or gradient norm turns non-finite.
            good = [path for path in step_checkpoints(self.checkpoints) if finite_weights(path)]
            none = "no checkpoint with finite weights was saved"
            none = none if self.cfg.save_every else "no checkpoint was saved (train.save_every = 0)"
            kept = f"the last good checkpoint is {good[-1]}" if good else none
            raise DivergedError(
                f"training diverged: {state.bad_steps} steps in a row had a non-finite {what} (last: step {step}); "
                f"{kept}; lower train.lr, raise train.warmup_steps, or check the data"
            )

    def evaluated(self, losses: dict[str, float], extra: dict[str, float] | None = None) -> None:
        """Log held-out losses (and the objective's other held-out numbers, `extra`); a new best (on
        the first eval set) is saved as checkpoints/best."""
        record = {"step": self.state.step, **{f"eval_loss/{name}": value for name, value in losses.items()}}
        self.log.write(record | (extra or {}))
        improved = self.track_best(losses)
        shown = ", ".join(f"{name} {value:.4f}" for name, value in losses.items())
        self.say(f"{self.label}: step {self.state.step} held-out loss {shown}" + (" (best so far)" if improved else ""))
        if improved and self.cfg.save_every:
            self.save(self.checkpoints / "best")

    def track_best(self, losses: dict[str, float]) -> bool:
        """Update the best held-out loss (the first eval set's) and early stopping's count; -> improved?"""
        state, loss = self.state, next(iter(losses.values()))
        if state.best_eval_loss is not None and loss >= state.best_eval_loss:
            state.evals_since_best += 1
            return False
        state.best_eval_loss, state.best_step, state.evals_since_best = loss, state.step, 0
        return True

    def should_stop_early(self) -> bool:
        patience = self.cfg.early_stop_patience
        return bool(patience) and self.state.evals_since_best >= patience

    def save_step(self) -> None:
        """checkpoints/step_N, keeping the newest keep_checkpoints of them."""
        self.save(self.checkpoints / f"step_{self.state.step}")
        if self.is_main:
            prune_checkpoints(self.checkpoints, self.cfg.keep_checkpoints)

    def save(self, folder: Path) -> None:
        states = self.replica.full_state(self.optimizer)  # under FSDP2 a collective: every rank takes part
        if self.is_main:
            trainer_state = {"run": asdict(self.state), "train_config": asdict(self.cfg)}
            save_checkpoint(folder, self.replica.model, self.optimizer, trainer_state, self.write_extra, states)
            self.say(f"{self.label}: saved {folder}")

    def stop_early(self) -> None:
        state = self.state
        self.log.write({"step": state.step, "early_stop": f"no better held-out loss in {state.evals_since_best} evals"})
        self.progress.note(
            f"{self.label}: early stop at step {state.step}; the best held-out loss, {state.best_eval_loss:.4f}, "
            f"was at step {state.best_step}"
        )

    def close(self) -> None:
        self.log.close()
