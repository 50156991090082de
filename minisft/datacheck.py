"""`python -m minisft data check FILE`: what a data file holds, before any GPU time is spent on it.

Reads every record (bad ones are counted and listed, never fatal here), and reports: records
per layout, bad records by kind (empty answers among them), exact duplicates (the same turns)
and near-exact ones (the same words once case, punctuation and spacing are ignored). With a
tokenizer it renders every record as training would and adds the token lengths of prompt
(untrained) and answer (trained) as a histogram, the trained-token fraction, and how many
records are longer than max_seq_len; without one, lengths are counted in characters.

Duplicates are found by 64-bit hashes, so memory stays small on big files; a false match needs
a hash collision (odds ~ n² / 2⁶⁴, about 1 in 10⁹ for a million records).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from minisft.chat import ChatFormat
from minisft.data import ReadStats, file_layout, read_conversations
from minisft.dataset import RENDER_BATCH, fit

_WORD = re.compile(r"\w+")


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


def _near_key(messages: list[dict[str, str]]) -> int:
    return hash(tuple((m["role"], " ".join(_WORD.findall(m["content"].lower()))) for m in messages))


def check_file(
    path: str | Path, chat: ChatFormat | None = None, max_seq_len: int = 0, layout: str = "auto"
) -> CheckReport:
    report = CheckReport(str(path), file_layout(path), "tokens" if chat else "characters", max_seq_len=max_seq_len)
    exact: set[int] = set()
    near: set[int] = set()
    batch: list[list[dict[str, str]]] = []

    def measure(batch: list[list[dict[str, str]]]) -> None:
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

    for messages in read_conversations(path, layout, "skip", report.read):
        key = hash(tuple((m["role"], m["content"]) for m in messages))
        report.exact_duplicates += key in exact
        exact.add(key)
        key = _near_key(messages)
        report.near_duplicates += key in near
        near.add(key)
        batch.append(messages)
        if len(batch) == RENDER_BATCH:
            measure(batch)
            batch = []
    measure(batch)
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
    return "\n".join(lines)
