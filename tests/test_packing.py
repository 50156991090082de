"""Packing: best-fit decreasing never splits, drops or overfills; a packed batch's tensors are
what its documents say; the loss and gradients of a packed batch equal those of the same
examples padded; the training loop passes the packing ids to the model."""

import math
import random

import pytest
import torch

from minisft.chat import Example
from minisft.distributed import Replica
from minisft.model import Backends, ModelConfig, Transformer
from minisft.packing import Batch, pack, pack_examples, packed_batch, packing_efficiency, pad_batch
from minisft.train import TrainConfig, optimizer_step, train_loop

from helpers import assert_packed_equals_alone

pytestmark = pytest.mark.usefixtures("one_thread")


def test_best_fit_decreasing_by_hand():
    # longest first: 6 opens row 0 (4 left), 5 opens row 1 (5 left); 4 fits both, goes to the
    # fuller row 0 (0 left); 3 and then 2 fill row 1 (2 left, then 0); 1 fits nowhere: row 2.
    assert pack([3, 6, 2, 5, 4, 1], max_len=10) == [[1, 4], [3, 0, 2], [5]]
    assert pack([], max_len=4) == []
    with pytest.raises(ValueError, match=r"1 examples are longer than the row \(5 > 4 tokens\)"):
        pack([1, 5], max_len=4)


def naive_best_fit_decreasing(lengths: list[int], max_len: int) -> list[list[int]]:
    """The textbook algorithm, scanning every row for every example."""
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        free = [(max_len - sum(lengths[j] for j in row), r) for r, row in enumerate(rows)]
        fits = [(space, r) for space, r in free if space >= lengths[i]]
        if fits:
            rows[min(fits)[1]].append(i)
        else:
            rows.append([i])
    return rows


@pytest.mark.parametrize("seed", range(20))
def test_pack_never_splits_drops_or_overfills(seed):
    rng = random.Random(seed)
    max_len = rng.choice([8, 64, 512])
    lengths = [rng.randint(1, max_len) for _ in range(rng.randrange(1, 300))]
    rows = pack(lengths, max_len)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each exactly once
    assert all(sum(lengths[i] for i in row) <= max_len for row in rows)
    assert len(rows) >= math.ceil(sum(lengths) / max_len)  # no packing can use fewer rows
    assert rows == naive_best_fit_decreasing(lengths, max_len)


def test_packing_efficiency():
    rows = pack_examples([Example([1] * n, [2] * n) for n in (3, 5, 2, 6)], max_len=8)
    assert [[len(e.input_ids) for e in row] for row in rows] == [[6, 2], [5, 3]]
    assert packing_efficiency(rows, 8) == 16 / 16
    assert packing_efficiency(pack_examples([Example([1] * 3, [2] * 3)], 8), 8) == 3 / 8


def test_packed_batch_tensors():
    a = Example([10, 11, 12], [-100, 12, 13])
    b = Example([20, 21], [21, -100])
    c = Example([30, 31, 32, 33], [31, 32, -100, 34])
    batch = packed_batch([[a, b], [c]], pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 0]]
    assert batch.labels.tolist() == [[-100, 12, 13, 21, -100], [31, 32, -100, 34, -100]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.document_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]
    assert all(t.dtype == torch.long for t in batch[:4])


def random_examples(rng: random.Random, n: int, vocab: int) -> list[Example]:
    examples = []
    for _ in range(n):
        length = rng.randint(2, 20)
        ids = [rng.randrange(1, vocab) for _ in range(length + 1)]
        answer = rng.randrange(1, length)  # the tokens from here on are trained
        labels = [token if t >= answer else -100 for t, token in enumerate(ids[1:])]
        examples.append(Example(ids[:-1], labels))
    return examples


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    return Transformer(config, Backends("torch", "torch"))


@pytest.mark.parametrize("seed", range(3))
def test_packed_loss_and_gradients_equal_unpacked(seed):
    rng = random.Random(seed)
    examples = random_examples(rng, 12, vocab=50)
    rows = pack_examples(examples, max_len=48)
    assert len(rows) < len(examples)  # the test packs several documents per row
    # Random tokens make small leaks: the leak check uses the tighter tolerance.
    assert_packed_equals_alone(tiny_model(seed), examples, packed_batch(rows, pad_id=0), leak_tolerance=1e-5)


def test_optimizer_step_passes_packing_ids_to_the_model():
    rng = random.Random(5)
    examples = random_examples(rng, 10, vocab=50)
    n = sum(e.num_trained_tokens for e in examples)
    results = []
    for batches in (
        [Batch(*pad_batch(examples[:5], 0)), Batch(*pad_batch(examples[5:], 0))],
        [packed_batch(pack_examples(examples[:5], 40), 0), packed_batch(pack_examples(examples[5:], 40), 0)],
    ):
        model = tiny_model(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss, norm, _ = optimizer_step(Replica(model), optimizer, batches, n, grad_clip=0.0)
        results.append((loss, norm, model.embed_tokens.weight.detach().clone()))
    (pad_loss, pad_norm, pad_w), (pack_loss, pack_norm, pack_w) = results
    torch.testing.assert_close(pack_loss, pad_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pack_norm, pad_norm, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pack_w, pad_w, atol=1e-6, rtol=1e-5)


def test_train_loop_with_packing_learns_and_reports_efficiency(tmp_path, capsys):
    rng = random.Random(0)
    examples = []
    for _ in range(64):  # copy task: [1, x.., 2] -> x.., 3 with only the answer trained
        xs = [rng.randrange(4, 12) for _ in range(rng.randint(2, 6))]
        ids = [1, *xs, 2, *xs, 3]
        labels = [token if t >= len(xs) + 1 else -100 for t, token in enumerate(ids[1:])]
        examples.append(Example(ids[:-1], labels))
    model = tiny_model(0)
    before = model.loss(*pad_batch(examples, 0), sum(e.num_trained_tokens for e in examples)).item()
    cfg = TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup_steps=3, eval_every=0, log_every=10)
    train_loop(model, examples, {}, cfg, pad_id=0, run_dir=tmp_path, label="packed", pack_to=32)
    after = model.loss(*pad_batch(examples, 0), sum(e.num_trained_tokens for e in examples)).item()
    assert after < before - 1.0
    rows = pack_examples(examples, 32)
    expected = f"packed: packed 64 examples into {len(rows)} rows of 32 tokens, {packing_efficiency(rows, 32):.1%}"
    assert expected in capsys.readouterr().out
