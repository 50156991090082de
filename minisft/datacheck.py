"""`python -m minisft data check FILE`: what a data file holds, before any GPU time is spent on it.

Reads every record (bad ones are counted and listed, never fatal here), and reports: records
per layout, bad records by kind (empty answers among them; with a tokenizer, records the chat
format cannot render), exact duplicates (the same turns and tools) and near-exact ones (the same
words once case, punctuation and spacing are ignored). With a tokenizer it renders every record as
training would and adds the token lengths of prompt (untrained) and answer (trained) as a
histogram, the trained-token fraction, and how many records are longer than max_seq_len; without
one, lengths are counted in characters.

Then the warnings: what would be trained oddly or dropped without an error, each counted with
the first few records' file:line (WARNINGS lists them). `--strict` makes any warning an error.

Duplicates are found by 64-bit hashes, so memory stays small on big files (16 bytes a record); a
false match needs a hash collision (odds ~ n² / 2⁶⁴, about 1 in 10⁹ for a million records).
"""

from __future__ import annotations

import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minisft.chat import ChatFormat
from minisft.data import Conversation, ReadStats, file_layout, read_conversations
from minisft.dataset import RENDER_BATCH, fit

_WORD = re.compile(r"\w+")
_TEMPLATE = re.compile(r"\{\{.*?\}\}", re.S)  # {{name}}: a template that was never filled in
_MEDIA = re.compile(r"<(image|video|audio)>")
SHOWN = 5  # records listed per warning
COPY_SHARE, COPY_MIN_WORDS = 0.8, 5  # an answer whose word trigrams are 80% in its prompt copies it

# Warning -> what a user reads in the report. Each is something training does without an error.
WARNINGS = {
    "template": "template placeholders ({{...}}), trained as literal text",
    "media": "media placeholders (<image>, <video>, <audio>): the model has no media input; trained as text",
    "ignored": "fields training ignores (they hold something)",
    "copy": f"answers that mostly copy the prompt (≥ {COPY_SHARE:.0%} of their word trigrams)",
    "exact duplicate": "exact duplicates (the same turns and tools as an earlier record)",
    "near duplicate": "near duplicates (the same words as an earlier record, not exact)",
    "starts with the assistant": "conversations that start with the assistant",
    "two user turns": "two user turns in a row",
    "two assistant turns": "two assistant turns in a row",
    "tool result without a call": "tool results with no tool call before them",
    "calls without tools": "tool calls in conversations that define no tools (calls to what was never shown)",
}


