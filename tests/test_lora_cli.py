"""LoRA as a user runs it: `train --init BASE --lora.r R`, then PEFT loads the adapters (and minisft
PEFT's), `--resume` continues bitwise, `export --merge` and `chat` give the same model, and every
mistake is one line, exit code 2, with nothing written. PEFT and transformers are test-only references."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_demo_real import tiny_demo
from test_demo_real import tiny_model as demo_model_fixture  # noqa: F401 - a fixture
from test_hf import hf_logits, hf_model, save_hf
from test_resume import Crash, crash_at_step
from tokenizers import pre_tokenizers

from minisft.__main__ import main
from minisft.chat import ChatML
from minisft.generate import generate
from minisft.lora import LoRAConfig, lora_layers
from minisft.peft_format import attach_lora, write_adapter
from minisft.pretrained import SavedModel
from minisft.tokenizer import Tokenizer

from helpers import ON_GPU

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "hello world the user and the assistant sort count a b c d".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama in a Hugging Face folder (tokenizer with ChatML's markers) and chat data beside it."""
    root = tmp_path_factory.mktemp("lora")
    tok = Tokenizer.train_bpe([" ".join(WORDS)] * 4, vocab_size=300)
    tok.backend.pre_tokenizer = pre_tokenizers.Sequence(  # split as SmolLM's: a GGUF export can name it
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    folder = save_hf(hf_model("llama"), tok, root / "base")
    gen = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(24):
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (4,), generator=gen)]
        chat = [{"role": "user", "content": "sort " + " ".join(words)}]
        chat.append({"role": "assistant", "content": " ".join(sorted(words))})
        lines.append(json.dumps({"messages": chat}))
    (root / "train.jsonl").write_text("\n".join(lines[:16]) + "\n")
    (root / "heldout.jsonl").write_text("\n".join(lines[16:]) + "\n")
    return folder


def train_args(base: Path, out: Path, *extra: str) -> list[str]:
    data = base.parent
    return [
        "train", "--init", str(base), "--data.train_file", str(data / "train.jsonl"),
        "--data.eval_file", str(data / "heldout.jsonl"), "--out_dir", str(out), "--steps", "6",
        "--batch_size", "4", "--lr", "2e-2", "--warmup_steps", "1", "--eval_every", "3", "--log_every", "1",
        "--save_every", "3", "--keep_checkpoints", "3", *extra,
    ]  # fmt: skip


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().logits(model(ids))


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    args = train_args(base, out, "--lora.r", "4", "--lora.alpha", "8", "--lora.targets", "q,v,o,down")
    assert main([*args, "--lora.dropout", "0.1"]) == 0
    return out


def test_checkpoints_hold_only_the_adapters_and_peft_loads_them_to_1e_5(base, lora_run):
    final = lora_run / "checkpoints" / "final"
    assert not (final / "model.safetensors").exists()
    weights = load_file(final / "adapter_model.safetensors")
    assert len(weights) == 2 * 4 * 2  # A and B, 4 targets, 2 layers
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in weights
    step = lora_run / "checkpoints" / "step_6"
    optimizer = load_file(step / "optimizer.safetensors")  # AdamW moments of the adapters alone
    assert {k.split(".")[1] for k in optimizer} == {str(i) for i in range(len(weights))}
    recorded = json.loads((final / "minisft_adapter.json").read_text())
    assert recorded["path"] == str(base.resolve()) and len(recorded["sha256"]) == 64

    ours, tok = SavedModel(final).load()
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    base_logits = hf_logits(hf_base, ids)
    theirs = peft.PeftModel.from_pretrained(hf_base, final).eval()
    expected = hf_logits(theirs, ids)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapters learned something
    torch.testing.assert_close(our_logits(ours, ids), expected, atol=1e-5, rtol=1e-5)


