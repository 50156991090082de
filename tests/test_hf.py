"""Hugging Face load and export against transformers itself, the real Qwen3 tokenizer, the errors,
and the command line: fine-tune from an exported folder, chat with the demo model.

transformers is a test-only reference: every model here is built in the test from a tiny config
with random weights (nothing is downloaded), saved with `save_pretrained`, and compared with
minisft's reading of the same folder.
"""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from minisft.generate import generate
from minisft.hf import CheckpointError, export_hf, load_hf
from minisft.model import Backends
from minisft.tokenizer import Tokenizer

from helpers import interpreter_only, sharpen_

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}
# name -> (architecture, config overrides): GQA, MQA, tied embeddings, q/k/v biases, rope scaling,
# q/k norms, a head width other than hidden_size / heads (32 / 4 = 8 here).
VARIANTS = {
    "llama": ("llama", {}),
    "llama-mqa-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-rope-llama3": (
        "llama",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "llama-rope-linear": ("llama", dict(rope_theta=100.0, rope_scaling=dict(rope_type="linear", factor=4.0))),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama-head-dim": ("llama", dict(head_dim=16)),
    "qwen3": ("qwen3", dict(head_dim=16)),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True, num_key_value_heads=1, head_dim=8)),
}
EXPORTED_AS = {"llama": "LlamaForCausalLM", "mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CHAT = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hello"}]


def hf_model(architecture: str, **overrides):
    """A tiny transformers model with weights of scale 1/sqrt(fan_in), RMSNorm gains != 1 and
    non-zero biases: logits of order 1 and sharp attention, so any mismatch shows."""
    config_class, model_class = ARCHITECTURES[architecture]
    sizes = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return sharpen_(model_class(config_class(**{**sizes, **overrides})), seed=11)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(["hello world, the user and the assistant"] * 4, vocab_size=300)


