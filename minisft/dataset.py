"""A data file -> training examples: read (data.py), render (chat.py), apply the over-long policy.

The over-long policy works on the rendered tokens, before anything is trained, and every example
it touches is counted in the report:

    drop       an example longer than max_seq_len is left out;
    truncate   it is cut to max_seq_len tokens; if the cut removed every trained token (the
               answer began past the limit) it is left out too — an example that trains on
               nothing would only look like data.

With a `cache_dir`, the rendered examples and the report are cached on disk (`data_cache.py`),
keyed by the file's content, the tokenizer and every setting above: a re-run reads the tokens
back instead of rendering again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from minisft import data_cache
from minisft.chat import ChatFormat, Example
from minisft.data import ReadStats, read_conversations

TOO_LONG = ("drop", "truncate")
RENDER_BATCH = 1024  # conversations rendered per call: one parallel tokenizer batch each


@dataclass
class LoadReport:
    path: str
    read: ReadStats = field(default_factory=ReadStats)
    examples: int = 0
    dropped_too_long: int = 0
    truncated: int = 0  # cut to max_seq_len and kept
    answer_cut_off: int = 0  # cut to max_seq_len with no trained token left: left out
    max_seq_len: int = 0
    cached: str = ""  # the cache entry the examples were read from ("" when rendered in this run)

    def summary(self) -> str:
        """One paragraph a user reads before training starts."""
        formats = ", ".join(f"{n} {name}" for name, n in sorted(self.read.per_format.items())) or "none"
        parts = [f"{self.path}: {self.examples} examples from {self.read.records} records ({formats})"]
        if self.read.num_skipped:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.read.skipped.items()))
            parts.append(f"{self.read.num_skipped} bad records skipped ({kinds}); first: {self.read.first_errors[0]}")
        if self.dropped_too_long:
            parts.append(f"{self.dropped_too_long} dropped as longer than {self.max_seq_len} tokens")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to {self.max_seq_len} tokens")
        if self.answer_cut_off:
            parts.append(f"{self.answer_cut_off} left out: truncation cut off their whole answer")
        if self.cached:
            parts.append(f"tokens read from the cache {self.cached}")
        return "; ".join(parts)


def fit(example: Example, max_seq_len: int, too_long: str) -> tuple[Example | None, str]:
    """Apply the over-long policy -> (the example or None, what happened: "", "dropped", ...)."""
    if len(example.input_ids) <= max_seq_len:
        return example, ""
    if too_long == "drop":
        return None, "dropped"
    cut = example.cut(max_seq_len)
    return (cut, "truncated") if cut.num_trained_tokens else (None, "answer cut off")


def load_examples(
    path: str | Path,
    chat: ChatFormat,
    max_seq_len: int,
    layout: str = "auto",
    on_error: str = "fail",
    too_long: str = "drop",
    cache_dir: str | Path = "",
) -> tuple[list[Example], LoadReport]:
    """Read, validate and render a file; -> (examples, what happened to every record).

    cache_dir: where rendered files are cached ("": no cache, render every time)."""
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
    cache_dir = cache_dir if Path(path).is_file() else ""  # a missing file is read's error to name
    if cache_dir:
        key = data_cache.cache_key(path, chat, max_seq_len, layout, on_error, too_long)
        hit = data_cache.load(cache_dir, key, path, LoadReport)
        if hit is not None:
            return hit
    report = LoadReport(str(path), max_seq_len=max_seq_len)
    examples: list[Example] = []
    counters = {"dropped": "dropped_too_long", "truncated": "truncated", "answer cut off": "answer_cut_off"}

    def render(batch: list[list[dict]]) -> None:
        for example in chat.render_many(batch):
            kept, what = fit(example, max_seq_len, too_long)
            if what:
                setattr(report, counters[what], getattr(report, counters[what]) + 1)
            if kept is not None:
                examples.append(kept)

    batch: list[list[dict]] = []
    for messages in read_conversations(path, layout, on_error, report.read, check=chat.check):
        batch.append(messages)
        if len(batch) == RENDER_BATCH:
            render(batch)
            batch = []
    if batch:
        render(batch)
    report.examples = len(examples)
    if cache_dir:
        data_cache.save(cache_dir, key, examples, report)
    return examples, report
