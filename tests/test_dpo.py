"""DPO: the loss against hand-derived values, per-sequence log-probs against full logits, the
preference data's layouts, masks and bad input, and the `dpo` command (metrics, resume, errors)."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train_parts import tiny_model

from minisft.__main__ import main
from minisft.chat import ChatML
from minisft.data import DataError
from minisft.distributed import Replica
from minisft.dpo import DPOConfig, DPOObjective, collate_pairs, dpo_losses, reference_log_probs
from minisft.labels import IGNORE_INDEX
from minisft.loss import sequence_log_probs_torch
from minisft.preference import load_pairs
from minisft.tokenizer import Tokenizer
from minisft.train import TrainConfig, make_optimizer, optimizer_step

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the loss


def test_dpo_losses_equal_the_papers_formulas_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    margin = (-3.0 - -4.0) - (-5.0 - -4.5)  # 1.5
    beta = 0.2
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    losses, chosen, rejected = dpo_losses(pc, pr, rc, rr, DPOConfig(beta=beta))
    assert losses.item() == pytest.approx(-math.log(sig(beta * margin)), rel=1e-6)
    assert chosen.item() == pytest.approx(beta * 1.0) and rejected.item() == pytest.approx(beta * -0.5)
    cdpo, _, _ = dpo_losses(pc, pr, rc, rr, DPOConfig(beta=beta, label_smoothing=0.1))
    expected = -0.9 * math.log(sig(beta * margin)) - 0.1 * math.log(sig(-beta * margin))
    assert cdpo.item() == pytest.approx(expected, rel=1e-6)
    ipo, _, _ = dpo_losses(pc, pr, rc, rr, DPOConfig(beta=beta, loss_type="ipo"))
    assert ipo.item() == pytest.approx((margin - 1 / (2 * beta)) ** 2, rel=1e-6)


def test_sft_weight_adds_the_chosen_answers_nll_per_token_rpo():
    """RPO (Pang et al. 2024, eq. 3): DPO's loss + α · (−log π(y_w|x)) / |y_w|; α = 0 is plain DPO."""
    pc, pr, rc, rr = (
        torch.tensor([-3.0, -8.0]),
        torch.tensor([-5.0, -2.0]),
        torch.tensor([-4.0, -6.0]),
        torch.tensor([-4.5, -2.5]),
    )
    tokens = torch.tensor([4, 16])
    plain, _, _ = dpo_losses(pc, pr, rc, rr, DPOConfig(beta=0.2))
    rpo, chosen, rejected = dpo_losses(pc, pr, rc, rr, DPOConfig(beta=0.2, sft_weight=0.5), tokens)
    by_hand = [
        -math.log(1 / (1 + math.exp(-0.2 * 1.5))) + 0.5 * 3.0 / 4,
        -math.log(1 / (1 + math.exp(0.2 * 2.5))) + 0.5 * 8.0 / 16,
    ]
    assert rpo.tolist() == pytest.approx(by_hand, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.2, -0.4])  # the rewards stay DPO's
    assert rejected.tolist() == pytest.approx([-0.1, 0.1])
    same, _, _ = dpo_losses(pc, pr, rc, rr, DPOConfig(beta=0.2, sft_weight=0.0), tokens)
    assert torch.equal(same, plain)
    with pytest.raises(ValueError, match="token count"):
        dpo_losses(pc, pr, rc, rr, DPOConfig(beta=0.2, sft_weight=0.5))


@pytest.mark.parametrize(
    "bad",
    [
        {"beta": 0},
        {"loss_type": "hinge"},
        {"label_smoothing": 0.5},
        {"loss_type": "ipo", "label_smoothing": 0.1},
        {"sft_weight": -1},
    ],
)
def test_dpo_config_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="dpo."):
        DPOConfig(**bad)


