"""The pieces of training and inference: schedule, example stream, padding, greedy decoding,
checkpoints, and a short real training run."""

import json
import math
import random
import re

import pytest
import torch

from minisft.chat import Example
from minisft.checkpoint import load_model, save_model
from minisft.generate import generate_greedy
from minisft.model import ModelConfig, Transformer
from minisft.packing import Batch, pad_batch
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


# ---------------------------------------------------------------- the console and MFU


def test_rates_and_clocks_read_at_every_scale():
    from minisft.bookkeeping import clock, per_second

    assert [per_second(x, "tok") for x in (0.4, 37, 999, 1000, 3849, 2.5e6)] == [
        "0 tok/s", "37 tok/s", "999 tok/s", "1.0k tok/s", "3.8k tok/s", "2.50M tok/s"
    ]  # fmt: skip
    assert [clock(s) for s in (0, 65.9, 3599, 3725)] == ["0:00", "1:05", "59:59", "1:02:05"]


def test_the_console_says_what_the_loop_does(tmp_path, capsys):
    model = tiny_model(vocab_size=16, max_seq_len=16)
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-2, warmup_steps=10, eval_every=2, log_every=2, save_every=4)
    train_loop(model, copy_task(32, 0), {"heldout": copy_task(8, 1)}, cfg, pad_id=0, run_dir=tmp_path, label="t")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "t: steps 1-4, 8 examples (or packed rows) each, peak lr 0.01 after 10 warmup steps; "
        "a progress line every 2 steps"
    )
    assert err[1].startswith("t: warning: the whole run is warmup (train.warmup_steps = 10 ≥ train.steps = 4)")
    assert "climbs to 0.004" in err[1]  # 4 of 10 warmup steps: lr · 4 / 10, by hand
    progress = [line for line in err if line.startswith("t [")]
    assert len(progress) == 2 and re.search(
        r"\] 2/4 \| loss \d\.\d{4} \| \d+(\.\dk)? tok/s \| 0:\d\d elapsed, ETA 0:\d\d$", progress[0]
    )
    evals = [line for line in err if "held-out loss" in line]
    assert re.fullmatch(r"t: step 2 held-out loss heldout \d\.\d{4} \(best so far\)", evals[0]) and len(evals) == 2
    assert f"t: saved {tmp_path / 'checkpoints' / 'step_4'}" in err


def test_mfu_is_model_flops_per_second_over_the_peak(tmp_path, monkeypatch):
    import minisft.bookkeeping

    monkeypatch.setattr(minisft.bookkeeping, "peak_flops", lambda device: 1e9)
    model = tiny_model(vocab_size=16, max_seq_len=16)
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-2, warmup_steps=1, eval_every=0, log_every=1, save_every=0)
    train_loop(model, copy_task(32, 0), {}, cfg, pad_id=0, run_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # By hand (PaLM appendix B): 6 FLOPs per matmul weight per token — q, k, v, o, the SwiGLU's three
    # and the tied head — plus 12·L·d·T/2 for causal attention over rows of T = 10 tokens.
    d, L, kv, ffn, V, T = 32, 2, 16, 64, 16, 10
    weights = L * (2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d) + d + V * d  # norms counted, as num_params does
    per_token = 6 * weights + 12 * L * d * T // 2
    for r in records:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e9, rel=1e-9)


def test_peak_flops_by_device():
    from minisft.flops import GPU_PEAK_FLOPS, measured_cpu_peak, peak_flops

    names = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12}
    for name, peak in names.items():
        assert next(v for k, v in GPU_PEAK_FLOPS.items() if k in name) == peak, name
    cpu = peak_flops(torch.device("cpu"))
    assert 1e9 < cpu < 1e13 and cpu == measured_cpu_peak(torch.get_num_threads())  # measured once per process


def test_bf16_precision_on_a_cpu_autocasts_each_forward_and_never_reads_stale_weights():
    """train.precision = "bf16" runs a CPU forward in bf16 (its loss differs from fp32's, and equals an
    explicit autocast's) while the weights stay fp32; two steps in a row each see the updated weights —
    which a loop inside one autocast context would not (autocast caches its bf16 weight copies)."""
    from minisft.distributed import Replica
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
        batch = [Batch(ids, ids)]
        return [optimizer_step(Replica(model), optimizer, batch, ids.numel(), 1.0, precision)[0] for _ in "ab"]

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
