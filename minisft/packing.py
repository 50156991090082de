"""Turn examples into batches the model can eat: padded, or packed.

`pad_batch` is the plain path: one example per row, right-padded to the longest row. Right
padding needs no attention mask — under a causal mask a real token never sees the pad tokens
that come after it — and the pads carry label -100, so they add nothing to the loss.

`pack` is the dense path. Padding wastes the compute of every pad token, a lot of it when
lengths vary; packing fills each row of `max_len` tokens with several whole examples instead.
Best-fit decreasing: take the examples longest first and put each into the fullest row it still
fits in (a new row if none) — simple, deterministic, and never more than 11/9 of the fewest
rows possible, plus one (Johnson 1973). An example is never split, so no answer is cut from its prompt. In a packed row
each document gets its own `document_ids` (attention stays inside it) and `position_ids` that
restart at 0 (RoPE sees what it would see unpacked): the loss equals the unpacked loss.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import torch
from torch import Tensor

from minisft.chat import Example
from minisft.labels import IGNORE_INDEX


class Batch(NamedTuple):
    """A micro-batch, each tensor (B, T) int64; a padded batch leaves the packing fields None."""

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor | None = None  # restart at 0 for each document of a packed row
    document_ids: Tensor | None = None  # 0, 1, ... per document in a row; the pad tail has the next id


def pad_batch(examples: list[Example], pad_id: int) -> tuple[Tensor, Tensor]:
    """Examples -> input_ids, labels, each (B, T) int64, T = longest example."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
    return input_ids, labels


def pack(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing: example lengths -> rows of example indices, each row's sum <= max_len."""
    too_long = [n for n in lengths if n > max_len]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than the row ({max(too_long)} > {max_len} tokens)")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted: the best fit is a bisect away
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([])
            space, row = max_len, len(rows) - 1
        else:
            space, row = free.pop(at)
        rows[row].append(i)
        bisect.insort(free, (space - lengths[i], row))
    return rows


def pack_examples(examples: list[Example], max_len: int) -> list[list[Example]]:
    """Examples -> packed rows of whole examples (see `pack`)."""
    rows = pack([len(e.input_ids) for e in examples], max_len)
    return [[examples[i] for i in row] for row in rows]


def packing_efficiency(rows: list[list[Example]], max_len: int) -> float:
    """Fraction of the rows' max_len slots that hold a real token (1.0: no padding at all)."""
    return sum(len(e.input_ids) for row in rows for e in row) / max(len(rows) * max_len, 1)


def packed_batch(rows: list[list[Example]], pad_id: int) -> Batch:
    """Packed rows -> a Batch of (B, T) tensors, T = the longest row."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    document_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for doc, example in enumerate(row):
            n = len(example.input_ids)
            input_ids[r, start : start + n] = torch.tensor(example.input_ids)
            labels[r, start : start + n] = torch.tensor(example.labels)
            position_ids[r, start : start + n] = torch.arange(n)
            document_ids[r, start : start + n] = doc
            start += n
        if start < width:  # the pad tail: a document of its own, so no real token attends to it
            position_ids[r, start:] = torch.arange(width - start)
            document_ids[r, start:] = len(row)
    return Batch(input_ids, labels, position_ids, document_ids)
