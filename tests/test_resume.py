"""Checkpoints and exact resume: an interrupted run, resumed, is the run that was never interrupted —
the same metrics, bitwise the same weights on the CPU — even when killed in the middle of a save."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_parts import tiny_model

import minisft.train
from minisft.chat import Example
from minisft.checkpoint import load_checkpoint, load_model, step_checkpoints
from minisft.errors import TrainingError
from minisft.train import TrainConfig, example_stream, make_optimizer, train_loop

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent


def copy_examples(n: int, seed: int) -> list[Example]:
    """[1, x.., 2] -> x.., 3 with 2 to 6 xs (so packing has work to do); only the answer trained."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        xs = [rng.randrange(4, 12) for _ in range(rng.randint(2, 6))]
        ids = [1, *xs, 2, *xs, 3]
        labels = [token if t >= len(xs) + 1 else -100 for t, token in enumerate(ids[1:])]
        examples.append(Example(ids[:-1], labels))
    return examples


CFG = TrainConfig(
    steps=12, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=2, eval_every=4, log_every=1, save_every=4,
    keep_checkpoints=2, eval_batch_size=16,
)  # fmt: skip
TRAIN, HELDOUT = copy_examples(30, seed=0), copy_examples(16, seed=1)


def run(run_dir: Path, pack_to: int, resume: bool = False, seed: int = 0, cfg: TrainConfig = CFG):
    model = tiny_model(vocab_size=16, max_seq_len=32, seed=seed)
    train_loop(model, TRAIN, {"heldout": HELDOUT}, cfg, 0, run_dir, "test", pack_to, resume)
    return model


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the fields that depend on the clock."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu")} for line in lines]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


class Crash(Exception):
    pass


def crash_at_step(monkeypatch, step: int) -> None:
    """The process dies at the start of optimizer step `step` (a power cut, a pre-empted node)."""
    calls = iter(range(1, 10**6))
    real_step = minisft.train.optimizer_step

    def optimizer_step(*args, **kwargs):
        if next(calls) == step:
            raise Crash
        return real_step(*args, **kwargs)

    monkeypatch.setattr(minisft.train, "optimizer_step", optimizer_step)


def test_example_stream_skip_continues_where_it_stopped():
    examples = list(range(10))
    whole = example_stream(examples, batch_size=4, seed=3)
    batches = [next(whole) for _ in range(11)]  # almost four epochs of 3 batches, the last one short
    for skip in range(11):
        resumed = example_stream(examples, batch_size=4, seed=3, skip=skip)
        assert [next(resumed) for _ in range(11 - skip)] == batches[skip:], skip


@pytest.mark.parametrize("pack_to", [0, 32], ids=["padded", "packed"])
def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, pack_to):
    straight = run(tmp_path / "straight", pack_to)

    with monkeypatch.context() as patch:
        crash_at_step(patch, 7)  # after the step-4 checkpoint and the metrics of steps 5 and 6
        with pytest.raises(Crash):
            run(tmp_path / "resumed", pack_to)
    assert max(r["step"] for r in records(tmp_path / "resumed")) == 6
    resumed = run(tmp_path / "resumed", pack_to, resume=True, seed=1)  # other initial weights: all must come from disk

    assert_same_weights(resumed, straight)
    assert records(tmp_path / "resumed") == records(tmp_path / "straight")  # no step twice, none missing
    steps = [r["step"] for r in records(tmp_path / "resumed") if "train_loss" in r]
    assert steps == list(range(1, 13))
    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert [p.name for p in step_checkpoints(checkpoints)] == ["step_8", "step_12"]  # keep_checkpoints = 2
    state = json.loads((checkpoints / "step_12" / "trainer_state.json").read_text())
    assert state["run"]["step"] == 12 and state["run"]["micro_batches"] == 24
    assert state["train_config"]["grad_accum"] == 2


