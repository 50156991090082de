"""Packed documents: which keys a query may see, read from a row's `document_ids` — the one rule
every attention path shares (the model's SDPA backend, the Triton kernel, the reference).

A packed row holds several documents side by side, and `document_ids` (B, T) labels them as
contiguous runs of equal ids, as packing writes them (0 0 0 1 1 2 ...). A token starts a new
document where its id differs from the previous token's: only the changes count, so an id that
appears again later starts another document. Query i may see key j when j ≤ i and no document
starts in (j, i].

Both forms below come from `document_starts`, and the model computes the one its backend reads
once per forward, for all its layers:

    document_mask     (B, 1, T, T) bool, causal and within a document: what the reference takes
    document_spans    each row's documents as (start, end) pairs: what the model's SDPA backend reads,
                      so it runs causal attention on each document alone instead of a masked (T, T)
    document_bounds   (doc_start, doc_end), each (B, T) int32: what the flash-attention kernel reads, so
                      it can skip whole blocks of other documents without a (T, T) mask in memory
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def document_starts(document_ids: Tensor) -> Tensor:
    """(B, T) document ids -> (B, T) bool, True at the first token of each document (and at t = 0)."""
    return F.pad(document_ids.diff(dim=1) != 0, (1, 0), value=True)


def document_mask(document_ids: Tensor) -> Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool: query i sees key j iff j ≤ i in the same document."""
    runs = document_starts(document_ids).cumsum(dim=1)  # (B, T): each token's document number
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return (causal & (runs[:, :, None] == runs[:, None, :]))[:, None]


def document_spans(document_ids: Tensor) -> list[list[tuple[int, int]]]:
    """(B, T) document ids -> for each row, its documents' (start, end) index pairs, in order. Python
    ints: on a GPU reading them is a sync (the model makes them once per forward)."""
    T = document_ids.shape[1]
    spans = []
    for row in document_starts(document_ids).tolist():
        starts = [t for t, first in enumerate(row) if first]
        spans.append(list(zip(starts, [*starts[1:], T], strict=True)))
    return spans


def document_bounds(document_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) document ids -> (doc_start, doc_end), each (B, T) int32: the first index of each
    token's document and one past its last."""
    B, T = document_ids.shape
    first = document_starts(document_ids)
    last = F.pad(first[:, 1:], (0, 1), value=True)  # a document ends where the next one starts
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    doc_start = torch.where(first, index, 0).cummax(dim=1).values
    doc_end = torch.where(last, index + 1, T).flip(1).cummin(dim=1).values.flip(1)
    return doc_start.to(torch.int32).contiguous(), doc_end.to(torch.int32).contiguous()
