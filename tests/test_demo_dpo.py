"""The SFT-then-DPO demo: its pieces on a tiny random model (fast); the SmolLM2 run's table is in the README."""

import json
from dataclasses import replace

import pytest
from test_demo_real import tiny_model  # noqa: F401  (the fixture)

from minisft.chat import ChatML
from minisft.demo_dpo import PREFERENCES, DPODemoConfig, compact, escalated, exact, preference_pairs, run_dpo_demo
from minisft.errors import ConfigError
from minisft.labels import IGNORE_INDEX
from minisft.tickets import Ticket, make_tickets, parse_answer

pytestmark = pytest.mark.usefixtures("one_thread")


def task_right(answer: str, ticket: Ticket) -> bool:
    """By hand: the answer's JSON, less an escalate key, is the ticket's three fields."""
    try:
        value = json.loads(answer)
    except json.JSONDecodeError:
        return False
    if isinstance(value, dict):
        value.pop("escalate", None)
    return parse_answer(json.dumps(value)) == json.loads(ticket.answer())


def json_object(answer: str) -> bool:
    try:
        return isinstance(json.loads(answer), dict)
    except json.JSONDecodeError:
        return False


def test_pairs_hold_the_preferred_answer_and_the_sft_one(tiny_model):  # noqa: F811
    from minisft.checkpoint import load_model

    _, tokenizer, _ = load_model(tiny_model)
    tickets, _ = make_tickets(0, 40, 0)
    trained = lambda e: [t for t in e.labels if t != IGNORE_INDEX]  # noqa: E731
    end = tokenizer.token_id("<|im_end|>")
    forms = {"escalate": escalated, "escalate_last": lambda t: escalated(t, last=True),
             "compact": lambda t: compact(t.answer())}  # fmt: skip
    for name, chosen in forms.items():
        pairs = preference_pairs(ChatML(tokenizer), tickets, PREFERENCES[name])
        for ticket, pair in zip(tickets, pairs, strict=True):
            assert trained(pair.chosen) == tokenizer.encode(chosen(ticket)) + [end]
            assert trained(pair.rejected) == tokenizer.encode(ticket.answer()) + [end]
    (ticket,) = [t for t in tickets[:3] if t.priority == "high"][:1] or tickets[:1]
    assert json.loads(compact(ticket.answer())) == json.loads(ticket.answer())
    assert compact(ticket.answer()).startswith('{"category":"') and ticket.answer().startswith('{"category": "')
    for form in (escalated(ticket), escalated(ticket, last=True)):
        assert json.loads(form) == json.loads(ticket.answer()) | {"escalate": ticket.priority == "high"}
    assert list(json.loads(escalated(ticket))) == ["category", "priority", "escalate", "order_id"]
    assert {t.priority == "high" for t in tickets} == {True, False} and {t.order_id is None for t in tickets} == {
        True, False}  # fmt: skip


def test_where_the_pairs_part_escalate_at_a_key_escalate_last_at_the_last_value_compact_at_the_first(tiny_model):  # noqa: F811
    """DPO's gradient comes from the tokens after the shared prefix of chosen and rejected (the prefix
    cancels in log π(chosen) − log π(rejected)). The escalate field between priority and order_id: the
    pair shares category and priority and parts at a key, and what follows in the rejected answer (the
    order_id key and value) is the chosen one's ending, token for token. After order_id: the pair shares
    every task value. Compact: it parts before the category is written."""
    from minisft.checkpoint import load_model

    _, tokenizer, _ = load_model(tiny_model)
    tickets, _ = make_tickets(0, 40, 0)
    for name in PREFERENCES:
        for ticket, pair in zip(tickets, preference_pairs(ChatML(tokenizer), tickets, PREFERENCES[name]), strict=True):
            chosen, rejected = ([t for t in e.labels if t != IGNORE_INDEX] for e in (pair.chosen, pair.rejected))
            shared = next(i for i, (c, r) in enumerate(zip(chosen, rejected, strict=False)) if c != r)
            prefix = tokenizer.decode(rejected[:shared]).lstrip()
            text = ticket.answer()
            if name == "escalate":
                assert prefix.startswith(text[: text.index(ticket.priority) + len(ticket.priority)])
                assert chosen[len(chosen) - (len(rejected) - shared) :] == rejected[shared:]
            elif name == "escalate_last":
                value = ticket.order_id or "null"
                assert prefix.startswith(text[: text.rindex(value) + len(value)])
            else:
                assert ticket.category not in prefix


