"""train.base_kl, SFT's pull toward the base model (minisft/base_kl.py), against the same maths written
out on full logits: the base's top-k distributions and the KL through their k + 1 buckets (values and
gradients; the full KL at k = V), near zero at step 0, the base as the run started (kept through a
resume), one big batch = accumulated micro-batches = packed rows = two ranks, the Triton kernels, the
effect it exists for, and the command line."""

import json
import random
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_lora import randomise_adapters_
from test_packing import random_examples
from test_resume import CFG, HELDOUT, TRAIN, Crash, assert_same_weights, crash_at_step, records
from test_train_parts import tiny_model

import minisft.loss
from minisft.__main__ import main
from minisft.base_kl import BaseKL, anchored_positions
from minisft.config import load_config
from minisft.distributed import Replica
from minisft.labels import IGNORE_INDEX
from minisft.lora import LoRAConfig, apply_lora
from minisft.model import Backends
from minisft.packing import Batch, pack_examples, pad_batch
from minisft.train import evaluate, train_loop

from helpers import interpreter_only, sharpen_

pytestmark = pytest.mark.usefixtures("one_thread")


def kl_on_full_logits(logits, base_logits, positions) -> torch.Tensor:
    """Σ over marked positions of Σ_v q (log q − log p), every logit held at once."""
    log_p, log_q = logits.float().log_softmax(-1), base_logits.float().log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)[positions].sum()


def bucketed_kl_by_hand(logits, base_logits, k) -> torch.Tensor:
    """Rows of (V,) logits -> the KL through the base's top-k tokens and one bucket for the rest, in
    float64, each bucket's probability a plain sum of softmax entries."""
    p, q = logits.double().softmax(-1), base_logits.double().softmax(-1)
    top = q.topk(k, dim=-1).indices
    q_top, p_top = q.gather(-1, top), p.gather(-1, top)
    q_rest, p_rest = 1 - q_top.sum(-1), 1 - p_top.sum(-1)
    return (q_top * (q_top / p_top).log()).sum(-1) + q_rest * (q_rest / p_rest).log()


def test_top_k_distributions_keep_the_likeliest_tokens_and_the_rest_mass():
    gen = torch.Generator().manual_seed(1)
    hidden, head = torch.randn(5, 8, generator=gen), torch.randn(23, 8, generator=gen)
    probs = (hidden @ head.T).softmax(-1)
    ids, top, rest = minisft.loss.top_k_distributions(hidden, head, 4)
    assert ids.dtype == torch.int32 and ids.shape == (5, 4) and top.shape == (5, 4)
    assert torch.equal(top, probs.sort(-1, descending=True).values[:, :4])
    assert torch.equal(probs.gather(-1, ids.long()), top)
    torch.testing.assert_close(rest, 1 - top.sum(-1))
    ids, top, rest = minisft.loss.top_k_distributions(hidden, head, 100)  # k beyond V: all of them, no rest
    assert ids.shape == (5, 23) and not rest.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])  # one row per chunk, uneven chunks, one chunk
