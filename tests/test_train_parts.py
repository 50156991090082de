"""The pieces of training and inference: schedule, example stream, padding, greedy decoding,
checkpoints, and a short real training run."""

import json
import math
import random

import pytest
import torch

from minisft.chat import Example
from minisft.checkpoint import load_model, save_model
from minisft.generate import generate_greedy
from minisft.model import ModelConfig, Transformer
from minisft.packing import pad_batch
from minisft.tokenizer import Tokenizer
from minisft.train import TrainConfig, evaluate, example_stream, learning_rate, train_loop

from helpers import greedy_without_cache

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(vocab_size=64, seed=0, scale=None, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    model = Transformer(ModelConfig(**{**cfg, **overrides}))
    if scale:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, scale / math.sqrt(p.shape[1]))
    return model


# ---------------------------------------------------------------- learning-rate schedule


def test_learning_rate_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(steps=50, lr=2e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [learning_rate(step, cfg) for step in range(cfg.steps)]
    # warmup: (step + 1) / warmup of the peak, by hand
    assert lrs[0] == pytest.approx(2e-4)
    assert lrs[:10] == pytest.approx([2e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[9] == pytest.approx(2e-3)  # the peak at the end of warmup...
    assert lrs[10] == pytest.approx(2e-3)  # ...held at the start of the cosine
    assert max(lrs) == pytest.approx(2e-3)
    assert lrs[-1] == pytest.approx(2e-3 * 0.1)  # the last step lands on lr * min_lr_ratio
    after = lrs[10:]
    assert all(a > b for a, b in zip(after, after[1:], strict=False))  # strictly decreasing after warmup
    # the midpoint of the cosine is halfway between peak and floor
    mid = 10 + (cfg.steps - 1 - 10) / 2
    assert learning_rate(mid, cfg) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5))


def test_learning_rate_without_warmup_starts_at_the_peak():
    cfg = TrainConfig(steps=5, lr=1.0, warmup_steps=0, min_lr_ratio=0.0)
    assert [learning_rate(s, cfg) for s in range(5)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    )


# ---------------------------------------------------------------- example stream


def _examples(n):
    return [Example(input_ids=[i], labels=[i]) for i in range(n)]


def test_example_stream_epochs():
    examples = _examples(10)
    stream = example_stream(examples, batch_size=4, seed=3)
    epoch1 = [next(stream) for _ in range(3)]
    assert [len(b) for b in epoch1] == [4, 4, 2]  # the short last batch is kept
    order1 = [e.input_ids[0] for batch in epoch1 for e in batch]
    assert sorted(order1) == list(range(10))  # every example exactly once
    epoch2 = [next(stream) for _ in range(3)]
    order2 = [e.input_ids[0] for batch in epoch2 for e in batch]
    assert sorted(order2) == list(range(10))
    assert order2 != order1  # reshuffled every epoch

    # the same seed gives the same order: that of random.Random(seed) shuffling 0..n-1 each epoch
    rng = random.Random(3)
    expected = []
    for _ in range(2):
        order = list(range(10))
        rng.shuffle(order)
        expected.append(order)
    assert [order1, order2] == expected
    again = example_stream(examples, batch_size=4, seed=3)
    assert [e.input_ids[0] for _ in range(3) for e in next(again)] == order1
    other = example_stream(examples, batch_size=4, seed=4)
    assert [e.input_ids[0] for _ in range(3) for e in next(other)] != order1


def test_example_stream_refuses_no_examples():
    with pytest.raises(ValueError, match="no training examples"):
        next(example_stream([], batch_size=2, seed=0))


# ---------------------------------------------------------------- padding


def test_pad_batch():
    examples = [Example([5, 6, 7], [6, 7, -100]), Example([8], [9]), Example([1, 2], [-100, 3])]
    input_ids, labels = pad_batch(examples, pad_id=0)
    assert input_ids.dtype == labels.dtype == torch.long
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [1, 2, 0]]
    assert labels.tolist() == [[6, 7, -100], [9, -100, -100], [-100, 3, -100]]


# ---------------------------------------------------------------- greedy decoding