def test_a_base_trained_in_bf16_is_loaded_in_bf16_again(base, tmp_path):
    """lora.base_dtype is recorded with the adapters: chat and export hold the base as training did
    (bf16 projections, fp32 adapters) and give its logits bitwise; a folder without the record (PEFT's,
    or an older minisft's) gets fp32."""
    trained, tok = SavedModel(base).load()
    attach_lora(trained, LoRAConfig(r=2, alpha=4, targets="q,v,down", base_dtype="bf16"), base)
    with torch.no_grad():
        for layer in lora_layers(trained).values():
            layer.lora_B.normal_(0, 0.5)  # B = 0 would hide the adapters
    write_adapter(tmp_path, trained)
    ids = torch.randint(0, tok.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    loaded, _ = SavedModel(tmp_path).load()
    assert loaded.lora_config.base_dtype == "bf16"
    q = loaded.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.dtype == torch.float32
    assert torch.equal(our_logits(loaded, ids), our_logits(trained, ids))
    record = tmp_path / "minisft_adapter.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "base_dtype"}))
    older, _ = SavedModel(tmp_path).load()
    assert older.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_resume_continues_a_lora_run_bitwise(base, lora_run, tmp_path, monkeypatch):
    """A LoRA run killed at step 5 (after its step-3 checkpoint) and resumed ends bitwise where the
    uninterrupted one did: adapters, AdamW moments, dropout's RNG and the data position all restored."""
    out = tmp_path / "run"
    args = train_args(base, out, "--lora.r", "4", "--lora.alpha", "8", "--lora.targets", "q,v,o,down")
    with monkeypatch.context() as patch:
        crash_at_step(patch, 5)
        with pytest.raises(Crash):
            main([*args, "--lora.dropout", "0.1"])
    step3 = load_file(out / "checkpoints" / "step_3" / "adapter_model.safetensors")
    for name, tensor in load_file(lora_run / "checkpoints" / "step_3" / "adapter_model.safetensors").items():
        assert torch.equal(step3[name], tensor), name
    assert main(["train", "--resume", str(out)]) == 0
    done = load_file(lora_run / "checkpoints" / "final" / "adapter_model.safetensors")
    resumed = load_file(out / "checkpoints" / "final" / "adapter_model.safetensors")
    for name, tensor in done.items():
        assert torch.equal(resumed[name], tensor), name

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line).get("train_loss") for line in lines]

    assert losses(out) == losses(lora_run)


def peft_adapter(base: Path, folder: Path, **config) -> Path:
    """An adapter made by PEFT itself, B random so it changes the model."""
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base)
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    made = peft.get_peft_model(hf_base, peft.LoraConfig(**(settings | config)))
    made.save_pretrained(folder)
    return folder


def test_adapters_made_by_peft_load_chat_and_train_in_minisft(base, tmp_path, capsys):
    adapter = peft_adapter(base, tmp_path / "peft", use_rslora=True)
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ours, tok = SavedModel(adapter).load()
    ids = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(theirs, ids), atol=1e-5, rtol=1e-5)

    # chat runs base + adapters unmerged and answers as transformers' greedy generate on the PEFT model
    chat = ChatML(tok)
    prompt = chat.render_prompt([{"role": "user", "content": "sort b a"}])
    with torch.no_grad():
        out = theirs.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=[chat.end_id, tok.eos_id]
        )
    new = [t for t in out[0, len(prompt) :].tolist() if t not in (chat.end_id, tok.eos_id)]
    assert generate(ours, [prompt], 8, {chat.end_id, tok.eos_id})[0] == new
    capsys.readouterr()
    assert main(["chat", str(adapter), "--prompt", "sort b a", "--max_new_tokens", "8", "--chat_format", "chatml"]) == 0
    if not ON_GPU:  # on a GPU chat runs in bf16, whose greedy text need not be fp32's
        assert capsys.readouterr().out == tok.decode(new).strip() + "\n"

    # train --init BASE --adapter DIR starts from PEFT's adapters (a tiny lr: they barely move)
    assert main(train_args(base, tmp_path / "run", "--adapter", str(adapter), "--lr", "1e-9", "--steps", "2")) == 0
    trained = load_file(tmp_path / "run" / "checkpoints" / "final" / "adapter_model.safetensors")
    made = load_file(adapter / "adapter_model.safetensors")
    assert set(trained) == set(made)
    for name, tensor in made.items():
        torch.testing.assert_close(trained[name], tensor, atol=1e-6, rtol=0, msg=name)
    config = json.loads((tmp_path / "run" / "checkpoints" / "final" / "adapter_config.json").read_text())
    assert (config["r"], config["use_rslora"]) == (4, True)


def test_export_merge_writes_hf_and_gguf_equal_to_the_unmerged_model(base, lora_run, tmp_path):
    final = lora_run / "checkpoints" / "final"
    ours, tok = SavedModel(final).load()
    assert lora_layers(ours)
    ids = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    expected = our_logits(ours, ids)
    assert main(["export", str(lora_run), str(tmp_path / "hf"), "--merge"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(hf_logits(merged, ids), expected, atol=1e-4, rtol=1e-4)  # W + sBA rounds once
    pytest.importorskip("gguf", reason="GGUF export needs the gguf extra")
    assert main(["export", str(lora_run), str(tmp_path / "m.gguf"), "--merge", "--gguf_type", "bf16"]) == 0
    from_gguf, _ = SavedModel(tmp_path / "m.gguf").load()
    merged_ours, _ = SavedModel(tmp_path / "hf").load()
    for name, tensor in merged_ours.state_dict().items():  # the merged weights, rounded to bf16 (norms kept f32)
        want = tensor.bfloat16().float() if tensor.dim() == 2 else tensor
        torch.testing.assert_close(from_gguf.state_dict()[name], want, atol=0, rtol=0, msg=name)


def test_chat_on_a_lora_run_equals_chat_on_its_merged_export(lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), str(tmp_path / "hf"), "--merge"]) == 0
    answers = []
    for model in (lora_run, tmp_path / "hf"):
        capsys.readouterr()
        assert main(["chat", str(model), "--prompt", "sort d a c", "--max_new_tokens", "8"]) == 0
        answers.append(capsys.readouterr().out)
    if not ON_GPU:  # on a GPU chat runs in bf16: W + s·B·A rounded once (merged) or not (unmerged) may differ
        assert answers[0] == answers[1]