@pytest.mark.parametrize("k", [37, 5])  # the whole vocabulary (the exact KL), or its top 5 and the rest
def test_base_kl_sum_equals_the_kl_written_out_values_and_gradients(dtype, chunk_rows, k, monkeypatch):
    vocab, dim = 37, 11
    monkeypatch.setattr(minisft.loss, "KL_CHUNK_LOGITS", chunk_rows * vocab)  # the base's top k and the KL
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, dim, generator=gen).to(dtype).requires_grad_()
    head = (torch.randn(vocab, dim, generator=gen) / 3).to(dtype).requires_grad_()
    base_hidden = torch.randn(2, 7, dim, generator=gen).to(dtype)
    base_head = (torch.randn(vocab, dim, generator=gen) / 3).to(dtype)
    positions = torch.rand(2, 7, generator=gen) < 0.6
    base = minisft.loss.top_k_distributions(base_hidden[positions], base_head, k)

    ours = minisft.loss.base_kl_sum(hidden, head, positions, *base)
    ours_grads = torch.autograd.grad(ours, [hidden, head])
    logits, base_logits = hidden @ head.T, base_hidden @ base_head.T
    full = kl_on_full_logits(logits, base_logits, positions)
    ref = full if k == vocab else bucketed_kl_by_hand(logits[positions], base_logits[positions], k).sum()
    ref_grads = torch.autograd.grad(ref, [hidden, head])
    assert ours.dtype == torch.float32 and float(ref.detach()) > 0.5
    assert float(ours.detach()) <= float(full.detach()) + 1e-5  # merging outcomes never adds divergence
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)
    for g, r in zip(ours_grads, ref_grads, strict=True):
        # bf16: each chunk's head gradient is a bf16 matmul, summed in another order than the reference's
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(g, r.to(g.dtype), rtol=tolerance, atol=tolerance * 0.1)


def test_base_kl_sum_of_no_position_is_zero_with_zero_gradients():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    none = torch.zeros(1, 4, dtype=torch.bool)
    base = minisft.loss.top_k_distributions(torch.randn(0, 8), torch.randn(16, 8), 4)
    kl = minisft.loss.base_kl_sum(hidden, torch.randn(16, 8), none, *base)
    kl.backward()
    assert float(kl.detach()) == 0.0 and not hidden.grad.any()


def test_base_kl_sum_refuses_distributions_that_do_not_match_the_positions():
    base = minisft.loss.top_k_distributions(torch.randn(2, 8), torch.randn(16, 8), 4)
    with pytest.raises(ValueError, match="3 marked positions but the base's distributions at 2"):
        minisft.loss.base_kl_sum(torch.randn(1, 4, 8), torch.randn(16, 8), torch.tensor([[1, 1, 1, 0]]).bool(), *base)


def padded_batch(examples, pad_id: int = 0) -> Batch:
    return Batch(*pad_batch(examples, pad_id))


EXAMPLES = random_examples(random.Random(3), 10, vocab=50)  # prompts (label -100) of several lengths, then answers


def test_anchored_positions_are_the_prompts_real_tokens():
    batch = padded_batch(EXAMPLES[:3])
    positions = anchored_positions(batch, pad_id=0)
    for row, example in enumerate(EXAMPLES[:3]):
        expected = [label == IGNORE_INDEX for label in example.labels]
        expected += [False] * (batch.input_ids.shape[1] - len(example.input_ids))  # the pads
        assert positions[row].tolist() == expected
    assert 0 < int(positions.sum()) < int((batch.labels == IGNORE_INDEX).sum())
    # train.base_kl_every = 3: one prompt position in 3, from column (the sum of the row's tokens) mod 3
    every_third = anchored_positions(batch, pad_id=0, every=3)
    for row, example in enumerate(EXAMPLES[:3]):
        phase = sum(example.input_ids) % 3
        expected = [t for t in range(phase, positions.shape[1], 3) if positions[row, t]]
        assert every_third[row].nonzero()[:, 0].tolist() == expected
    assert len({sum(e.input_ids) % 3 for e in EXAMPLES[:3]}) > 1  # the rows' phases differ


def pulled(
    model, items, weight: float = 0.5, top_k: int = 64, precision: str = "auto", every: int = 1
) -> tuple[BaseKL, list]:
    """The objective and its items, the base's distributions taken from `model` as it is now (as
    train_loop does before its first step)."""
    objective = BaseKL(weight, pad_id=0, every=every)
    cfg = replace(CFG, base_kl=weight, base_kl_top_k=top_k, precision=precision, base_kl_every=every)
    return objective, objective.with_base(model, items, cfg, "test")


