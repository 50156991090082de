"""Greedy decoding for a batch of prompts.

No KV cache yet: every step reruns the model over the whole (short) sequence. Rows are
right-padded in one buffer; under the causal mask a row's last real token never sees the padding
after it, so one forward pass serves prompts of different lengths.
"""

from __future__ import annotations

import torch

from minisft.model import Transformer


@torch.no_grad()
def generate_greedy(
    model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]
) -> list[list[int]]:
    """-> the generated ids of each prompt, without the prompt, cut before the first stop id."""
    device = model.embed_tokens.weight.device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.zeros(batch, int(lengths.max()) + max_new_tokens, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
    rows = torch.arange(batch, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        hidden = model(ids[:, : int(lengths.max())])
        next_ids = model.logits(hidden[rows, lengths - 1]).argmax(-1)  # (B,)
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if token in stop_ids:
                done[row] = True
            else:
                outputs[row].append(token)
        ids[rows, lengths] = next_ids
        lengths += (~done).long()
        if done.all():
            break
    return outputs
