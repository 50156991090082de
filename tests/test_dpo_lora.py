"""DPO with LoRA through the command line, on a tiny Llama: `dpo --init BASE --lora.r R` (fresh
adapters: the reference is the base, adapters disabled) and `dpo --init BASE --adapter SFT` (the
reference is the SFT adapter as loaded). The stored reference log-probs are checked against
transformers (and PEFT) computing them on their own; the loss falls, only the adapters train, the
checkpoints hold the adapters alone, and a resumed run ends bitwise where the straight one did."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_hf import hf_logits
from test_lora_cli import base, peft_adapter  # noqa: F401 - base is a fixture

from minisft.__main__ import main
from minisft.chat import ChatML
from minisft.labels import IGNORE_INDEX
from minisft.preference import load_pairs
from minisft.tokenizer import Tokenizer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

LETTERS = "a b c d".split()


@pytest.fixture(scope="module")
def pairs_file(base) -> Path:  # noqa: F811
    """Prompt `sort x y z`; chosen the letters sorted, rejected them sorted backwards."""
    gen = torch.Generator().manual_seed(3)
    lines = []
    for _ in range(16):
        words = [LETTERS[int(i)] for i in torch.randint(0, len(LETTERS), (3,), generator=gen)]
        chosen, rejected = " ".join(sorted(words)), " ".join(sorted(words, reverse=True))
        if chosen == rejected:
            rejected = "hello world"
        record = {"prompt": [{"role": "user", "content": "sort " + " ".join(words)}], "chosen": chosen}
        lines.append(json.dumps(record | {"rejected": rejected}))
    path = base.parent / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def dpo_args(init: Path, pairs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "dpo", "--init", str(init), "--data.train_file", str(pairs), "--out_dir", str(out), "--steps", "6",
        "--batch_size", "4", "--lr", "5e-2", "--warmup_steps", "1", "--log_every", "1", "--save_every", "3",
        "--eval_every", "0", "--dpo.beta", "0.5", "--train.precision", "fp32", *extra,  # fp32 on a GPU too
    ]  # fmt: skip


def hf_answer_log_probs(model, pairs_file: Path, tokenizer: Tokenizer) -> list[list[float]]:
    """[log π(chosen|x), log π(rejected|x)] of each pair from transformers' logits, summed over the
    answer tokens the chat renderer marks (the independent reference of the stored log-probs)."""
    pairs, _ = load_pairs(pairs_file, ChatML(tokenizer), 64)

    def logp(example) -> float:
        ids = torch.tensor([example.input_ids])
        labels = torch.tensor(example.labels)
        logprobs = hf_logits(model.eval(), ids)[0].log_softmax(-1)
        trained = labels != IGNORE_INDEX
        return float(logprobs[trained].gather(1, labels[trained, None]).sum())

    return [[logp(p.chosen), logp(p.rejected)] for p in pairs]


def train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]


def test_dpo_with_fresh_adapters_takes_the_base_as_reference_and_trains_only_them(base, pairs_file, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert main(dpo_args(base, pairs_file, out, "--lora.r", "4", "--lora.alpha", "8")) == 0

    # the reference is the base model (B = 0: adapters as good as disabled), as transformers computes it
    stored = json.loads((out / "reference_logps.json").read_text())["train"]["logps"]
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base)
    expected = hf_answer_log_probs(hf_base, pairs_file, Tokenizer.from_file(base))
    torch.testing.assert_close(torch.tensor(stored), torch.tensor(expected), atol=1e-4, rtol=1e-5)

    steps = train_records(out)
    assert steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 1
    assert steps[-1]["train_loss"] < 0.5 * steps[0]["train_loss"] and steps[-1]["reward_accuracy"] > 0.5

    # the checkpoints hold the adapters alone, and AdamW's moments of them alone
    final = out / "checkpoints" / "final"
    assert not (final / "model.safetensors").exists()
    adapters = load_file(final / "adapter_model.safetensors")
    assert len(adapters) == 2 * 7 * 2 and all("lora_" in name for name in adapters)  # A, B; 7 targets; 2 layers
    optimizer = load_file(out / "checkpoints" / "step_6" / "optimizer.safetensors")
    assert {k.split(".")[1] for k in optimizer} == {str(i) for i in range(len(adapters))}
    assert all(t.abs().max() > 0 for name, t in adapters.items() if "lora_B" in name)  # B left zero: it trained

    # killed after step 3's checkpoint: --resume reads the stored reference and ends bitwise the same
    shutil.rmtree(final)
    (out / "checkpoints" / "step_6").rename(out / "checkpoints" / "step_6.tmp")
    assert main(["dpo", "--resume", str(out)]) == 0
    for name, tensor in load_file(final / "adapter_model.safetensors").items():
        assert torch.equal(tensor, adapters[name]), name
    assert [r["train_loss"] for r in train_records(out)] == [r["train_loss"] for r in steps]


def test_dpo_from_an_sft_adapter_takes_the_adapter_as_loaded_as_reference(base, pairs_file, tmp_path):  # noqa: F811
    sft = peft_adapter(base, tmp_path / "sft_adapter")  # B random: the adapters change the model
    out = tmp_path / "run"
    assert main(dpo_args(base, pairs_file, out, "--adapter", str(sft))) == 0

    stored = torch.tensor(json.loads((out / "reference_logps.json").read_text())["train"]["logps"])
    tokenizer = Tokenizer.from_file(base)
    with_adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), sft)
    torch.testing.assert_close(stored, torch.tensor(hf_answer_log_probs(with_adapter, pairs_file, tokenizer)))
    base_only = hf_answer_log_probs(transformers.AutoModelForCausalLM.from_pretrained(base), pairs_file, tokenizer)
    assert (stored - torch.tensor(base_only)).abs().max() > 1e-2  # not the base's: the adapters count

    steps = train_records(out)
    assert steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    final = load_file(out / "checkpoints" / "final" / "adapter_model.safetensors")
    start = load_file(sft / "adapter_model.safetensors")
    assert set(final) == set(start) and any(not torch.equal(final[k], start[k]) for k in start)  # from the SFT's on