def objective_loss(model, objective, batches) -> tuple[float, float]:
    """A step's loss and mean KL summed over its micro-batches, each backward run as the loop runs it
    (the gradients add up in .grad)."""
    normaliser = objective.count(batches, 0, torch.device("cpu"))[0]
    loss_sum, kl_sum = 0.0, 0.0
    for batch in batches:
        loss, (kl,) = objective.loss(Replica(model), batch, normaliser)
        loss.backward()
        loss_sum, kl_sum = loss_sum + float(loss), kl_sum + float(kl)
    return loss_sum, kl_sum


@pytest.mark.parametrize("start", ["full", "lora", "lora with an adapter loaded"])
def test_at_step_zero_the_pull_is_zero_and_the_loss_is_sfts(start):
    """The base is the model as the run starts: with an adapter already trained (`lora.adapter`) too."""
    model = sharpen_(tiny_model(vocab_size=50, seed=4), seed=4)
    if start != "full":
        apply_lora(model, LoRAConfig(r=4))
    if start == "lora with an adapter loaded":
        randomise_adapters_(model, seed=4, std=0.1)
    objective, items = pulled(model, EXAMPLES, weight=3.0)
    batch = objective.collate(items, 0)
    n = objective.count([batch], 0, torch.device("cpu"))[0]
    loss, (kl,) = objective.loss(Replica(model), batch, n)
    assert abs(float(kl)) < 1e-6  # the same logits up to the order of a matmul's sums: ±rounding
    torch.testing.assert_close(loss, model.loss(batch.input_ids, batch.labels, n), rtol=0, atol=3e-6)


