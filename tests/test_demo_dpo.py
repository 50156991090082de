"""The SFT-then-DPO demo: its pieces on a tiny random model (fast); the SmolLM2 run's table is in the README."""

import json
from dataclasses import replace

import pytest
from test_demo_real import tiny_model  # noqa: F401  (the fixture)

from minisft.chat import ChatML
from minisft.demo_dpo import DPODemoConfig, compact, preference_pairs, run_dpo_demo
from minisft.errors import ConfigError
from minisft.labels import IGNORE_INDEX
from minisft.tickets import make_tickets, parse_answer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pairs_prefer_the_compact_json_of_the_same_answer(tiny_model):  # noqa: F811
    from minisft.checkpoint import load_model

    _, tokenizer, _ = load_model(tiny_model)
    (ticket,), _ = make_tickets(0, 1, 0)
    (pair,) = preference_pairs(ChatML(tokenizer), [ticket])
    trained = lambda e: [t for t in e.labels if t != IGNORE_INDEX]  # noqa: E731
    end = tokenizer.token_id("<|im_end|>")
    assert trained(pair.chosen) == tokenizer.encode(compact(ticket.answer())) + [end]
    assert trained(pair.rejected) == tokenizer.encode(ticket.answer()) + [end]
    assert json.loads(compact(ticket.answer())) == json.loads(ticket.answer())
    assert compact(ticket.answer()).startswith('{"category":"') and ticket.answer().startswith('{"category": "')


def test_demo_runs_sft_then_dpo_then_dpo_alone_from_the_saved_sft_stage(tiny_model, tmp_path, capsys):  # noqa: F811
    cfg = DPODemoConfig(
        model=str(tiny_model), out_dir=str(tmp_path), train_tickets=16, heldout_tickets=6, preference_tickets=4,
        pack_to=256, sft_lr=3e-3, dpo_lr=1e-3, pairs_per_step=4, general_questions=2,
    )  # fmt: skip
    result = run_dpo_demo(cfg)
    out = capsys.readouterr().out
    assert [name for name, _, _ in result["phases"]] == [
        "load", "base measured", "SFT", "SFT measured", "reference log-probs", "DPO", "DPO measured",
    ]  # fmt: skip
    assert result["dpo"]["preference"] >= result["sft"]["preference"]
    assert 0 <= result["dpo"]["implicit"] <= 1
    for row in ("held-out preference accuracy", "answers written compact", "general questions right"):
        assert row in out
    assert f"saved the SFT stage in {tmp_path / 'sft'}" in out
    lines = (tmp_path / "data" / "train_pairs.jsonl").read_text().splitlines()
    assert len(lines) == 16 and set(json.loads(lines[0])) == {"prompt", "chosen", "rejected"}
    assert any('"reward_accuracy"' in line for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines())
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["dpo"] for a in answers] == result["dpo"]["answers"] and len(answers) == 6
    assert json.loads((tmp_path / "results.json").read_text())["dpo"] == json.loads(json.dumps(result["dpo"]))
    heldout = make_tickets(0, 16, 6)[1]
    right = [parse_answer(a) == json.loads(t.answer()) for a, t in zip(result["sft"]["answers"], heldout, strict=True)]
    assert [a["sft_exact"] for a in answers] == right
    # the variants' table reads the same results.json: its lost/won against the answers checked by hand
    from benchmarks.dpo_variants import row

    after = [parse_answer(a) == json.loads(t.answer()) for a, t in zip(result["dpo"]["answers"], heldout, strict=True)]
    lost = sum(a and not b for a, b in zip(right, after, strict=True))
    won = sum(b and not a for a, b in zip(right, after, strict=True))
    table_row = row("demo", json.loads((tmp_path / "results.json").read_text()))
    assert table_row["tickets lost / won"] == f"{lost} / {won} of 6"
    assert table_row["exact JSON"] == f"{sum(right) / 6:.1%} → {sum(after) / 6:.1%}"

    # DPO again, alone, in another folder: the SFT model, its results and its reference log-probs read
    # back from the first run's SFT stage -> the same DPO run, to the bit
    again = run_dpo_demo(replace(cfg, out_dir=str(tmp_path / "again"), sft_dir=str(tmp_path / "sft")))
    out = capsys.readouterr().out
    assert f"reusing the SFT stage in {tmp_path / 'sft'}" in out
    assert [name for name, _, _ in again["phases"]] == ["load", "DPO", "DPO measured"]
    assert again["sft"] == json.loads(json.dumps(result["sft"])) and again["dpo"] == result["dpo"]
    assert (tmp_path / "again" / "answers.jsonl").is_file() and not (tmp_path / "again" / "sft").exists()

    # benchmarks/dpo_variants.py --run: a variant's DPO from the same stage, with the stage's own SFT
    # settings (this tiny model, its 16 tickets), the demo's DPO defaults but its change (α = 2)
    from benchmarks import dpo_variants

    variants = ["--runs", str(tmp_path), "--run", "alpha2", "--results", str(tmp_path / "results")]
    dpo_variants.main(variants)
    variant = json.loads((tmp_path / "variants" / "alpha2" / "results.json").read_text())
    assert variant["sft"] == json.loads(json.dumps(result["sft"])) and variant["config"]["model"] == str(tiny_model)
    assert variant["config"]["sft_weight"] == 2.0 and variant["config"]["dpo_lr"] == DPODemoConfig().dpo_lr
    table = json.loads((tmp_path / "results" / "dpo_variants.json").read_text())["rows"]
    assert [(r["variant"], r["α (sft_weight)"]) for r in table] == [("demo", cfg.sft_weight), ("alpha2", 2.0)]
    dpo_variants.main(variants)
    assert "alpha2: done before" in capsys.readouterr().out  # never rerun, never overwritten

    # other SFT settings: refused before anything is loaded or written (other DPO settings are what a rerun is for)
    with pytest.raises(ConfigError, match=r"holds an SFT stage made with other settings \(sft_lr 0.003, now 0.001\)"):
        run_dpo_demo(replace(cfg, sft_lr=1e-3))
