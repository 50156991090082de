"""Generation with a KV cache against generation without one, and sampling against its definition.

The reference decoder below reruns the model's training forward over the whole sequence at every
step, one prompt at a time: no cache, no padding. The cached, batched, left-padded decoder must
produce the same tokens. (The comparison with transformers' `generate` is in test_hf.py.)
"""

import pytest
import torch

from minisft.generate import generate, pick_next
from minisft.model import KVCache, ModelConfig, Transformer

from helpers import greedy_without_cache, sharpen_

pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(**overrides) -> Transformer:
    config = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=48)
    return sharpen_(Transformer(ModelConfig(**{**config, **overrides})), seed=7)


PROMPTS = [[3, 14, 15, 9, 2, 6, 5, 35, 8, 9], [1], [27, 18, 28], [50, 40, 30, 20, 10]]
MODELS = {
    "gqa": {},
    "mqa-untied": dict(n_kv_heads=1, tie_embeddings=False),
    "mha-bias": dict(n_kv_heads=4, attention_bias=True),
    "llama3-rope": dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=16, rope_theta=500.0),
    "linear-rope": dict(rope_scaling="linear", rope_factor=4.0),
}


@pytest.mark.parametrize("variant", MODELS)
def test_cached_batched_generation_equals_no_cache_generation(variant):
    model = random_model(**MODELS[variant])
    free = [greedy_without_cache(model, p, 20, set()) for p in PROMPTS]
    assert generate(model, PROMPTS, 20, set()) == free
    assert len({tuple(f) for f in free}) == len(free)  # the rows really differ
    # A stop id that ends the first row midway but never comes in another: rows finish apart.
    stop = next(t for t in free[0][1:] if any(t not in f for f in free[1:]))
    expected = [greedy_without_cache(model, p, 20, {stop}) for p in PROMPTS]
    assert len(expected[0]) < 20 and any(len(e) == 20 for e in expected)
    assert generate(model, PROMPTS, 20, {stop}) == expected


def test_cache_holds_the_same_keys_as_a_full_forward():
    """Prefill in two chunks, then compare the last layer's cached keys with one whole-sequence pass."""
    model = random_model()
    ids = torch.randint(0, 64, (2, 12))
    split = KVCache(model.config, 2, 12, torch.device("cpu"), torch.float32)
    whole = KVCache(model.config, 2, 12, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        first, second = model(ids[:, :7], cache=split), model(ids[:, 7:], cache=split)
        full = model(ids, cache=whole)
        plain = model(ids)
    assert split.length == whole.length == 12
    torch.testing.assert_close(split.keys[-1], whole.keys[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, plain, atol=1e-5, rtol=1e-5)


def test_generation_stops_at_max_seq_len_and_refuses_prompts_that_fill_it():
    model = random_model(max_seq_len=16)
    out = generate(model, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [4]], 100, set())
    assert [len(o) for o in out] == [6, 6]  # the longest prompt + its answer fill the 16 positions
    with pytest.raises(ValueError, match="leaves no room in model.max_seq_len=16"):
        generate(model, [list(range(16))], 5, set())
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 5, set())


def test_sampling_is_seeded_and_top_p_one_token_is_greedy():
    model = random_model()
    greedy = generate(model, PROMPTS, 12, set())
    a = generate(model, PROMPTS, 12, set(), temperature=1.0, seed=1)
    assert a == generate(model, PROMPTS, 12, set(), temperature=1.0, seed=1)
    assert a != generate(model, PROMPTS, 12, set(), temperature=1.0, seed=2)
    assert a != greedy
    # A nucleus too small for a second token is greedy decoding, whatever the temperature.
    assert generate(model, PROMPTS, 12, set(), temperature=5.0, top_p=1e-6, seed=3) == greedy
    with pytest.raises(ValueError, match="temperature >= 0 and 0 < top_p <= 1"):
        generate(model, PROMPTS, 4, set(), top_p=0.0)


def test_top_p_samples_the_nucleus_in_proportion():
    """probs (0.5, 0.3, 0.15, 0.05): top_p=0.7 keeps the first two (0.5 < 0.7 <= 0.8) and samples
    them 5:3; temperature 1 without top_p samples all four in proportion."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(pick_next(logits, 1.0, 0.7, gen), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    counts = torch.bincount(pick_next(logits, 1.0, 1.0, gen), minlength=4).float() / 20000
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)
    # temperature 0.5 squares the odds: (25, 9, 2.25, 0.25) / 36.5
    counts = torch.bincount(pick_next(logits, 0.5, 1.0, gen), minlength=4).float() / 20000
    torch.testing.assert_close(counts, probs**2 / (probs**2).sum(), atol=0.015, rtol=0)
    assert pick_next(logits[:3], 0.0, 0.1, gen).tolist() == [0, 0, 0]