@pytest.mark.parametrize("every", [1, 3], ids=["every position", "every 3rd"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_objective_equals_sft_plus_weight_times_mean_kl_on_full_logits(lora, every):
    """Loss and every gradient against the definition: CE over answers / N + λ Σ_P KL / |P|, the base
    an independent copy of the starting weights, the model moved away from it first (top k = V: the
    exact KL); with train.base_kl_every, P is the prompt positions in columns 0, every, 2·every, ..."""
    weight = 0.7
    base = sharpen_(tiny_model(vocab_size=50, seed=6), seed=6)
    model = sharpen_(tiny_model(vocab_size=50, seed=6), seed=6)
    if lora:
        apply_lora(model, LoRAConfig(r=4))
    objective, items = pulled(model, EXAMPLES, weight, top_k=50, every=every)  # the base: now, before the model moves
    if lora:
        randomise_adapters_(model, seed=6, std=0.1)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    batch = objective.collate(items, 0)
    n = objective.count([batch], 0, torch.device("cpu"))[0]
    loss, (kl,) = objective.loss(Replica(model), batch, n)
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, trained)

    positions = (batch.labels == IGNORE_INDEX) & (batch.input_ids != 0)
    phases = torch.tensor([sum(item.input_ids) % every for item in EXAMPLES])[:, None]  # pads are 0
    positions &= torch.arange(positions.shape[1]) % every == phases
    logits = model.logits(model(batch.input_ids))
    with torch.no_grad():
        base_logits = base.logits(base(batch.input_ids))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="sum") / n
    mean_kl = kl_on_full_logits(logits, base_logits, positions) / positions.sum()
    ref_grads = torch.autograd.grad(ce + weight * mean_kl, trained)
    assert float(mean_kl.detach()) > 1e-3
    torch.testing.assert_close(kl, mean_kl.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, ce + weight * mean_kl, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def lora_model(seed: int = 7, backend: str = "torch"):
    model = sharpen_(tiny_model(vocab_size=50, seed=seed, n_heads=2, n_kv_heads=1), seed=seed)
    model.backends = Backends(backend, backend)
    apply_lora(model, LoRAConfig(r=4))
    return model


def test_accumulated_and_packed_steps_equal_one_padded_batch():
    """|P| is the step's: two micro-batches, or the examples packed into rows, give one batch's loss,
    mean KL and gradients; each item's distributions follow it into whatever batch it lands in."""
    found = {}
    rows = pack_examples(EXAMPLES, max_len=48)
    splits = {"one": [EXAMPLES], "accumulated": [EXAMPLES[:3], EXAMPLES[3:]], "packed": [rows]}
    assert len(rows) < len(EXAMPLES)
    for name, parts in splits.items():
        model = lora_model()
        objective, items = pulled(model, [item for part in parts for item in part], top_k=6)
        randomise_adapters_(model, seed=7, std=0.1)
        ends = [0, *torch.tensor([len(part) for part in parts]).cumsum(0).tolist()]
        batches = [objective.collate(items[a:b], 0) for a, b in zip(ends, ends[1:], strict=False)]
        loss, kl = objective_loss(model, objective, batches)
        found[name] = (loss, kl, [p.grad for p in model.parameters() if p.grad is not None])
    loss, kl, grads = found["one"]
    assert kl > 1e-3
    for name in ("accumulated", "packed"):
        assert found[name][0] == pytest.approx(loss, rel=1e-5) and found[name][1] == pytest.approx(kl, rel=1e-5)
        for g, r in zip(found[name][2], grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)


def test_under_bf16_autocast_it_is_near_zero_at_step_zero_and_near_the_fp32_value():
    model = lora_model(seed=4)
    found = {}
    for precision in ("fp32", "bf16"):  # the base's distributions made in the steps' precision, as the loop does
        objective, items = pulled(model, EXAMPLES, precision=precision)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            found[precision] = objective_loss(model, objective, [objective.collate(items, 0)])
    assert found["bf16"][1] < 1e-4  # bf16 logits of one row alone vs in a batch: a few roundings apart
    randomise_adapters_(model, seed=4, std=0.1)
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            found[precision] = objective_loss(model, objective, [objective.collate(items, 0)])
    assert found["fp32"][1] > 1e-2
    assert found["bf16"] == pytest.approx(found["fp32"], rel=3e-2)


def test_train_loop_refuses_base_kl_with_another_objective(tmp_path):
    with pytest.raises(ValueError, match="adds to SFT's token loss, not to another objective's"):
        train_loop(tiny_model(), TRAIN, {}, KL_CFG, 0, tmp_path, objective=BaseKL(1.0, 0))


@interpreter_only
def test_on_the_triton_kernels_it_equals_the_torch_path():
    found = {}
    for backend in ("torch", "triton"):
        model = lora_model(seed=8, backend=backend)
        objective, items = pulled(model, EXAMPLES[:4], top_k=6)
        randomise_adapters_(model, seed=8, std=0.1)
        loss, kl = objective_loss(model, objective, [objective.collate(items, 0)])
        found[backend] = (loss, kl, [p.grad for p in model.parameters() if p.grad is not None])
    assert found["triton"][:2] == pytest.approx(found["torch"][:2], rel=1e-4)
    for g, r in zip(found["triton"][2], found["torch"][2], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)


KL_CFG = replace(CFG, base_kl=2.0)


def run_anchored(run_dir, resume=False, cfg=KL_CFG, seed=0):
    model = tiny_model(vocab_size=16, max_seq_len=32, seed=seed)
    train_loop(model, TRAIN, {"heldout": HELDOUT}, cfg, 0, run_dir, "test", 0, resume)
    return model


def test_a_resumed_run_keeps_the_starting_model_as_its_base_bitwise(tmp_path, monkeypatch):
    """A resumed run makes the base's distributions again: from the model it is given, before it
    restores its checkpoint, or its base would be the step-4 model and every later step would differ."""
    whole = run_anchored(tmp_path / "whole")
    with monkeypatch.context() as patch:
        crash_at_step(patch, 6)
        with pytest.raises(Crash):
            run_anchored(tmp_path / "resumed")
    resumed = run_anchored(tmp_path / "resumed", resume=True)
    assert_same_weights(resumed, whole)
    assert records(tmp_path / "resumed") == records(tmp_path / "whole")
    kls = [r["base_kl"] for r in records(tmp_path / "whole") if "base_kl" in r]
    assert kls[0] < 1e-6 and all(kl > 1e-4 for kl in kls[1:])


@pytest.mark.parametrize(("top_k", "kept"), [(16, 0.2), (3, 0.7)], ids=["whole distributions", "top 3 and the rest"])
def test_the_pull_keeps_the_prompts_predictions_near_the_base_and_still_learns(tmp_path, top_k, kept):
    """The effect it exists for, on the copy task: after 12 steps the anchored run's KL to the base on
    held-out prompts (the whole distributions') is far smaller than the free run's, and its answers'
    loss still fell. With the base's 16-token distributions cut to their top 3 it is smaller still,
    not as much (0.50×; whole: 0.06×): this random model's distributions are flat, its top 3 hold ~25%
    of their mass, and only the rest's total is pulled, not how it spreads."""
    base = tiny_model(vocab_size=16, max_seq_len=32)
    batch = padded_batch(HELDOUT)
    positions = anchored_positions(batch, 0)

    def kl_to_base(model) -> float:
        with torch.no_grad():
            return float(
                kl_on_full_logits(model.logits(model(batch.input_ids)), base.logits(base(batch.input_ids)), positions)
                / positions.sum()
            )

    free = run_anchored(tmp_path / "free", cfg=replace(KL_CFG, base_kl=0.0, save_every=0))
    anchored = run_anchored(tmp_path / "anchored", cfg=replace(KL_CFG, save_every=0, base_kl_top_k=top_k))
    assert kl_to_base(anchored) < kept * kl_to_base(free)
    start = evaluate(base, HELDOUT, 0, 16)  # 2.76; the free run ends at 2.28, the pulled ones at 2.40 and 2.26
    assert evaluate(anchored, HELDOUT, 0, 16) < start - 0.25


def rank_main(rank: int, world: int, store: str, run_dir: str, weights: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = run_anchored(run_dir, cfg=replace(KL_CFG, steps=4, grad_accum=1, save_every=0))
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_with_accumulation(tmp_path):
    """|P| is summed over ranks as N is: DDP's two ranks train the weights one process does."""
    weights = tmp_path / "ddp.safetensors"
    mp.spawn(rank_main, args=(2, str(tmp_path / "store"), str(tmp_path / "ddp"), str(weights)), nprocs=2, join=True)
    single = run_anchored(tmp_path / "single", cfg=replace(KL_CFG, steps=4, grad_accum=2, save_every=0))
    ddp = load_file(str(weights))
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp[name], value, atol=1e-6, rtol=0, msg=name)
    kls = {name: [r["base_kl"] for r in records(tmp_path / name) if "base_kl" in r] for name in ("ddp", "single")}
    assert kls["ddp"] == pytest.approx(kls["single"], abs=1e-6) and kls["single"][-1] > 0


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """A tiny model trained a few steps from random by `train` (its final checkpoint: a folder `--init`
    takes), chat data, and plain text for the forgetting curve."""
    from minisft.demo import TASKS, conversation, write_jsonl
    from minisft.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("base_kl")
    chats = [conversation(TASKS[i % 3], "a c b", TASKS[i % 3].answer(["a", "c", "b"])) for i in range(24)]
    write_jsonl(root / "train.jsonl", chats[:20])
    write_jsonl(root / "eval.jsonl", chats[20:])
    (root / "text.txt").write_text("the a b c of it, sorted or not\nc b a and then some more\n")
    Tokenizer.train_bpe(["sort a c b : a b c", "user", "assistant"], vocab_size=280).save(root / "tok")
    args = ["train", "--data.train_file", str(root / "train.jsonl"), "--data.tokenizer", str(root / "tok")]
    args += ["--model.dim", "32", "--model.n_layers", "1", "--model.ffn_dim", "64", "--out_dir", str(root / "base")]
    assert main([*args, "--steps", "4", "--batch_size", "4", "--save_every", "0"]) == 0
    return root


def run_args(root, out, *extra: str) -> list[str]:
    return [
        "train", "--init", str(root / "base" / "checkpoints" / "final"), "--data.train_file",
        str(root / "train.jsonl"), "--data.eval_file", str(root / "eval.jsonl"), "--data.plain_text_eval",
        str(root / "text.txt"), "--out_dir", str(out), "--steps", "4", "--batch_size", "4", "--lr", "1e-2",
        "--warmup_steps", "1", "--log_every", "1", "--eval_every", "2", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "lora", [[], ["--lora.r", "4", "--lora.dropout", "0.1", "--train.base_kl_every", "2"]], ids=["full", "lora"]
)
def test_train_with_base_kl_from_the_command_line(started, tmp_path, lora, monkeypatch):
    """`train --init BASE --train.base_kl 2 --train.base_kl_top_k 8`, full or LoRA (every 2nd prompt
    position): a finished run whose
    metrics log the pull, ~0 at step 1 (the model is its base) and positive after; the forgetting curve
    beside it; and the same run killed at step 3 and resumed ends bitwise where it did (the base as it
    started)."""

    def args(out):
        return [
            *run_args(started, out, "--train.base_kl", "2", "--train.base_kl_top_k", "8", "--save_every", "2"),
            *lora,
        ]

    assert main(args(tmp_path / "run")) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["base_kl"] for r in lines if "train_loss" in r]
    assert len(kls) == 4 and kls[0] < 1e-6 and all(kl > 2 * kls[0] for kl in kls[1:]) and kls[-1] > 1e-4
    assert len([r for r in lines if "eval_loss/plain_text" in r]) == 2
    assert (tmp_path / "run" / "checkpoints" / "final").is_dir()
    saved = load_config(tmp_path / "run" / "config.toml").train
    assert (saved.base_kl, saved.base_kl_top_k, saved.base_kl_every) == (2.0, 8, 2 if lora else 1)
    with monkeypatch.context() as patch:
        crash_at_step(patch, 3)
        with pytest.raises(Crash):
            main(args(tmp_path / "resumed"))
    assert main(["train", "--resume", str(tmp_path / "resumed")]) == 0
    assert records(tmp_path / "resumed") == records(tmp_path / "run")
    for file in (tmp_path / "run" / "checkpoints" / "final").glob("*.safetensors"):
        resumed = load_file(tmp_path / "resumed" / "checkpoints" / "final" / file.name)
        for name, tensor in load_file(file).items():
            assert torch.equal(resumed[name], tensor), name


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train.base_kl", "-1"], "train.base_kl must be at least 0"),
        (["--train.base_kl", "1", "--objective", "dpo"], "train.base_kl is SFT's"),
        (["--train.base_kl", "1", "--train.fsdp", "true"], "train.base_kl with train.fsdp is not supported"),
        (["--train.base_kl", "1", "--data.train_on", "all"], 'data.train_on = "all" leaves none'),
        (["--train.base_kl", "1", "--train.base_kl_top_k", "0"], "train.base_kl_top_k must be at least 1"),
        (["--train.base_kl_top_k", "8"], "train.base_kl_top_k does nothing without train.base_kl > 0"),
        (["--train.base_kl", "1", "--train.base_kl_every", "0"], "train.base_kl_every must be at least 1, got 0"),
        (["--train.base_kl_every", "4"], "train.base_kl_every does nothing without train.base_kl > 0"),
        (["--train.base_kl", "1", "--init", ""], "train.base_kl needs init"),
    ],
)
def test_base_kl_mistakes_are_one_line_and_write_nothing(started, tmp_path, capsys, extra, message):
    capsys.readouterr()
    assert main([*run_args(started, tmp_path / "run", *extra), "--data.tokenizer", str(started / "tok")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_train_help_lists_base_kl(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--train.base_kl " in out and "--train.base_kl_top_k " in out and "--train.base_kl_every " in out
