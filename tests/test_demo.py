"""The built-in demo: a reduced run in the fast set, the real one (the README's claim) as slow."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minisft.checkpoint import load_model
from minisft.demo import DemoConfig, run_demo
from minisft.model import ModelConfig
from minisft.train import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_demo(out_dir: Path) -> DemoConfig:
    return DemoConfig(
        out_dir=str(out_dir),
        pretrain_docs=600,
        sft_pairs=200,
        heldout_pairs=40,
        model=ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64),
        pretrain=TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup_steps=5, eval_every=10, log_every=10),
        sft=TrainConfig(steps=30, batch_size=32, lr=1e-3, warmup_steps=5, eval_every=10, log_every=10),
    )


def eval_losses(metrics_file: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return [r[key] for r in records if key in r]


@pytest.mark.usefixtures("one_thread")
def test_reduced_demo_lowers_heldout_losses_and_is_seeded(tmp_path, capsys):
    result = run_demo(small_demo(tmp_path / "a"))

    plain = eval_losses(tmp_path / "a" / "pretrain" / "metrics.jsonl", "eval_loss/plain_text")
    sft = eval_losses(tmp_path / "a" / "sft" / "metrics.jsonl", "eval_loss/sft_heldout")
    assert len(plain) == 4 and len(sft) == 3
    assert plain[-1] < plain[0] - 0.5, plain  # pre-training learns the domain's text
    assert sft[-1] < sft[0], sft  # SFT lowers the held-out chat loss
    assert result["sft_sft_heldout_loss"] < result["base_sft_heldout_loss"] - 1.0
    assert result["sft_sft_heldout_loss"] == pytest.approx(sft[-1], rel=1e-5)  # table and log agree

    out = capsys.readouterr().out
    assert "held-out exact match" in out and "rise = forgetting" in out
    assert out.count("\nuser: ") == 2 and out.count("\nassistant: ") == 2

    lines = (tmp_path / "a" / "data" / "sft_train.jsonl").read_text().splitlines()
    assert len(lines) == 200 and json.loads(lines[0])["messages"][-1]["role"] == "assistant"
    model, tokenizer, chat_format = load_model(tmp_path / "a" / "sft" / "model")
    assert chat_format == "chatml" and tokenizer.token_id("<|im_end|>") < model.config.vocab_size

    assert run_demo(small_demo(tmp_path / "b")) == result  # seeded: the same numbers twice


@pytest.mark.slow
@pytest.mark.long
def test_demo_command_reaches_90_percent_exact_match(tmp_path):
    """The README's main job, as a user runs it: `python -m minisft demo` from a fresh folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "minisft", "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    base, tuned = map(float, re.search(r"held-out exact match\s+([\d.]+)%\s+([\d.]+)%", result.stdout).groups())
    assert base <= 5.0 and tuned >= 90.0, result.stdout
    took = int(re.search(r"took (\d+) s", result.stdout).group(1))
    # Not a benchmark (the README's time is measured on a quiet machine; 353 s was seen under a load
    # of 6): a bound that still catches the thread trap, which made the demo 5-14x slower.
    assert took <= 450, f"the demo took {took} s; ~2 minutes on a quiet 2-core machine"
    assert (tmp_path / "runs" / "demo" / "sft" / "model" / "model.safetensors").is_file()


def test_demo_rejects_options():
    from minisft.__main__ import main

    assert main(["demo", "--fast"]) == 2


def test_train_command_end_to_end(tmp_path, one_thread):
    """`python -m minisft train`: JSONL + tokenizer -> metrics.jsonl, config.toml, a loadable checkpoint."""
    from minisft.__main__ import main
    from minisft.config import load_config
    from minisft.demo import TASKS, conversation, write_jsonl
    from minisft.tokenizer import Tokenizer

    chats = [conversation(TASKS[i % 3], "a c b", TASKS[i % 3].answer(["a", "c", "b"])) for i in range(24)]
    write_jsonl(tmp_path / "train.jsonl", chats[:20])
    write_jsonl(tmp_path / "eval.jsonl", chats[20:])
    Tokenizer.train_bpe(["sort a c b : a b c", "user", "assistant"], vocab_size=280).save(tmp_path / "tok")
    (tmp_path / "run.toml").write_text(
        f'out_dir = "{tmp_path / "run"}"\n'
        f'[data]\ntrain_file = "{tmp_path / "train.jsonl"}"\neval_file = "{tmp_path / "eval.jsonl"}"\n'
        f'tokenizer = "{tmp_path / "tok"}"\n[model]\nvocab_size = 64\ndim = 32\nn_layers = 1\nffn_dim = 64\n'
        "[train]\nsteps = 6\nbatch_size = 4\neval_every = 3\nlog_every = 2\n"
    )
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--lr", "0.003", "--train.grad_accum", "2"]) == 0

    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [2, 4, 6]
    heldout = [r["eval_loss/heldout"] for r in records if "eval_loss/heldout" in r]
    assert len(heldout) == 2 and heldout[1] < heldout[0]
    config = load_config(run / "config.toml")
    assert config.train.lr == 0.003 and config.train.grad_accum == 2 and config.model.vocab_size == 320
    model, _, _ = load_model(run / "checkpoints" / "final")
    assert model.config == config.model


def test_train_command_reports_bad_data_in_one_line(tmp_path, capsys):
    from minisft.__main__ import main
    from minisft.tokenizer import Tokenizer

    Tokenizer.train_bpe(["hello"], vocab_size=270).save(tmp_path / "tok")
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    code = main(
        ["train", "--data.train_file", str(tmp_path / "train.jsonl"), "--data.tokenizer", str(tmp_path / "tok")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'train.jsonl'}:1: messages:") and err.count("\n") == 1


def test_the_generation_phase_shows_progress(capsys, one_thread):
    """Answering held-out prompts takes a while on a CPU: a progress line says how far it is."""
    import random

    from minisft.chat import ChatML
    from minisft.demo import answer_all, make_items
    from minisft.model import Transformer
    from minisft.tokenizer import Tokenizer

    items = make_items(random.Random(0), 150, set())
    tokenizer = Tokenizer.train_bpe([f"{task.instruction} {x} {y}" for task, x, y in items], vocab_size=300)
    model = Transformer(ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64))
    answers = answer_all(model, ChatML(tokenizer), items)
    assert len(answers) == 150
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert [line.split("]")[1].split("|")[0].strip() for line in lines if line.startswith("answering [")] == [
        "100/150",
        "150/150",
    ]