def test_generate_greedy_matches_one_prompt_at_a_time():
    model = tiny_model(scale=3.0).eval()
    prompts = [[3, 14, 15, 9, 2, 6, 5], [1], [27, 18, 28], [50, 40, 30, 20]]
    free = [greedy_without_cache(model, p, 12, set()) for p in prompts]
    # a stop id that ends one prompt midway, so rows finish at different steps
    stop = free[0][4]
    assert stop not in free[0][:4]
    stop_ids = {stop, 63}
    expected = [greedy_without_cache(model, p, 12, stop_ids) for p in prompts]
    assert len(expected[0]) == 4
    assert len({len(e) for e in expected}) > 1
    assert generate_greedy(model, prompts, 12, stop_ids) == expected
    assert generate_greedy(model, prompts, 12, set()) == free
    assert [len(f) for f in free] == [12] * 4


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(["hello world", "a b c d e f g", "the cat sat on the mat"] * 3, vocab_size=280)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_checkpoint_round_trip(tmp_path, tokenizer, tie):
    model = tiny_model(vocab_size=tokenizer.vocab_size, tie_embeddings=tie, scale=1.0)
    with torch.no_grad():
        model.norm.weight.mul_(1.5)  # a non-default gain must survive too
    folder = save_model(tmp_path / "ckpt", model, tokenizer, "chatml")
    assert folder == tmp_path / "ckpt"
    assert {"model.safetensors", "minisft.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}

    loaded, loaded_tok, chat_format = load_model(folder)
    assert chat_format == "chatml"
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    ids = torch.randint(0, tokenizer.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.logits(model(ids)), loaded.logits(loaded(ids)))
    assert loaded_tok.encode("hello world") == tokenizer.encode("hello world")
    assert (loaded_tok.eos_id, loaded_tok.pad_id) == (tokenizer.eos_id, tokenizer.pad_id)


def test_saving_twice_replaces_the_folder(tmp_path, tokenizer):
    first = tiny_model(vocab_size=tokenizer.vocab_size, seed=1)
    second = tiny_model(vocab_size=tokenizer.vocab_size, seed=2)
    save_model(tmp_path / "ckpt", first, tokenizer, "chatml")
    (tmp_path / "ckpt" / "stale.txt").write_text("from the first save")
    save_model(tmp_path / "ckpt", second, tokenizer, "chatml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no ckpt.tmp / ckpt.old left behind
    assert not (tmp_path / "ckpt" / "stale.txt").exists()
    loaded, _, _ = load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.embed_tokens.weight, second.embed_tokens.weight)
    assert not torch.equal(loaded.embed_tokens.weight, first.embed_tokens.weight)


def test_load_model_refuses_a_foreign_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a minisft model folder"):
        load_model(tmp_path)


# ---------------------------------------------------------------- a short training run


def copy_task(n, seed):
    """[1, x1..x4, 2] -> the model must answer x1..x4 then 3; only the answer is trained."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        xs = [rng.randrange(4, 12) for _ in range(4)]
        ids = [1, *xs, 2, *xs, 3]
        trained = [False] * 6 + [True] * 5
        labels = [token if keep else -100 for token, keep in zip(ids[1:], trained[1:], strict=True)]
        examples.append(Example(input_ids=ids[:-1], labels=labels))
    return examples


def test_train_loop_lowers_eval_loss_and_logs_metrics(tmp_path):
    model = tiny_model(vocab_size=16, max_seq_len=16)
    train_set, eval_set = copy_task(256, seed=0), copy_task(32, seed=1)
    before = evaluate(model, eval_set, pad_id=0, batch_size=16)
    assert before == pytest.approx(math.log(16), abs=0.2)  # an untrained model is near uniform
    cfg = TrainConfig(
        steps=20, batch_size=16, grad_accum=2, lr=1e-2, warmup_steps=3, eval_every=10, log_every=5, eval_batch_size=16
    )
    result = train_loop(model, train_set, {"heldout": eval_set}, cfg, pad_id=0, run_dir=tmp_path / "run", label="test")
    after = result["heldout"]
    assert after < before - 0.5
    assert after == pytest.approx(evaluate(model, eval_set, pad_id=0, batch_size=5), abs=1e-5)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train_loss" in r]
    eval_records = [r for r in records if "eval_loss/heldout" in r]
    assert len(records) == len(train_records) + len(eval_records)
    assert [r["step"] for r in train_records] == [5, 10, 15, 20]
    assert [r["step"] for r in eval_records] == [10, 20]
    for r in train_records:
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        assert r["lr"] == pytest.approx(learning_rate(r["step"] - 1, cfg))
        assert r["trained_tokens"] == 2 * 16 * 5  # two micro-batches of 16 examples, 5 trained tokens each
    assert eval_records[-1]["eval_loss/heldout"] == after
    assert train_records[-1]["train_loss"] < train_records[0]["train_loss"]


def test_bf16_precision_on_a_cpu_autocasts_each_forward_and_never_reads_stale_weights():
    """train.precision = "bf16" runs a CPU forward in bf16 (its loss differs from fp32's, and equals an
    explicit autocast's) while the weights stay fp32; two steps in a row each see the updated weights —
    which a loop inside one autocast context would not (autocast caches its bf16 weight copies)."""
    from minisft.train import make_optimizer, optimizer_step

    ids = torch.randint(0, 64, (2, 16))
    losses = {}
    for precision in ("fp32", "bf16"):
        model = tiny_model(scale=2.0)
        losses[precision] = evaluate(model, [Example(r.tolist(), r.tolist()) for r in ids], 0, 2, precision)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = tiny_model(scale=2.0).loss(ids, ids, ids.numel()).item()
    assert losses["bf16"] == pytest.approx(expected, rel=1e-6) and losses["bf16"] != losses["fp32"]

    def two_steps(model, precision):
        optimizer = make_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=1))
        return [optimizer_step(model, optimizer, [(ids, ids)], ids.numel(), 1.0, precision=precision)[0] for _ in "ab"]

    model = tiny_model(scale=2.0)
    first, second = two_steps(model, "bf16")
    assert model.embed_tokens.weight.dtype == torch.float32 and second < first - 0.05
    stale = tiny_model(scale=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bug the per-forward autocast avoids
        stale_first, stale_second = two_steps(stale, "fp32")
    # Same first step; the second reads the projections' first-step bf16 copies (only the embedding
    # and norm gains, which autocast does not cast, have moved).
    assert stale_first == first and abs(stale_second - second) > 1e-3
    with pytest.raises(ValueError, match="train.precision"):
        TrainConfig(precision="fp16")