def other_base(base: Path, folder: Path) -> Path:
    """The base's shapes and tokenizer, one weight changed: another base a hash tells apart."""
    weights = load_file(base / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] += 0.01
    folder.mkdir()
    for file in base.iterdir():
        if file.name != "model.safetensors":
            (folder / file.name).write_bytes(file.read_bytes())
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def bad_adapter(tmp_path: Path, base: Path, kind: str) -> Path:
    if kind == "dora":
        return peft_adapter(base, tmp_path / "dora", use_dora=True)
    if kind == "prompt":
        folder = tmp_path / "prompt"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}))
        return folder
    wider = save_hf(hf_model("llama", intermediate_size=64), Tokenizer.from_file(base), tmp_path / "wider")
    return peft_adapter(wider, tmp_path / "wide_adapter")  # down_proj's A is (4, 64); this base needs (4, 48)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora.r", "-1"], "lora.r must be at least 1"),
        (["--lora.r", "0", "--lora.targets", "q"], "lora.r must be at least 1"),
        (["--lora.r", "4", "--lora.targets", "q,qkv"], "'qkv' matches no layer"),
        (["--lora.r", "4", "--train.fsdp", "true"], "train.fsdp with LoRA is not supported"),
        (["--lora.r", "4", "--freeze_layers", "1"], "mean nothing with LoRA"),
        (["--adapter", "DORA"], "use_dora = True is not supported"),
        (["--adapter", "PROMPT"], "peft_type 'PROMPT_TUNING' is not supported"),
        (["--adapter", "WIDE"], r"down_proj.lora_A.weight has shape \[4, 64\], this base needs \[4, 48\]"),
        (["--adapter", "TRAINED", "--init", "OTHER"], "these adapters were trained on .*base .*but the base here is"),
        (["--init", "TRAINED"], "holds LoRA adapters: pass its base as init and the adapters as lora.adapter"),
    ],
)
def test_lora_mistakes_are_one_line_errors_and_write_nothing(base, lora_run, tmp_path, capsys, extra, message):
    paths = {
        "DORA": lambda: bad_adapter(tmp_path, base, "dora"),
        "PROMPT": lambda: bad_adapter(tmp_path, base, "prompt"),
        "WIDE": lambda: bad_adapter(tmp_path, base, "wide"),
        "TRAINED": lambda: lora_run / "checkpoints" / "final",
        "OTHER": lambda: other_base(base, tmp_path / "other"),
    }
    extra = [str(paths[arg]()) if arg in paths else arg for arg in extra]
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(train_args(base, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert not out.exists()


def test_export_refuses_adapters_without_merge_and_merge_without_adapters(base, lora_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(lora_run), str(tmp_path / "a")]) == 2
    assert "holds LoRA adapters: pass --merge" in capsys.readouterr().err
    assert main(["export", str(base), str(tmp_path / "b"), "--merge"]) == 2
    assert "--merge is for a LoRA adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_train_help_lists_the_lora_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("r", "alpha", "dropout", "targets", "rslora", "base_dtype", "adapter"):
        assert f"--lora.{key} " in out, key
    assert "rank-stabilised scale alpha / sqrt(r)" in out


def test_real_demo_with_lora_learns_on_a_tiny_model(demo_model_fixture, tmp_path, capsys):  # noqa: F811
    """`demo --model PATH --lora R` on the demo test's tiny model: adapters alone learn the answers."""
    from minisft.demo_real import run_real_demo

    result = run_real_demo(replace(tiny_demo(demo_model_fixture, tmp_path / "demo"), lora_r=8, lora_lr=1e-2))
    assert "LoRA r=8 on all seven projections, lr 0.01" in capsys.readouterr().out
    epochs = result["epochs"]
    assert epochs[2]["train"] < epochs[0]["train"] - 0.5


def test_demo_lora_without_a_model_is_refused(capsys):
    assert main(["demo", "--lora", "8"]) == 2
    assert "LoRA needs a pretrained model" in capsys.readouterr().err