def test_the_task_score_reads_the_three_fields_and_the_preference_is_scored_apart():
    ticket = Ticket("My card was charged twice. Urgent!", "billing", "high", None, new_phrasing=False)
    shows, shows_compact = PREFERENCES["escalate"].shows, PREFERENCES["compact"].shows
    right = '{"category": "billing", "priority": "high", "escalate": true, "order_id": null}'
    assert exact(right, ticket) and shows(right, ticket) and right == escalated(ticket)
    assert exact(right.replace("true", "false"), ticket) and not shows(right.replace("true", "false"), ticket)
    assert exact(ticket.answer(), ticket) and not shows(ticket.answer(), ticket)  # the field missing
    assert not shows(right.replace("true", '"true"'), ticket)  # a string is not the flag
    assert not exact(right.replace('"high"', '"low"'), ticket) and not exact(right.replace("null", '"null"'), ticket)
    assert not exact(right.replace("escalate", "escalated"), ticket)  # another key breaks the schema
    assert not exact("not json", ticket) and not shows("not json", ticket) and not shows("[1]", ticket)
    assert shows_compact(compact(right), ticket) and not shows_compact(right, ticket)


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
    assert (tmp_path / "sft" / "reference_escalate.json").is_file()
    for row in ("held-out preference accuracy", 'answers with "escalate" right', "general questions right"):
        assert row in out
    assert f"saved the SFT stage in {tmp_path / 'sft'}" in out
    lines = (tmp_path / "data" / "train_pairs.jsonl").read_text().splitlines()
    assert len(lines) == 16 and set(json.loads(lines[0])) == {"prompt", "chosen", "rejected"}
    assert json.loads(json.loads(lines[0])["chosen"])["escalate"] in (True, False)
    assert any('"reward_accuracy"' in line for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines())
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["dpo"] for a in answers] == result["dpo"]["answers"] and len(answers) == 6
    assert json.loads((tmp_path / "results.json").read_text())["dpo"] == json.loads(json.dumps(result["dpo"]))
    heldout = make_tickets(0, 16, 6)[1]
    right = [task_right(a, t) for a, t in zip(result["sft"]["answers"], heldout, strict=True)]
    assert [a["sft_exact"] for a in answers] == right
    # the variants' table reads the same results.json: its lost/won against the answers checked by hand
    from benchmarks.dpo_variants import row

    after = [task_right(a, t) for a, t in zip(result["dpo"]["answers"], heldout, strict=True)]
    lost = sum(a and not b for a, b in zip(right, after, strict=True))
    won = sum(b and not a for a, b in zip(right, after, strict=True))
    table_row = row("demo", json.loads((tmp_path / "results.json").read_text()))
    assert table_row["tickets lost / won"] == f"{lost} / {won} of 6"
    assert table_row["exact JSON"] == f"{sum(right) / 6:.1%} → {sum(after) / 6:.1%}"

    assert result["dpo"]["score"]["exact"] == sum(after) / 6
    for side in ("sft", "dpo"):  # the share with the escalate flag the ticket's priority calls for, by hand
        flagged = [json_object(a) and json.loads(a).get("escalate") is (t.priority == "high")
                   for a, t in zip(result[side]["answers"], heldout, strict=True)]  # fmt: skip
        assert result[side]["shows"] == sum(flagged) / 6
    # DPO again, alone, in another folder: the SFT model, its results and its reference log-probs read
    # back from the first run's SFT stage -> the same DPO run, to the bit
    again = run_dpo_demo(replace(cfg, out_dir=str(tmp_path / "again"), sft_dir=str(tmp_path / "sft")))
    out = capsys.readouterr().out
    assert f"reusing the SFT stage in {tmp_path / 'sft'}" in out
    assert [name for name, _, _ in again["phases"]] == ["load", "DPO", "DPO measured"]
    assert again["sft"] == json.loads(json.dumps(result["sft"])) and again["dpo"] == result["dpo"]
    assert (tmp_path / "again" / "answers.jsonl").is_file() and not (tmp_path / "again" / "sft").exists()

    # benchmarks/dpo_variants.py --run: a variant's DPO from the same stage, with the stage's own SFT
    # settings (this tiny model, its 16 tickets), the demo's DPO defaults but its change (the compact
    # preference: its reference log-probs are taken from the stage's model first, once)
    from benchmarks import dpo_variants

    variants = ["--runs", str(tmp_path), "--run", "compact", "--results", str(tmp_path / "results")]
    dpo_variants.main(variants)
    assert "answers written compact" in capsys.readouterr().out
    variant = json.loads((tmp_path / "variants" / "compact" / "results.json").read_text())
    assert [name for name, _, _ in variant["phases"]] == ["load", "reference log-probs", "DPO", "DPO measured"]
    assert variant["sft"]["answers"] == result["sft"]["answers"] and variant["config"]["model"] == str(tiny_model)
    assert variant["config"]["preference"] == "compact" and variant["config"]["dpo_lr"] == DPODemoConfig().dpo_lr
    for side in ("sft", "dpo"):  # the share written compact, by hand
        written = [
            json_object(a) and a == json.dumps(json.loads(a), separators=(",", ":")) for a in variant[side]["answers"]
        ]
        assert variant[side]["shows"] == sum(written) / 6
    table = json.loads((tmp_path / "results" / "dpo_variants.json").read_text())["rows"]
    assert [(r["variant"], r["preference"]) for r in table] == [("demo", "escalate"), ("compact", "compact")]
    dpo_variants.main(variants)
    assert "compact: done before" in capsys.readouterr().out  # never rerun, never overwritten

    # other SFT settings: refused before anything is loaded or written (other DPO settings are what a rerun is for)
    with pytest.raises(ConfigError, match=r"holds an SFT stage made with other settings \(sft_lr 0.003, now 0.001\)"):
        run_dpo_demo(replace(cfg, sft_lr=1e-3))
    # a stage whose plain-text loss counted the end-of-text target (made before that changed): refused too,
    # saying what changed -- its base and SFT losses would not compare with DPO's
    stage_file = tmp_path / "sft" / "stage.json"
    stage = json.loads(stage_file.read_text())
    del stage["settings"]["plain_text_loss"]
    stage_file.write_text(json.dumps(stage))
    with pytest.raises(ConfigError, match=r"other settings \(plain_text_loss None, now 'no end-of-text target'\)"):
        run_dpo_demo(cfg)
    late = ["--runs", str(tmp_path), "--run", "escalate_last", "--results", str(tmp_path / "results")]
    with pytest.raises(SystemExit, match=r"^dpo_variants: .* \(plain_text_loss None, now 'no end-of-text target'\)"):
        dpo_variants.main(late)  # one line, not a traceback