@dataclass
class Finding:
    """The records that share one warning: how many, and the first SHOWN of them."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, where: str, detail: str = "") -> None:
        self.count += 1
        if len(self.first) < SHOWN:
            self.first.append(f"{where} ({detail})" if detail else where)


@dataclass
class CheckReport:
    path: str
    layout: str
    unit: str  # "tokens" or "characters"
    read: ReadStats = field(default_factory=ReadStats)
    exact_duplicates: int = 0
    near_duplicates: int = 0  # includes the exact ones
    prompt_lengths: list[int] = field(default_factory=list)
    answer_lengths: list[int] = field(default_factory=list)
    max_seq_len: int = 0
    too_long: int = 0
    answer_lost_if_truncated: int = 0
    warnings: dict[str, Finding] = field(default_factory=lambda: {name: Finding() for name in WARNINGS})
    ignored_fields: Counter = field(default_factory=Counter)  # field -> records holding it

    @property
    def num_warnings(self) -> int:
        return sum(finding.count for finding in self.warnings.values())


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _exact_key(messages: Conversation) -> int:
    turns = tuple((m["role"], m["content"], repr(m.get("tool_calls"))) for m in messages)
    return hash((turns, repr(getattr(messages, "tools", None))))


def _near_key(words: list[list[str]], messages: list[dict]) -> int:
    return hash(tuple((m["role"], " ".join(w)) for m, w in zip(messages, words, strict=True)))


def _trigrams(words: list[str]) -> set[tuple[str, ...]]:
    return set(zip(words, words[1:], words[2:], strict=False))


def _copies_prompt(answer: list[str], prompt: list[str]) -> bool:
    """Most of the answer's words are the prompt's, and most of its word trigrams too (the cheap
    test first: it rules out nearly every answer)."""
    if len(answer) < COPY_MIN_WORDS:
        return False
    seen = set(prompt)
    if sum(word in seen for word in answer) < COPY_SHARE * len(answer):
        return False
    grams = _trigrams(answer)
    return len(grams & _trigrams(prompt)) >= COPY_SHARE * len(grams)


def _turn_order(messages: list[dict]) -> list[tuple[str, int]]:
    """-> [(warning, turn index)] for turns that break user/assistant alternation."""
    found = []
    roles = [m["role"] for m in messages]
    first = next((i for i, role in enumerate(roles) if role != "system"), 0)
    if roles[first] == "assistant":
        found.append(("starts with the assistant", first))
    for i in range(first + 1, len(roles)):
        before, role = roles[i - 1], roles[i]
        if role == before == "user":
            found.append(("two user turns", i))
        elif role == before == "assistant":
            found.append(("two assistant turns", i))
        elif role == "tool" and not (before == "tool" or messages[i - 1].get("tool_calls")):
            found.append(("tool result without a call", i))
    return found


def _warn(report: CheckReport, messages: Conversation, words: list[list[str]]) -> None:
    """Add one record's warnings to the report (duplicates are found after the whole file)."""
    where, found = messages.where, report.warnings
    text = "\n".join(m["content"] + (repr(m["tool_calls"]) if "tool_calls" in m else "") for m in messages)
    placeholders = sorted(set(_TEMPLATE.findall(text))) if "{{" in text else []
    if placeholders:
        found["template"].add(where, ", ".join(placeholders[:3]))
    media = sorted({f"<{kind}>" for kind in _MEDIA.findall(text)}) if "<" in text else []
    if media:
        found["media"].add(where, ", ".join(media))
    if messages.ignored:
        fields = sorted(set(messages.ignored))
        found["ignored"].add(where, ", ".join(fields))
        report.ignored_fields.update(fields)
    copies = [
        i
        for i, m in enumerate(messages)
        if m["role"] == "assistant" and _copies_prompt(words[i], [w for turn in words[:i] for w in turn])
    ]
    if copies:
        found["copy"].add(where, "turn " + ", ".join(map(str, copies)))
    for name, turn in dict(reversed(_turn_order(messages))).items():  # each kind once, at its first turn
        found[name].add(where, f"turn {turn}")
    if any(m.get("tool_calls") for m in messages) and not messages.tools:
        found["calls without tools"].add(where)