def test_sequence_log_probs_torch_match_full_logits_forward_and_backward(monkeypatch):
    import minisft.loss

    monkeypatch.setattr(minisft.loss, "CHUNK_LOGITS", 3 * 37)  # 3-row chunks: several of them
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    weight = torch.randn(37, 8, requires_grad=True)
    labels = torch.randint(0, 37, (3, 6))
    labels[:, :2] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX  # nothing trained: 0
    ours = sequence_log_probs_torch(hidden, weight, labels)
    logp = torch.log_softmax(hidden @ weight.T, -1)
    ref = torch.where(labels != IGNORE_INDEX, logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0).sum(-1)
    upstream = torch.tensor([0.5, 2.0, -1.0])
    grads = torch.autograd.grad(ours, (hidden, weight), upstream)
    ref_grads = torch.autograd.grad(ref, (hidden, weight), upstream)
    assert ours[1] == 0
    torch.testing.assert_close(ours, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_grad_accumulation_normalises_by_the_steps_pairs(tmp_path):
    """Two micro-batches of 2 pairs give the loss and gradients of one of 4 (the loss is per pair)."""
    pairs, _ = load_pairs(write(tmp_path, RECORDS[:4]), ChatML(TOKENIZER), 64)
    pairs = reference_log_probs(tiny_model(vocab_size=300), pairs, 0, 8, "fp32")
    found = []
    for split in ([pairs], [pairs[:2], pairs[2:]]):
        model = tiny_model(vocab_size=300, seed=1)
        batches = [collate_pairs(p, 0) for p in split]
        loss, _, stats = optimizer_step(
            Replica(model), make_optimizer(model, TrainConfig(lr=1e-9)), batches, 4, 0.0, "fp32",
            DPOObjective(DPOConfig(beta=0.5)),
        )  # fmt: skip
        found.append((loss, stats, [p.grad for p in model.parameters()]))
    (full, full_stats, _), (accumulated, acc_stats, _) = found
    assert full == pytest.approx(accumulated, rel=1e-6) and full > 0
    assert full_stats == pytest.approx(acc_stats, rel=1e-5)


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_dpo_gradient_through_the_model_equals_autograd_on_full_logits(tmp_path, sft_weight):
    """The objective's loss (chunked log-probs) against the same maths written out on full logits;
    with sft_weight, + α · the chosen answer's mean token NLL, its tokens counted from the labels."""
    pairs, _ = load_pairs(write(tmp_path, RECORDS[:3]), ChatML(TOKENIZER), 64)
    pairs = reference_log_probs(tiny_model(vocab_size=300, seed=2), pairs, 0, 8, "fp32")
    batch = collate_pairs(pairs, 0)
    model = tiny_model(vocab_size=300, seed=3)
    loss, _ = DPOObjective(DPOConfig(beta=0.3, sft_weight=sft_weight)).loss(Replica(model), batch, 3)
    ours = torch.autograd.grad(loss, list(model.parameters()))
    logp = torch.log_softmax(model.logits(model(batch.input_ids)), -1)
    keep = batch.labels != IGNORE_INDEX
    seq = torch.where(keep, logp.gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0], 0.0).sum(-1)
    ratio = seq - batch.reference
    nll = -seq[:3] / keep[:3].sum(-1)
    ref_loss = (-F.logsigmoid(0.3 * (ratio[:3] - ratio[3:])) + sft_weight * nll).mean()
    ref = torch.autograd.grad(ref_loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- preference data

TOKENIZER = Tokenizer.train_bpe(["sort a c b : a b c ok no", "user", "assistant", "system"], vocab_size=280)
RECORDS = [
    {"prompt": f"sort {x}", "chosen": " ".join(sorted(x.split())), "rejected": "no"}
    for x in ("c a b", "b a", "a c", "c b", "b c a", "a b")
]


def write(folder: Path, records: list, name: str = "pairs.jsonl") -> Path:
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_three_layouts_give_the_same_pairs_with_only_the_answer_trained(tmp_path):
    user, good, bad = {"role": "user", "content": "sort c a b"}, "a b c", "no"
    layouts = [
        {"system": "be brief", "prompt": "sort c a b", "chosen": good, "rejected": bad},
        {"system": "be brief", "prompt": [user], "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]},
        {"system": "be brief", "chosen": [user, {"role": "assistant", "content": good}],
         "rejected": [user, {"role": "assistant", "content": bad}]},
    ]  # fmt: skip
    chat = ChatML(TOKENIZER)
    pairs, report = load_pairs(write(tmp_path, layouts), chat, 64)
    assert report.examples == 3 and pairs[0] == pairs[1] == pairs[2]
    conversation = [{"role": "system", "content": "be brief"}, user, {"role": "assistant", "content": good}]
    assert pairs[0].chosen == chat.render(conversation)  # SFT's rendering: the answer and <|im_end|> trained
    trained = [t for t in pairs[0].chosen.labels if t != IGNORE_INDEX]
    assert trained == TOKENIZER.encode(good) + [chat.end_id]
    n = pairs[0].chosen.labels.index(trained[0]) + 1  # tokens before the answer
    assert pairs[0].chosen.input_ids[:n] == pairs[0].rejected.input_ids[:n]  # the same prompt
    assert pairs[0].chosen.input_ids[n] != pairs[0].rejected.input_ids[n]


def test_a_multi_turn_prompt_trains_only_the_final_answer(tmp_path):
    turns = [
        {"role": "user", "content": "sort b a"},
        {"role": "assistant", "content": "a b"},
        {"role": "user", "content": "sort c b"},
    ]
    record = {
        "chosen": [*turns, {"role": "assistant", "content": "b c"}],
        "rejected": [*turns, {"role": "assistant", "content": "no"}],
    }
    (pair,), _ = load_pairs(write(tmp_path, [record]), ChatML(TOKENIZER), 64)
    assert [t for t in pair.chosen.labels if t != IGNORE_INDEX] == TOKENIZER.encode("b c") + [ChatML(TOKENIZER).end_id]


USER = {"role": "user", "content": "x"}
BAD = [
    ({"prompt": "sort a b", "chosen": "a b"}, "rejected: missing"),
    ({"prompt": "sort a b", "chosen": "a b", "rejected": "a b"}, "chosen: the same as rejected"),
    ({"prompt": "sort a b", "chosen": "  ", "rejected": "no"}, "chosen: empty answer"),
    ({"prompt": "sort a b", "chosen": "a b", "rejected": 3}, "rejected: expected a string"),
    ({"chosen": "a b", "rejected": "no"}, "prompt: missing"),
    ({"prompt": [USER], "chosen": [{"role": "wizard", "content": "a"}], "rejected": "no"}, r"chosen\[0\]: expected"),
    ({"chosen": [USER, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
     "chosen: shares no prompt"),
    ({"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}, USER], "rejected": "no"},
     "chosen: expected one assistant answer after the prompt, got 2 turns"),
    ("{not json", "invalid JSON"),
]  # fmt: skip


@pytest.mark.parametrize("record, message", BAD)
def test_bad_records_name_file_line_and_field(tmp_path, record, message):
    path = write(tmp_path, [RECORDS[0], record])
    with pytest.raises(DataError, match=f"^{path}:2: {message}"):
        load_pairs(path, ChatML(TOKENIZER), 64)


def test_bad_records_are_counted_with_on_error_skip(tmp_path):
    path = write(tmp_path, [RECORDS[0], *[r for r, _ in BAD], RECORDS[1]])
    pairs, report = load_pairs(path, ChatML(TOKENIZER), 64, on_error="skip")
    assert len(pairs) == 2 and report.read.num_skipped == len(BAD)
    assert report.read.skipped["chosen == rejected"] == 1 and report.read.skipped["missing field"] == 2


def test_a_prompt_rendered_differently_per_answer_is_refused(tmp_path):
    class Moody(ChatML):  # a template whose system block depends on the answer's length
        def begin(self, messages):
            return ["long"] if len(messages[-1]["content"]) > 3 else []

    with pytest.raises(DataError, match=r":1: prompt: renders differently before chosen and before rejected"):
        load_pairs(
            write(tmp_path, [{"prompt": "sort c a b", "chosen": "a b c", "rejected": "no"}]), Moody(TOKENIZER), 64
        )


def test_too_long_pairs_are_dropped_or_truncated_before_masking_and_counted(tmp_path):
    chat = ChatML(TOKENIZER)
    long_prompt = {"prompt": "sort " + "a b c " * 30, "chosen": "a b c", "rejected": "no"}
    long_answer = {"prompt": "sort c a", "chosen": "a c " * 40, "rejected": "no"}
    path = write(tmp_path, [RECORDS[0], long_prompt, long_answer])
    pairs, report = load_pairs(path, chat, 40, too_long="drop")
    assert len(pairs) == 1 and report.dropped_too_long == 2
    pairs, report = load_pairs(path, chat, 40, too_long="truncate")
    # the long prompt leaves no answer: left out; the long answer is cut, rejected kept whole
    assert len(pairs) == 2 and report.answer_cut_off == 1 and report.truncated == 1
    assert len(pairs[1].chosen.input_ids) == 40 and pairs[1].chosen.num_trained_tokens > 0


# ---------------------------------------------------------------- the command


def dpo_files(folder: Path, extra: str = "") -> Path:
    write(folder, RECORDS * 4, "train.jsonl")
    write(folder, RECORDS, "eval.jsonl")
    TOKENIZER.save(folder / "tok")
    (folder / "text.txt").write_text("sort a c b : a b c\n")
    config = folder / "run.toml"
    config.write_text(
        f'out_dir = "{folder / "run"}"\n'
        f'[data]\ntrain_file = "{folder / "train.jsonl"}"\neval_file = "{folder / "eval.jsonl"}"\n'
        f'tokenizer = "{folder / "tok"}"\ncache_dir = ""\nplain_text_eval = "{folder / "text.txt"}"\n'
        "[model]\nvocab_size = 300\ndim = 32\nn_layers = 1\nffn_dim = 64\n"
        "[train]\nsteps = 4\nbatch_size = 4\neval_every = 2\nlog_every = 1\nsave_every = 2\nlr = 1e-2\n"
        "warmup_steps = 1\n" + extra
    )
    return config


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_command_logs_rewards_stores_the_reference_and_resumes(tmp_path, capsys):
    config = dpo_files(tmp_path, "[dpo]\nbeta = 0.5\n")
    assert main(["dpo", "--config", str(config)]) == 0
    run_dir = tmp_path / "run"
    steps = [r for r in metrics(run_dir) if "train_loss" in r]
    first = steps[0]
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 1
    assert first["reward_margin"] == 0 and first["reward_accuracy"] == 0
    assert first["logp_chosen"] < 0 and first["logp_rejected"] < 0
    evals = [r for r in metrics(run_dir) if "eval_loss/heldout" in r]
    assert {"reward_accuracy/heldout", "reward_margin/heldout", "eval_loss/plain_text"} <= set(evals[-1])
    assert steps[-1]["reward_accuracy"] > 0.5 and evals[-1]["reward_accuracy/heldout"] > 0.5  # it learns
    stored = json.loads((run_dir / "reference_logps.json").read_text())
    assert len(stored["train"]["logps"]) == 24 and len(stored["heldout"]["logps"]) == 6
    assert 'objective = "dpo"' in (run_dir / "config.toml").read_text()
    straight = metrics(run_dir)

    # a crash after step 2's checkpoint: resume redoes steps 3-4 with the stored reference, the same numbers
    (run_dir / "checkpoints" / "step_4").rename(run_dir / "checkpoints" / "step_4.tmp")
    assert main(["dpo", "--resume", str(run_dir)]) == 0
    clockless = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rs]  # noqa: E731
    assert clockless(metrics(run_dir)) == clockless(straight)
    changed = [{**RECORDS[0], "rejected": "no no"}, *RECORDS[1:]]
    write(tmp_path, changed, "eval.jsonl")  # other held-out pairs than the stored log-probs were taken on
    assert main(["dpo", "--resume", str(run_dir)]) == 2
    assert "its heldout pairs are not the data's now" in capsys.readouterr().err
    (run_dir / "reference_logps.json").write_text('{"train": {"pairs"')  # cut short, or a hand edit gone wrong
    assert main(["dpo", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "reference_logps.json: not readable JSON" in err and "Traceback" not in err
    (run_dir / "reference_logps.json").unlink()
    assert main(["dpo", "--resume", str(run_dir)]) == 2
    assert "reference_logps.json is missing" in capsys.readouterr().err


def test_dpo_command_takes_sft_weight_from_the_config(tmp_path):
    """[dpo] sft_weight reaches the loss: step 1 (policy = reference, all 24 pairs in the batch) is
    log 2 + α · the mean over pairs of −log π_ref(chosen) / its tokens, from the stored reference."""
    config = dpo_files(tmp_path, "[dpo]\nbeta = 0.5\nsft_weight = 0.7\n")
    assert main(["dpo", "--config", str(config), "--train.batch_size", "24", "--train.steps", "1"]) == 0
    run_dir = tmp_path / "run"
    ref_chosen = [c for c, _ in json.loads((run_dir / "reference_logps.json").read_text())["train"]["logps"]]
    pairs, _ = load_pairs(tmp_path / "train.jsonl", ChatML(TOKENIZER), 64)
    nll = [-c / p.chosen.num_trained_tokens for c, p in zip(ref_chosen, pairs, strict=True)]
    first = next(r for r in metrics(run_dir) if "train_loss" in r)
    assert first["train_loss"] == pytest.approx(math.log(2) + 0.7 * sum(nll) / len(nll), rel=1e-5)


def test_dpo_command_bad_data_is_one_line_and_exit_2(tmp_path, capsys):
    config = dpo_files(tmp_path)
    write(tmp_path, [RECORDS[0], {"prompt": "x", "chosen": "a"}], "train.jsonl")
    assert main(["dpo", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"error: {tmp_path / 'train.jsonl'}:2: rejected: missing (a preference record needs chosen and rejected)"
    )
    assert (
        main(
            [
                "dpo",
                "--config",
                str(config),
                "--data.on_error",
                "skip",
                "--train.steps",
                "1",
                "--out_dir",
                str(tmp_path / "r2"),
            ]
        )
        == 0
    )
    assert "1 bad records skipped (1 missing field)" in capsys.readouterr().out


# ---------------------------------------------------------------- data parallel

DPO_ONE = TrainConfig(steps=3, batch_size=2, grad_accum=4, lr=1e-2, warmup_steps=1, log_every=1, save_every=0)


def dpo_run(run_dir: str, cfg: TrainConfig):
    from minisft.train import train_loop

    pairs, _ = load_pairs(
        write(Path(run_dir).parent, RECORDS * 3, Path(run_dir).name + ".jsonl"), ChatML(TOKENIZER), 64
    )
    model = tiny_model(vocab_size=300, seed=4)
    pairs = reference_log_probs(model, pairs, 0, 8, "fp32")
    train_loop(model, pairs, {}, cfg, 0, run_dir, "dpo", objective=DPOObjective(DPOConfig(beta=0.5)))
    return model


def dpo_rank_main(rank: int, world: int, store: str, run_dir: str, weights: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = dpo_run(run_dir, replace(DPO_ONE, grad_accum=2))
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~15 s: two processes start torch
def test_dpo_on_two_ranks_equals_one_process_with_accumulation(tmp_path):
    """DDP: 2 ranks × 2 micro-batches of pairs train the weights of 1 process accumulating 4; the pair
    count that normalises the loss is summed over ranks."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    weights = tmp_path / "ddp.safetensors"
    mp.spawn(dpo_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path / "ddp"), str(weights)), nprocs=2, join=True)
    single = dpo_run(str(tmp_path / "single"), DPO_ONE)
    ddp = load_file(str(weights))
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp[name], value, atol=1e-6, rtol=0, msg=name)
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "single")
    assert [r["step"] for r in a] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6)
        assert x["reward_margin"] == pytest.approx(y["reward_margin"], abs=1e-6)
