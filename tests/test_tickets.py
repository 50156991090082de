"""The real-model demo's task: seeded tickets, a clean train/held-out split, labels that follow the
rules, and a scorer that accepts only valid JSON of the schema."""

import json
import re

from minisft.tickets import (
    ALWAYS_HIGH,
    CUES,
    HELD_OUT_CUES,
    HELD_OUT_PROBLEMS,
    PROBLEMS,
    SYSTEM_PROMPT,
    make_tickets,
    parse_answer,
    score,
)


def literal_parts(template: str) -> list[str]:
    """The words of a sentence template outside its {slots}, lower-cased: what any filling keeps."""
    return [part.strip().lower() for part in re.split(r"\{\w+\}", template) if len(part.strip()) > 3]


def appears(template: str, text: str) -> bool:
    return all(part in text.lower() for part in literal_parts(template))


HELD_OUT_ONLY = [p for pool in PROBLEMS.values() for p in pool[-HELD_OUT_PROBLEMS:]]
HELD_OUT_ONLY += [c for pool in CUES.values() for c in pool[-HELD_OUT_CUES:]]


def test_tickets_are_seeded_and_held_out_ones_never_trained_on():
    train, heldout = make_tickets(0, 400, 200)
    assert (train, heldout) == make_tickets(0, 400, 200)
    assert make_tickets(1, 400, 200)[0] != train
    assert len(train) == 400 and len(heldout) == 200
    assert not {t.text for t in train} & {t.text for t in heldout}
    assert sum(t.new_phrasing for t in heldout) == 100 and not any(t.new_phrasing for t in train)
    # No training ticket uses a held-out sentence; every new-phrasing ticket uses one.
    assert not [t.text for t in train if any(appears(s, t.text) for s in HELD_OUT_ONLY)]
    assert all(any(appears(s, t.text) for s in HELD_OUT_ONLY) for t in heldout if t.new_phrasing)
    # Every label occurs in training, in a fair share.
    for field in ("category", "priority"):
        counts = {getattr(t, field) for t in train}
        assert len(counts) == len({getattr(t, field) for t in heldout} | counts)
    assert 0.25 < sum(t.order_id is not None for t in train) / len(train) < 0.75


def test_labels_follow_the_rules_the_docstring_states():
    train, heldout = make_tickets(0, 400, 200)
    for ticket in train + heldout:
        if ticket.order_id is not None:
            assert ticket.order_id in ticket.text and len(ticket.order_id) == 6
        if any(phrase.lower() in ticket.text.lower() for phrase in ALWAYS_HIGH):
            assert ticket.priority == "high", ticket.text
        if ticket.category == "feedback":
            assert ticket.priority != "high"
        said = [p for p in ("low", "high") if any(appears(cue, ticket.text) for cue in CUES[p])]
        if ticket.priority in said:
            assert said == [ticket.priority], ticket.text
        elif not any(phrase.lower() in ticket.text.lower() for phrase in ALWAYS_HIGH):
            assert ticket.priority == "medium" and not said, ticket.text
    conversation = train[0].conversation()
    assert [t["role"] for t in conversation] == ["system", "user", "assistant"]
    assert conversation[0]["content"] == SYSTEM_PROMPT and json.loads(conversation[2]["content"])["category"]


def test_score_counts_only_valid_json_of_the_schema():
    _, heldout = make_tickets(0, 1, 4)
    right = [t.answer() for t in heldout]
    assert score(right, heldout)["exact"] == 1.0
    wrong_priority = json.loads(right[0]) | {"priority": "high" if heldout[0].priority != "high" else "low"}
    answers = [json.dumps(wrong_priority), right[1][:-1], right[2].replace("category", "kind"), " " + right[3] + "\n"]
    result = score(answers, heldout)
    assert result["exact"] == 0.25 and result["valid"] == 0.5 and result["category"] == 0.5
    assert result["priority"] == 0.25
    assert parse_answer('{"category": "billing", "priority": "low", "order_id": 123456}') is None  # a number
    assert parse_answer('{"category": "sales", "priority": "low", "order_id": null}') is None  # not a label
    assert parse_answer('{"order_id": null, "priority": "low", "category": "billing"}') is not None  # key order
