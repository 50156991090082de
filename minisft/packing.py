"""Turn examples into batches the model can eat.

`pad_batch` is the plain path: one example per row, right-padded to the longest row. Right
padding needs no attention mask — under a causal mask a real token never sees the pad tokens
that come after it — and the pads carry label -100, so they add nothing to the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minisft.chat import Example
from minisft.loss import IGNORE_INDEX


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
