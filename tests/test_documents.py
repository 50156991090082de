"""Packed documents (`triton_kernels/documents.py`): the mask and the bounds against the rule written
out by hand. This module holds no Triton kernel (torch helpers every attention path reads); the kernel
that reads `document_bounds` is compared with the mask's reference in tests/test_attention.py."""

import torch

from triton_kernels.documents import document_bounds, document_mask


def sees_by_hand(ids: list[int]) -> list[list[bool]]:
    """Query i sees key j when j ≤ i and no document starts in (j, i] (an id change starts one)."""
    starts = [t == 0 or ids[t] != ids[t - 1] for t in range(len(ids))]
    return [[j <= i and not any(starts[j + 1 : i + 1]) for j in range(len(ids))] for i in range(len(ids))]


def test_document_bounds():
    docs = torch.tensor([[0, 0, 0, 1, 2, 2], [5, 5, 5, 5, 5, 5]])
    start, end = document_bounds(docs)
    assert start.tolist() == [[0, 0, 0, 3, 4, 4], [0, 0, 0, 0, 0, 0]]
    assert end.tolist() == [[3, 3, 3, 4, 6, 6], [6, 6, 6, 6, 6, 6]]


def test_mask_and_bounds_follow_the_rule_on_random_runs():
    generator = torch.Generator().manual_seed(0)
    for T in (1, 7, 37):
        # Few distinct ids, so an id often comes back later: that must start another document.
        ids = torch.randint(0, 3, (4, T), generator=generator).repeat_interleave(2, dim=1)[:, :T]
        mask = document_mask(ids)
        start, end = document_bounds(ids)
        assert mask.shape == (4, 1, T, T) and start.dtype == end.dtype == torch.int32
        for b in range(4):
            expected = sees_by_hand(ids[b].tolist())
            assert mask[b, 0].tolist() == expected
            for i in range(T):
                seen = [j for j in range(T) if expected[i][j]]
                assert start[b, i] == seen[0]  # the first key of its document
                same_doc = [j for j in range(T) if expected[j][i] or expected[i][j]]
                assert end[b, i] == same_doc[-1] + 1  # one past its document's last token