def test_best_checkpoint_is_the_lowest_heldout_loss(tmp_path):
    run(tmp_path, pack_to=0)
    evals = [r for r in records(tmp_path) if "eval_loss/heldout" in r]
    best = min(evals, key=lambda r: r["eval_loss/heldout"])
    state = json.loads((tmp_path / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert state["run"]["best_step"] == state["run"]["step"] == best["step"]
    assert state["run"]["best_eval_loss"] == best["eval_loss/heldout"]


def test_early_stopping_after_patience_evals_without_improvement(tmp_path, monkeypatch):
    losses = iter([3.0, 2.0, 2.5, 2.6, 1.0])  # best at the 2nd eval (step 4), then two worse ones
    monkeypatch.setattr(minisft.train, "evaluate", lambda *args: next(losses))
    cfg = TrainConfig(
        steps=20, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=2, save_every=100, early_stop_patience=2
    )
    model = tiny_model(vocab_size=16, max_seq_len=32)
    result = train_loop(model, TRAIN, {"heldout": HELDOUT}, cfg, 0, tmp_path)
    assert result["last_step"] == 8 and result["heldout"] == 2.6
    assert records(tmp_path)[-1] == {"step": 8, "early_stop": "no better held-out loss in 2 evals"}
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in step_checkpoints(checkpoints)] == ["step_8"]  # saved where it stopped
    assert json.loads((checkpoints / "best" / "trainer_state.json").read_text())["run"]["step"] == 4


def test_resume_refuses_other_settings_and_an_empty_run(tmp_path):
    with pytest.raises(TrainingError, match="no complete step_N checkpoint"):
        run(tmp_path, pack_to=0, resume=True)
    run(tmp_path, pack_to=0, cfg=TrainConfig(steps=4, batch_size=4, save_every=4))
    with pytest.raises(TrainingError, match=r"lr \(saved 0.001, now 0.01\)"):
        run(tmp_path, pack_to=0, resume=True, cfg=TrainConfig(steps=4, batch_size=4, save_every=4, lr=1e-2))


KILLED_RUN = """
import sys, time, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import minisft.checkpoint as checkpoint
from test_resume import run, CFG

real_save_file = checkpoint.save_file

def save_file(tensors, path, *args, **kwargs):  # the second checkpoint hangs halfway: kill -9 lands mid-save
    real_save_file(tensors, path, *args, **kwargs)
    if "step_8.tmp" in path and path.endswith("model.safetensors"):
        open({marker!r}, "w").close()
        time.sleep(120)

checkpoint.save_file = save_file
run({run_dir!r}, pack_to=0)
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path):
    marker, run_dir = tmp_path / "saving", tmp_path / "run"
    script = KILLED_RUN.format(tests=str(TESTS), marker=str(marker), run_dir=str(run_dir))
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run never reached its second checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step_8.tmp" / "model.safetensors").is_file()  # the torn save...
    assert [p.name for p in step_checkpoints(checkpoints)] == ["step_4"]  # ...is not a checkpoint
    model = tiny_model(vocab_size=16, max_seq_len=32, seed=1)
    state = load_checkpoint(checkpoints / "step_4", model, make_optimizer(model, CFG))
    assert state["run"]["step"] == 4

    resumed = run(run_dir, pack_to=0, resume=True, seed=1)  # and the run goes on from it, exactly
    assert_same_weights(resumed, run(tmp_path / "straight", pack_to=0))
    assert records(run_dir) == records(tmp_path / "straight")
    assert not (checkpoints / "step_8.tmp").exists()


def write_train_files(folder: Path, extra_toml: str) -> Path:
    """Chats, held-out chats and a tokenizer in `folder`; -> a config running into folder/run."""
    from minisft.demo import TASKS, conversation, write_jsonl
    from minisft.tokenizer import Tokenizer

    chats = [conversation(TASKS[i % 3], "a c b", TASKS[i % 3].answer(["a", "c", "b"])) for i in range(24)]
    write_jsonl(folder / "train.jsonl", chats[:20])
    write_jsonl(folder / "eval.jsonl", chats[20:])
    Tokenizer.train_bpe(["sort a c b : a b c", "user", "assistant"], vocab_size=280).save(folder / "tok")
    config = folder / "run.toml"
    config.write_text(
        f'out_dir = "{folder / "run"}"\n'
        f'[data]\ntrain_file = "{folder / "train.jsonl"}"\neval_file = "{folder / "eval.jsonl"}"\n'
        f'tokenizer = "{folder / "tok"}"\n[model]\nvocab_size = 64\ndim = 32\nn_layers = 1\nffn_dim = 64\n' + extra_toml
    )
    return config


def test_train_command_resume_continues_the_run(tmp_path, capsys):
    """`train --resume RUN_DIR`: the run's own config; a checkpoint is a model folder `chat` loads."""
    from minisft.__main__ import main

    config = write_train_files(tmp_path, "[train]\nsteps = 6\nbatch_size = 4\neval_every = 2\nlog_every = 1\n")
    (tmp_path / "text.txt").write_text("sort a c b : a b c\n\nuser assistant\n")
    args = ["--train.steps", "4", "--train.save_every", "2", "--data.plain_text_eval", str(tmp_path / "text.txt")]
    assert main(["train", "--config", str(config), *args]) == 0
    run_dir = tmp_path / "run"
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [sorted(r) for r in evals] == [["eval_loss/heldout", "eval_loss/plain_text", "step"]] * 2  # forgetting too
    config_toml = (run_dir / "config.toml").read_text()
    model, _, chat_format = load_model(run_dir / "checkpoints" / "step_4")
    assert chat_format == "chatml" and (run_dir / "checkpoints" / "best" / "config.toml").read_text() == config_toml

    assert main(["train", "--resume", str(run_dir), "--lr", "1"]) == 2
    assert "drop --train.lr 1" in capsys.readouterr().err
    # a crash after step 2's checkpoint: steps 3 and 4 are redone, logged once
    (run_dir / "checkpoints" / "step_4").rename(run_dir / "checkpoints" / "step_4.tmp")
    assert main(["train", "--resume", str(run_dir)]) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s > 2] == [3, 4, 4]  # train_loss at 3 and 4, eval at 4
    assert (run_dir / "config.toml").read_text() == config_toml
