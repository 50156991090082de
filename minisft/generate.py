"""Generation with a KV cache: greedy, temperature and top-p sampling, for a batch of prompts.

Prompts are left-padded into one (B, T) buffer so that every row's last prompt token sits in the
same column: the first forward pass (the "prefill") fills the cache with the whole prompt, and
each later step feeds one new token per row at one shared cache position. Padding never counts:
the cache marks it (`KVCache.is_token`) so no query attends to it, and position ids restart at 0
on each row's first real token, so a padded row computes exactly what it would alone. (Right
padding would need a different write position per row.)

Each row stops at its first stop id (eos, or the chat format's end-of-turn token); the batch stops
when every row has. Sampling draws from a seeded generator: the same call gives the same text.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minisft.model import KVCache, Transformer


def pick_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """(B, V) logits -> (B,) next ids: argmax when temperature is 0, else a sample of
    softmax(logits / temperature) restricted to the top-p nucleus (Holtzman et al. 2020): the
    fewest most-likely tokens whose probabilities add up to at least top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # the most likely token always stays
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # multinomial renormalises


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: set[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """-> the generated ids of each prompt, without the prompt, cut before its first stop id.

    Generation also ends at the model's max_seq_len (the longest prompt plus what was generated).
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token")
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    longest = max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - longest)
    if max_new_tokens < 1:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in model.max_seq_len={model.config.max_seq_len}")

    batch = len(prompts)
    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)  # pad id 0: never attended to
    cache = KVCache(model.config, batch, longest + max_new_tokens, device, dtype)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt, device=device)
        cache.is_token[row, : longest - len(prompt)] = False
    positions = (cache.is_token[:, :longest].cumsum(1) - 1).clamp(min=0)  # (B, T), 0 at each first real token
    next_position = positions[:, -1:] + 1  # (B, 1)
    generator = torch.Generator(device).manual_seed(seed)

    logits = model.logits(model(ids, positions, cache=cache)[:, -1])  # prefill: the whole prompt at once
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * batch
    for step in range(max_new_tokens):
        next_ids = pick_next(logits, temperature, top_p, generator)  # (B,)
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if token in stop_ids:
                done[row] = True
            else:
                outputs[row].append(token)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model.logits(model(next_ids[:, None], next_position, cache=cache)[:, -1])
        next_position += 1
    return outputs


def generate_greedy(
    model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]
) -> list[list[int]]:
    """Greedy decoding, what evaluation uses: the most likely token at every step."""
    return generate(model, prompts, max_new_tokens, stop_ids)