def save_hf(model, tokenizer: Tokenizer, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    tokenizer.save(folder)
    return folder


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def our_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(ids))


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_save_then_our_load_gives_the_same_logits(variant, tokenizer, tmp_path):
    architecture, overrides = VARIANTS[variant]
    reference = hf_model(architecture, **overrides)
    ours, tok, chat_format = load_hf(save_hf(reference, tokenizer, tmp_path))
    assert ours.config.attention_bias == (architecture == "qwen2")
    assert ours.config.qk_norm == (architecture == "qwen3")
    assert ours.config.head_dim == overrides.get("head_dim", 32 // 4)
    assert ours.config.tie_embeddings == reference.config.tie_word_embeddings
    assert (chat_format, tok.vocab_size) == (None, tokenizer.vocab_size)  # a base model: no chat template
    ids = torch.randint(0, 320, (2, 40))  # 40 > original_max_position_embeddings: rope scaling matters
    expected = hf_logits(reference, ids)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(our_logits(ours, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_then_transformers_load_gives_the_same_logits(variant, tokenizer, tmp_path):
    architecture, overrides = VARIANTS[variant]
    ours, tok, _ = load_hf(save_hf(hf_model(architecture, **overrides), tokenizer, tmp_path / "in"))
    export_hf(tmp_path / "out", ours, tok, "chatml")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    # Mistral without a sliding window is Llama; Qwen2 is Llama with q/k/v biases, Qwen3 with q/k norms.
    assert type(loaded).__name__ == EXPORTED_AS.get(architecture, "Qwen3ForCausalLM")
    ids = torch.randint(0, 320, (2, 40))
    torch.testing.assert_close(hf_logits(loaded, ids), our_logits(ours, ids), atol=1e-5, rtol=1e-5)
    # ...and back: our reading of our export is the model we exported.
    again, _, chat_format = load_hf(tmp_path / "out")
    assert again.config == ours.config and chat_format == "chatml"
    torch.testing.assert_close(our_logits(again, ids), our_logits(ours, ids), atol=0, rtol=0)


def test_export_writes_the_chat_formats_stop_token_and_template(tokenizer, tmp_path):
    """Pitfall 1: the exported generation config stops on <|im_end|>, not only on the base eos;
    pitfall 7: the chat template that travels with the model renders what minisft trained on."""
    ours, tok, _ = load_hf(save_hf(hf_model("llama"), tokenizer, tmp_path / "in"))
    export_hf(tmp_path / "out", ours, tok, "chatml")
    end_of_turn = tok.token_id("<|im_end|>")
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [end_of_turn, tok.eos_id]
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [end_of_turn, tok.eos_id]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = hf_tok.apply_chat_template(CHAT, tokenize=False)
    assert text == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    for sample in ("hello world", "the user and the assistant, hello"):
        assert hf_tok.encode(sample, add_special_tokens=False) == tok.encode(sample)


@pytest.mark.parametrize("chat_format", ["chatml", "llama3", "instruction"])
def test_exported_chat_template_writes_what_the_chat_format_renders(chat_format, tmp_path):
    from minisft.chat import make_chat_format

    specials = ("<|pad|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>")
    tok = Tokenizer.train_bpe(
        ["hello world"], 280, (*specials, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    )
    ours, _, _ = load_hf(save_hf(hf_model("llama"), tok, tmp_path / "in"))
    export_hf(tmp_path / "out", ours, tok, chat_format)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    chat = make_chat_format(chat_format, tok)
    messages = [{"role": "system", "content": "be brief"}, *CHAT, {"role": "user", "content": "again"}]

    def text(pieces) -> str:
        return "".join(p if isinstance(p, str) else tok.backend.id_to_token(p) for p in pieces)

    assert hf_tok.apply_chat_template(messages[:-1], tokenize=False) == text(p for p, _ in chat.plan(messages[:-1]))
    prompt = [p for p, _ in chat.plan(messages)] + chat.generation_header()
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text(prompt)


def test_sharded_checkpoint_is_read_through_its_index(tokenizer, tmp_path):
    reference = hf_model("qwen2")
    save_hf(reference, tokenizer, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    ours, _, _ = load_hf(tmp_path)
    ids = torch.randint(0, 320, (1, 20))
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(reference, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "llama-rope-llama3"])
def test_cached_generation_equals_transformers_greedy_generate(variant, tokenizer, tmp_path):
    architecture, overrides = VARIANTS[variant]
    reference = hf_model(architecture, **overrides)
    ours, _, _ = load_hf(save_hf(reference, tokenizer, tmp_path))
    prompts = [[5, 17, 230, 99, 4, 61, 8], [250], [33, 12, 7]]
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        expected.append(out[0, len(prompt) :].tolist())
    assert all(len(e) == 24 for e in expected)
    assert generate(ours, prompts, 24, set()) == expected  # batched, left-padded, cached


@interpreter_only
def test_qwen3_on_the_triton_kernels_equals_transformers_and_the_torch_path(tokenizer, tmp_path):
    """Backends("triton", "triton") (run by the interpreter here): q/k norms and head_dim 16 != 32 / 4 go through
    the flash-attention and fused linear + cross-entropy kernels; logits equal transformers', and the
    loss and every gradient equal the PyTorch path's, packed documents included."""
    reference = hf_model("qwen3", head_dim=16)
    folder = save_hf(reference, tokenizer, tmp_path)
    triton, _, _ = load_hf(folder, Backends("triton", "triton"))
    torch_path, _, _ = load_hf(folder)
    ids = torch.randint(0, 320, (2, 24))
    torch.testing.assert_close(our_logits(triton, ids), hf_logits(reference, ids), atol=1e-5, rtol=1e-5)
    labels = torch.where(torch.rand(2, 24) < 0.5, torch.randint(0, 320, (2, 24)), -100)
    documents = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1)
    n = int((labels != -100).sum())
    losses = []
    for model in (triton, torch_path):
        loss = model.loss(ids, labels, n, positions, documents)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    grads = dict(torch_path.named_parameters())
    for name, p in triton.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    assert triton.layers[0].self_attn.q_norm.weight.grad.abs().max() > 0


# ---------------------------------------------------------------- the real Qwen3 tokenizer


def test_qwen3_tokenizer_matches_transformers(shared_data):
    folder = shared_data / "tokenizers" / "qwen3"
    ours = Tokenizer.from_file(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert (ours.eos_id, ours.pad_id, ours.bos_id) == (theirs.eos_token_id, theirs.pad_token_id, None)
    assert (ours.eos_token, ours.pad_token) == ("<|im_end|>", "<|endoftext|>")  # from tokenizer_config.json
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>"):
        assert ours.token_id(token) == theirs.convert_tokens_to_ids(token)
    texts = ["Hello world", " Hello  world 12345 é中文🙂\n", "def f(x):\n    return x ** 2\n", "a\n\n\nb  \t c"]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text, add_special_tokens=False))
    # One deliberate difference: a literal "<|im_end|>" in text stays text for minisft (data cannot
    # fake a turn boundary), where transformers turns it into the special token.
    assert theirs.encode("<|im_end|>", add_special_tokens=False) == [ours.eos_id]
    assert ours.encode("<|im_end|>") != [ours.eos_id]
    assert ours.chat_template == theirs.chat_template


def test_qwen3_folder_loads_with_its_chat_format_and_exports_its_template(shared_data, tmp_path):
    """A Qwen2-architecture model with the real Qwen3 tokenizer (151669 tokens): the chat format
    comes from the tokenizer's own template, and export keeps that template."""
    folder = tmp_path / "in"
    model = hf_model("qwen2", vocab_size=151680, hidden_size=8, intermediate_size=8, num_attention_heads=2)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((shared_data / "tokenizers" / "qwen3" / name).read_bytes())
    ours, tok, chat_format = load_hf(folder)
    assert chat_format == "qwen3" and tok.vocab_size == 151669 and ours.config.vocab_size == 151680
    export_hf(tmp_path / "out", ours, tok, chat_format)
    exported = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert exported["chat_template"] == tok.chat_template and exported["minisft_chat_format"] == "qwen3"
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.token_id("<|im_end|>")]  # Qwen3's eos is its end of turn


# ---------------------------------------------------------------- errors


def edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.fixture
def llama_folder(tokenizer, tmp_path):
    return save_hf(hf_model("llama"), tokenizer, tmp_path / "llama")


def test_unsupported_architecture_is_named(llama_folder):
    edit_json(llama_folder / "config.json", architectures=["GemmaForCausalLM"], model_type="gemma")
    with pytest.raises(CheckpointError, match="unsupported architecture GemmaForCausalLM; minisft loads LlamaFor"):
        load_hf(llama_folder)


def test_missing_tensor_is_named(llama_folder):
    weights = load_file(llama_folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, llama_folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        load_hf(llama_folder)


def test_shape_mismatch_is_named(llama_folder):
    edit_json(llama_folder / "config.json", intermediate_size=64)
    with pytest.raises(
        CheckpointError, match=r"mlp\.gate_proj\.weight has shape \[48, 32\], config.json implies \[64, 32\]"
    ):
        load_hf(llama_folder)


def test_tokenizer_larger_than_the_embedding_is_refused(llama_folder):
    edit_json(llama_folder / "config.json", vocab_size=200)
    with pytest.raises(CheckpointError, match="tokenizer has 2[0-9]{2} tokens but the embedding only 200 rows"):
        load_hf(llama_folder)


def test_unexpected_tensor_is_named(llama_folder):
    weights = load_file(llama_folder / "model.safetensors")
    save_file(weights | {"model.layers.0.self_attn.q_norm.weight": torch.ones(8)}, llama_folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_norm\.weight"):
        load_hf(llama_folder)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE scaling 'yarn' is not supported"),
        (dict(hidden_act="gelu"), "activation 'gelu'"),
        (dict(attention_bias=True), "a bias on o_proj"),
        (dict(num_hidden_layers=None), "missing key 'num_hidden_layers'"),
    ],
)
def test_unsupported_config_is_refused(llama_folder, changes, message):
    config = json.loads((llama_folder / "config.json").read_text())
    config = {key: value for key, value in config.items() if key != "rope_parameters"} | changes  # the pre-5.0 layout
    (llama_folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(CheckpointError, match=message):
        load_hf(llama_folder)


def test_pickle_weights_are_never_read(llama_folder):
    (llama_folder / "model.safetensors").rename(llama_folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf(llama_folder)


def test_a_sliding_window_caps_the_sequence_length(tokenizer, tmp_path, capsys):
    reference = hf_model("mistral", sliding_window=16)
    ours, _, _ = load_hf(save_hf(reference, tokenizer, tmp_path))
    assert ours.config.max_seq_len == 16
    assert "sliding window of 16 tokens" in capsys.readouterr().err
    ids = torch.randint(0, 320, (1, 16))  # up to the window, full attention is the same thing
    torch.testing.assert_close(our_logits(ours, ids), hf_logits(reference, ids), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The built-in demo at the reduced size of test_demo.py, plus its SFT data as JSONL."""
    from test_demo import small_demo

    from minisft.demo import run_demo

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo")
    run_demo(small_demo(out))
    return out


def train_args(data, out, *extra):
    return [
        "train",
        "--data.train_file",
        str(data / "sft_train.jsonl"),
        "--data.eval_file",
        str(data / "sft_heldout.jsonl"),
        "--out_dir",
        str(out),
        "--steps",
        "4",
        "--batch_size",
        "8",
        "--eval_every",
        "2",
        "--log_every",
        "2",
        *extra,
    ]


def eval_losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss/heldout"] for r in records if "eval_loss/heldout" in r]


def test_demo_model_exports_chats_and_resumes_sft_from_the_export(demo_run, tmp_path, capsys):
    from minisft.__main__ import main
    from minisft.checkpoint import load_model
    from minisft.dataset import load_examples
    from minisft.train import evaluate

    assert main(["export", str(demo_run / "sft"), str(tmp_path / "hf")]) == 0
    demo, tok, _ = load_model(demo_run / "sft" / "model")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, tok.vocab_size, (2, 30))
    torch.testing.assert_close(hf_logits(exported, ids), our_logits(demo, ids), atol=1e-5, rtol=1e-5)

    # chat: the checkpoint, the run folder around it and the export all give the greedy answer
    from minisft.chat import ChatML

    chat = ChatML(tok)
    prompt = chat.render_prompt([{"role": "user", "content": "sort d a c"}])
    expected = tok.decode(generate(demo, [prompt], 40, {chat.end_id, tok.eos_id})[0]).strip()
    capsys.readouterr()
    for target in (demo_run / "sft" / "model", demo_run / "sft", tmp_path / "hf"):
        assert main(["chat", str(target), "--prompt", "sort d a c", "--max-new-tokens", "40"]) == 0
        assert capsys.readouterr().out == expected + "\n"

    # SFT resumed from the export: at a tiny learning rate its first held-out loss is the demo model's
    data = demo_run / "data"
    examples, _ = load_examples(data / "sft_heldout.jsonl", chat, 64)
    before = evaluate(demo, examples, tok.pad_id, 64)
    assert main(train_args(data, tmp_path / "run", "--init", str(tmp_path / "hf"), "--lr", "1e-6")) == 0
    losses = eval_losses(tmp_path / "run")
    assert len(losses) == 2 and losses[0] == pytest.approx(before, rel=1e-3)
    assert before < math.log(tok.vocab_size) - 1  # well below a random model's loss: the weights came along
    resumed, _, chat_format = load_model(tmp_path / "run" / "checkpoints" / "final")
    assert resumed.config == demo.config and chat_format == "chatml"


def test_interactive_chat_keeps_the_conversation(demo_run, monkeypatch, capsys):
    from minisft.__main__ import main

    lines = iter(["sort d a c", "count a b", "/reset", "sort b a", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(demo_run / "sft"), "--max-new-tokens", "8", "--temperature", "0.7", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("chatting with") and "chat format chatml" in out and out.count("model> ") == 3


def test_train_init_adds_missing_chat_tokens_and_freezes_layers(demo_run, tmp_path, capsys):
    """Pitfall 14: a base model whose tokenizer lacks <|im_start|>/<|im_end|> gets them, the
    embedding grows, their rows train, and the export carries them; frozen layers stay put."""
    from minisft.__main__ import main
    from minisft.checkpoint import load_model

    corpus = ["sort d a c : a c d", "count a b : 2", "user assistant"]
    base_tok = Tokenizer.train_bpe(corpus, 280, special_tokens=("<|pad|>", "<|eos|>"))
    with pytest.raises(KeyError):
        base_tok.token_id("<|im_start|>")
    folder = save_hf(hf_model("llama", vocab_size=base_tok.vocab_size), base_tok, tmp_path / "base")
    base, _, _ = load_hf(folder)

    assert main(train_args(demo_run / "data", tmp_path / "run", "--init", str(folder), "--freeze_layers", "1")) == 0
    assert "added <|im_end|>, <|im_start|> to the tokenizer; embedding now 320 rows" in capsys.readouterr().out
    tuned, tok, _ = load_model(tmp_path / "run" / "checkpoints" / "final")
    assert tuned.config.vocab_size == 320 and tok.token_id("<|im_start|>") == base_tok.vocab_size + 1
    new_rows = tuned.embed_tokens.weight[base_tok.vocab_size : base_tok.vocab_size + 2]
    mean_row = base.embed_tokens.weight.mean(0)
    assert (new_rows - mean_row).abs().max() > 1e-4  # started at the mean, then trained
    for name, p in base.layers[0].state_dict().items():
        torch.testing.assert_close(tuned.layers[0].state_dict()[name], p, atol=0, rtol=0, msg=name)
    assert not torch.equal(tuned.layers[1].mlp.up_proj.weight, base.layers[1].mlp.up_proj.weight)

    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[tok.token_id("<|im_start|>"), 5, 6, tok.token_id("<|im_end|>")]])
    torch.testing.assert_close(hf_logits(exported, ids), our_logits(tuned, ids), atol=1e-5, rtol=1e-5)

    # Freezing the embeddings would leave the added tokens untrained: refused, in one line.
    code = main(train_args(demo_run / "data", tmp_path / "r2", "--init", str(folder), "--freeze_embeddings", "true"))
    assert code == 2 and "freeze_embeddings would leave the 2 tokens added" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--freeze_layers", "1"], "freeze_embeddings and freeze_layers need init"),
        (["--init", "INIT", "--data.tokenizer", "x"], "brings its own tokenizer"),
        (["--init", "INIT", "--freeze_layers", "9"], "freeze_layers=9 but the model has 2 layers"),
        (["--init", "INIT", "--model.dim", "64"], "model.dim = 64, but .* has 32"),
        (["--init", "NOWHERE"], "no model in"),
    ],
)
def test_train_init_mistakes_are_one_line_errors(demo_run, tmp_path, capsys, extra, message):
    from minisft.__main__ import main

    paths = {"INIT": str(demo_run / "sft"), "NOWHERE": str(tmp_path / "nowhere")}
    extra = [paths.get(arg, arg) for arg in extra]
    assert main(train_args(demo_run / "data", tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