def repeats(keys: array, lines: array) -> list[tuple[int, int]]:
    """-> [(line, line of the first record with the same key)] for every repeat, in file order."""
    keys_np = np.frombuffer(keys, dtype=np.int64) if len(keys) else np.zeros(0, dtype=np.int64)
    order = np.argsort(keys_np, kind="stable")  # equal keys stay in file order
    ordered = keys_np[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group_first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    line_of = np.frombuffer(lines, dtype=np.int64)
    pairs = sorted(zip(order[~starts].tolist(), group_first[~starts].tolist(), strict=True))
    return [(int(line_of[i]), int(line_of[j])) for i, j in pairs]


def check_file(
    path: str | Path, chat: ChatFormat | None = None, max_seq_len: int = 0, layout: str = "auto"
) -> CheckReport:
    report = CheckReport(str(path), file_layout(path), "tokens" if chat else "characters", max_seq_len=max_seq_len)
    exact, near, lines = array("q"), array("q"), array("q")
    batch: list[list[dict]] = []

    def measure(batch: list[list[dict]]) -> None:
        if chat is None:
            for messages in batch:
                answer = sum(len(m["content"]) for m in messages if m["role"] == "assistant")
                report.answer_lengths.append(answer)
                report.prompt_lengths.append(sum(len(m["content"]) for m in messages) - answer)
            return
        for example in chat.render_many(batch):
            trained = example.num_trained_tokens
            report.answer_lengths.append(trained)
            report.prompt_lengths.append(len(example.input_ids) - trained)
            if max_seq_len and len(example.input_ids) > max_seq_len:
                report.too_long += 1
                report.answer_lost_if_truncated += fit(example, max_seq_len, "truncate")[0] is None

    check = chat.check if chat else None
    for messages in read_conversations(path, layout, "skip", report.read, check=check):
        words = [_words(m["content"]) for m in messages]
        exact.append(_exact_key(messages))
        near.append(_near_key(words, messages))
        lines.append(int(messages.where.rpartition(":")[2]))
        _warn(report, messages, words)
        batch.append(messages)
        if len(batch) == RENDER_BATCH:
            measure(batch)
            batch = []
    measure(batch)
    exact_repeats = repeats(exact, lines)
    repeated = {line for line, _ in exact_repeats}
    for line, first in exact_repeats:
        report.warnings["exact duplicate"].add(f"{path}:{line}", f"repeats line {first}")
    for line, first in repeats(near, lines):
        if line not in repeated:
            report.warnings["near duplicate"].add(f"{path}:{line}", f"like line {first}")
    report.exact_duplicates = len(exact_repeats)
    report.near_duplicates = len(exact_repeats) + report.warnings["near duplicate"].count
    return report


def histogram(prompt: list[int], answer: list[int], unit: str, width: int = 24) -> list[str]:
    """Side-by-side text histogram over power-of-two length buckets."""
    if not prompt:
        return []
    buckets = max(max(prompt), max(answer)).bit_length() + 1  # bucket b holds lengths in [2^(b-1), 2^b)
    counts = [[0] * buckets, [0] * buckets]
    for column, lengths in enumerate((prompt, answer)):
        for n in lengths:
            counts[column][n.bit_length()] += 1
    peak = max(max(c) for c in counts)
    used = [b for b in range(buckets) if counts[0][b] or counts[1][b]]
    lines = [f"  {unit:>13}   {'prompt (untrained)':<{width + 8}}answer (trained)"]
    for b in range(used[0], used[-1] + 1):
        label = "0" if b == 0 else f"{1 << (b - 1)}-{(1 << b) - 1}"
        cells = [f"{c[b]:>7} {'#' * round(width * c[b] / peak):<{width}}" for c in counts]
        lines.append(f"  {label:>13}   {cells[0]} {cells[1]}".rstrip())
    return lines


def format_report(report: CheckReport, chat: ChatFormat | None) -> str:
    read = report.read
    n = read.records
    lines = [f"data check: {report.path} ({report.layout})"]
    lines.append(f"records: {n + read.num_skipped} read, {n} valid, {read.num_skipped} bad")
    lines.append("layouts: " + (", ".join(f"{k} {v}" for k, v in sorted(read.per_format.items())) or "none"))
    if read.num_skipped:
        lines.append("bad records by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(read.skipped.items())))
        lines += [f"  {message}" for message in read.first_errors]
    lines.append(f"empty or whitespace-only answers: {read.skipped['empty answer']}")
    lines.append(
        f"duplicates: {report.exact_duplicates} exact, {report.near_duplicates} near-exact "
        "(same words ignoring case, punctuation, spacing; exact ones included)"
    )
    if n:
        prompt, answer = sum(report.prompt_lengths), sum(report.answer_lengths)
        what = f"tokens ({chat.name} format, loss on {chat.train_on})" if chat else "characters (no tokenizer given)"
        lines.append(f"lengths in {what}:")
        lines.append(
            f"  prompt: mean {prompt / n:.1f}, max {max(report.prompt_lengths)}; "
            f"answer: mean {answer / n:.1f}, max {max(report.answer_lengths)}"
        )
        lines += histogram(report.prompt_lengths, report.answer_lengths, report.unit)
        if chat:
            lines.append(f"trained tokens: {answer} of {prompt + answer} ({answer / max(prompt + answer, 1):.1%})")
        if chat and report.max_seq_len:
            lines.append(
                f"longer than {report.max_seq_len} tokens: {report.too_long} "
                f"({report.answer_lost_if_truncated} of them would lose their whole answer if truncated)"
            )
    lines.append(f"warnings: {report.num_warnings} (first {SHOWN} of each kind shown)")
    for name, finding in report.warnings.items():
        if finding.count:
            lines.append(f"  {WARNINGS[name]}: {finding.count}")
            if name == "ignored":
                lines.append("    " + ", ".join(f"{key} in {n}" for key, n in sorted(report.ignored_fields.items())))
            lines += [f"    {where}" for where in finding.first]
    return "\n".join(lines)
