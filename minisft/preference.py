"""Preference data for DPO: records -> (chosen, rejected) pairs of examples, masks from the chat renderer.

A record holds one prompt and two answers to it, the preferred one first. Three layouts (TRL's):

    {"prompt": "2+2?", "chosen": "4", "rejected": "5"}                             strings
    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
     "rejected": [{"role": "assistant", ...}]}                                    message lists
    {"chosen": [..., {"role": "assistant", ...}], "rejected": [..., {...}]}       whole conversations
                                                                                  sharing their prefix

Any record may carry "system". The prompt is every turn before the answer; the answer is one
assistant turn. Both conversations are rendered by the run's chat format, so the labels are the
SFT ones with only the final answer (and its end-of-turn token) trained: DPO's log π(y|x) is the
sum over exactly those positions. The two renderings must begin with the same prompt tokens —
a template that renders the prompt differently depending on the answer would compare two
different questions — and are refused otherwise.

Bad records are errors naming `file:line: field` (or, with on_error = "skip", counted): a missing
or empty answer, chosen equal to rejected, turns that are not a shared prompt plus one answer.
Too-long pairs meet SFT's policy (`dataset.fit`) before anything is trained: dropped, or both
sides cut to max_seq_len — and left out when a cut removes an answer entirely; counted either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from minisft.chat import ChatFormat, Example, RenderError
from minisft.data import ON_ERROR, DataError, read_records
from minisft.dataset import LoadReport, fit
from minisft.labels import IGNORE_INDEX

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Pair:
    """One preference: `chosen` and `rejected` share their prompt tokens. `reference` is the
    reference model's (log π_ref(chosen|x), log π_ref(rejected|x)), filled in before training (dpo.py)."""

    chosen: Example
    rejected: Example
    reference: tuple[float, float] | None = None


def _text(value: object, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {name}: expected a string, got {type(value).__name__}", "wrong field")
    return value


def _messages(value: object, where: str, name: str, role: str = "user") -> list[dict]:
    """A string (one turn of `role`) or a list of {"role", "content"} -> validated messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {name}: expected a string or a non-empty list of messages", "wrong field")
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise DataError(f'{where}: {name}[{i}]: expected {{"role": one of {ROLES}, "content": ...}}', "wrong field")
        messages.append({"role": turn["role"], "content": _text(turn.get("content"), where, f"{name}[{i}].content")})
    return messages


def split_record(record: object, where: str) -> tuple[list[dict], dict, dict]:
    """One record -> (prompt messages, chosen answer, rejected answer). Raises DataError."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object", "wrong field")
    for side in ("chosen", "rejected"):
        if side not in record:
            raise DataError(
                f"{where}: {side}: missing (a preference record needs chosen and rejected)", "missing field"
            )
    if "prompt" in record:
        prompt = _messages(record["prompt"], where, "prompt")
        chosen = _messages(record["chosen"], where, "chosen", "assistant")
        rejected = _messages(record["rejected"], where, "rejected", "assistant")
    else:  # whole conversations: the prompt is the turns they share
        if isinstance(record["chosen"], str):
            raise DataError(f"{where}: prompt: missing (string answers need a prompt)", "missing field")
        chosen = _messages(record["chosen"], where, "chosen")
        rejected = _messages(record["rejected"], where, "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise DataError(f"{where}: chosen: shares no prompt turn with rejected", "no shared prompt")
    if "system" in record:
        prompt = [{"role": "system", "content": _text(record["system"], where, "system")}, *prompt]
    answers = {"chosen": chosen, "rejected": rejected}
    for side, turns in answers.items():
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            what = "nothing" if not turns else f"{len(turns)} turns ({', '.join(t['role'] for t in turns)})"
            raise DataError(
                f"{where}: {side}: expected one assistant answer after the prompt, got {what}", "wrong field"
            )
        if not turns[0]["content"].strip():
            raise DataError(f"{where}: {side}: empty answer (nothing to compare)", "empty answer")
    if chosen == rejected:
        raise DataError(f"{where}: chosen: the same as rejected (no preference to learn)", "chosen == rejected")
    return prompt, chosen[0], rejected[0]


def prompt_length(example: Example) -> int:
    """Tokens before the first trained one: the rendered prompt (labels are shifted by one)."""
    return next((t for t, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels)) + 1


def render_pair(
    answer_only: ChatFormat, prompt: list[dict], chosen: dict, rejected: dict, where: str
) -> tuple[Example, Example]:
    """Render both conversations; the prompt tokens must agree. answer_only trains the last turn only."""
    try:
        good, bad = answer_only.render_many([[*prompt, chosen], [*prompt, rejected]])
    except RenderError as err:
        raise DataError(f"{where}: {err.what}", "unrenderable") from None
    n = prompt_length(good)
    if prompt_length(bad) != n or good.input_ids[:n] != bad.input_ids[:n]:
        raise DataError(
            f"{where}: prompt: renders differently before chosen and before rejected (the chat format "
            "changes the prompt with the answer)",
            "prompt mismatch",
        )
    return good, bad


def load_pairs(
    path: str, chat: ChatFormat, max_seq_len: int, on_error: str = "fail", too_long: str = "drop"
) -> tuple[list[Pair], LoadReport]:
    """Read, validate, render and length-check a preference file -> (pairs, what happened to every record)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    answer_only = type(chat)(chat.tokenizer, "last")  # the same format; only the final answer trained
    report = LoadReport(str(path), max_seq_len=max_seq_len)
    counters = {"dropped": "dropped_too_long", "truncated": "truncated", "answer cut off": "answer_cut_off"}
    pairs: list[Pair] = []
    for where, record in read_records(path):
        try:
            if isinstance(record, DataError):
                raise record
            prompt, chosen, rejected = split_record(record, where)
            good, bad = render_pair(answer_only, prompt, chosen, rejected, where)
        except DataError as err:
            if on_error == "fail":
                raise
            report.read.skip(err)
            continue
        report.read.per_format["preference"] += 1
        (good, what_good), (bad, what_bad) = fit(good, max_seq_len, too_long), fit(bad, max_seq_len, too_long)
        what = max(what_good, what_bad, key=lambda w: ("", "truncated", "dropped", "answer cut off").index(w))
        if what:
            setattr(report, counters[what], getattr(report, counters[what]) + 1)
        if good is not None and bad is not None:
            pairs.append(Pair(good, bad))
    report.examples = len(pairs)
    return pairs, report
