"""A Llama-style decoder-only transformer, small enough to read in one sitting.

References: RMSNorm (Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021,
RoFormer), SwiGLU feed-forward (Shazeer 2020), grouped-query attention (Ainslie et al. 2023),
as combined in Llama (Touvron et al. 2023). Parameter names follow the Hugging Face Llama
layout (`layers.0.self_attn.q_proj.weight`, ...) so a pretrained checkpoint maps onto this model
name for name.

Attention and the loss are pluggable, each on its own: `Transformer(config, Backends(attention="torch",
loss="triton"))` — "torch" is PyTorch (SDPA; `F.cross_entropy`), "triton" the kernels in
`triton_kernels/` (see ATTENTION_BACKENDS here and LOSS_BACKENDS in loss.py). Generation passes a `KVCache` instead,
which stores each layer's keys and values so a step runs only the new token. Classes read
bottom-up: norm -> rotary -> attention (and its cache) -> MLP -> block -> model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from minisft.functions import rms_norm, swiglu
from minisft.loss import LOGPROB_BACKENDS, LOSS_BACKENDS, base_kl_sum, masked_lm_loss
from triton_kernels.documents import document_bounds, document_spans

ROPE_SCALINGS = ("", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512  # embedding rows; raised to fit the tokenizer (a multiple of 64) when smaller
    dim: int = 128  # the residual stream's width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads; head dim = dim / n_heads (at most 128 for the Triton kernel)
    n_kv_heads: int = 2  # grouped-query attention: each K/V head serves n_heads // n_kv_heads Q heads
    ffn_dim: int = 384  # hidden width of the SwiGLU MLP
    max_seq_len: int = 256  # the longest sequence the model accepts
    rope_theta: float = 10000.0  # RoPE base: pair i turns by rope_theta^(-2i/head_dim) per position
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    tie_embeddings: bool = True  # lm_head shares the token-embedding matrix
    attention_bias: bool = False  # biases on the q, k and v projections (Qwen2), none on o
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    head_dim: int = 0  # width of one attention head; 0: dim // n_heads (Qwen3 checkpoints often differ)
    # RoPE scaling, as a pretrained checkpoint's config.json names it: "" (none), "linear" (every
    # rotation slowed by rope_factor) or "llama3" (Llama 3.1: only the slow rotations slowed).
    rope_scaling: str = ""
    rope_factor: float = 1.0  # linear and llama3 scaling: how many times slower the scaled rotations turn
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_len / this are slowed fully
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_len / this keep their speed
    rope_original_max_seq_len: int = 8192  # llama3: the context length of pre-training

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("model.rope_theta and model.norm_eps must be positive")
        if self.head_dim < 0:
            raise ValueError(f"model.head_dim must be at least 0 (0: dim // n_heads), got {self.head_dim}")
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise ValueError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)  # frozen: resolved once, here
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"model.rope_scaling: unknown {self.rope_scaling!r}; choose one of {ROPE_SCALINGS}")
        if self.rope_factor <= 0:
            raise ValueError(f"model.rope_factor must be positive, got {self.rope_factor}")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError("model.rope_low_freq_factor must be positive and below model.rope_high_freq_factor")

    def num_params(self) -> int:
        """Parameter count from the config alone (embedding counted once when tied)."""
        d, q, kv = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = d * q * 2 + d * kv * 2  # q, o and k, v projections
        attention += (q + 2 * kv) * self.attention_bias + 2 * self.head_dim * self.qk_norm
        mlp = 3 * d * self.ffn_dim
        per_layer = attention + mlp + 2 * d  # + two RMSNorm gains
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, forward + backward: 6N plus causal attention.

        PaLM (Chowdhery et al. 2022), appendix B: 6N + 12·L·H·Q·T for full attention; a causal
        mask halves the attention term. N excludes the input embedding (a lookup, no matmul)
        but includes the output head, tied or not.
        """
        untied_embedding = 0 if self.tie_embeddings else self.vocab_size * self.dim
        n_matmul = self.num_params() - untied_embedding
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len // 2
        return 6 * n_matmul + attention


def padded_vocab_size(tokens: int) -> int:
    """Rows an embedding needs for `tokens` tokens: rounded up to a multiple of 64, which keeps
    the output-head matmul aligned for the tensor cores."""
    return -(-tokens // 64) * 64


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · g, computed in fp32 (Zhang & Sennrich 2019); under autocast y
    comes out in its dtype, once for every projection that reads it (see functions.py)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rotary_frequencies(config: ModelConfig, device: torch.device | None = None) -> Tensor:
    """(head_dim/2,) angle per position of each rotated pair: pair i turns by theta^(-2i/D).

    That is RoFormer eq. 15, written as Hugging Face computes it (1 / theta^(2i/D)), so the float32
    angles are the very ones a pretrained checkpoint was trained with. Rope scaling stretches a
    model's context by slowing rotations down: "linear" (Chen et al. 2023, position interpolation)
    divides every frequency by the factor; "llama3" (Llama 3.1, Meta's reference code) divides only
    those whose wavelength exceeds original_len / low_freq_factor, keeps those below
    original_len / high_freq_factor and blends the ones between.
    """
    D = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D)
    factor = config.rope_factor
    if config.rope_scaling == "linear":
        return inv_freq / factor
    if config.rope_scaling == "llama3":
        original = config.rope_original_max_seq_len
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        smooth = (original / wavelength - low) / (high - low)  # 0 at original/low, 1 at original/high
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        slowed = torch.where(wavelength > original / low, inv_freq / factor, blended)
        return torch.where(wavelength < original / high, inv_freq, slowed)
    return inv_freq


def rotary_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each (..., T, head_dim), for positions (..., T).

    The halves layout (`rotate_half`) is the one Hugging Face Llama checkpoints are trained with.
    """
    angles = positions.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, H, D) by the angles in cos/sin, (T, D) or (B, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    return (x.float() * cos + rotated_half.float() * sin).to(x.dtype)


# A batch's packed documents as an attention backend reads them (see triton_kernels/documents.py):
# the torch backend's (start, end) spans per row, the Triton kernel's (doc_start, doc_end); None when
# every row is one document.
Documents = list[list[tuple[int, int]]] | tuple[Tensor, Tensor] | None


class Attend(Protocol):
    """Causal attention: q (B, T, H, D), k/v (B, T, Hkv, D), the batch's documents -> (B, T, H, D)."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, documents: Documents) -> Tensor: ...


class AttentionBackend(NamedTuple):
    documents: Callable[[Tensor], Documents]  # document_ids (B, T) -> what `attend` reads; once per forward
    attend: Attend


def attention_torch(q: Tensor, k: Tensor, v: Tensor, spans: list[list[tuple[int, int]]] | None) -> Tensor:
    """Causal attention with PyTorch SDPA. q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D).

    A packed batch brings each row's documents as (start, end) spans (`document_spans`): each document
    is attended on its own, causally, so a token sees only earlier tokens of its own document. One
    SDPA call over the whole row with a (T, T) document mask would compute the same — and every
    masked-out score too: SDPA's CPU kernel skips no block of a mask, so at the demo's ~4 documents a
    512-token row that costs ~2.5× the time of attention's forward and backward (Σ len² of the spans vs T²).
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants (B, H, T, D)
    gqa = k.shape[1] != q.shape[1]
    if spans is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        out = torch.cat([
            torch.cat([
                F.scaled_dot_product_attention(
                    q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e], is_causal=True, enable_gqa=gqa
                )
                for s, e in row
            ], dim=2)
            for b, row in enumerate(spans)
        ])  # fmt: skip
    return out.transpose(1, 2)


def attention_triton(q: Tensor, k: Tensor, v: Tensor, bounds: tuple[Tensor, Tensor] | None) -> Tensor:
    """The same, by the Triton flash-attention kernel: no (T, T) mask or score matrix in memory."""
    from triton_kernels.attention import attention  # imported on use: triton is heavy

    return attention(q, k, v, bounds=bounds)


# Name -> causal attention, and how it wants a packed batch's documents.
ATTENTION_BACKENDS = {
    "torch": AttentionBackend(document_spans, attention_torch),
    "triton": AttentionBackend(document_bounds, attention_triton),
}


@dataclass(frozen=True)
class Backends:
    """Which code computes attention and which the loss, each swapped on its own: names in
    ATTENTION_BACKENDS and LOSS_BACKENDS (loss.py)."""

    attention: str = "torch"
    loss: str = "torch"

    def __post_init__(self) -> None:
        for part, table in (("attention", ATTENTION_BACKENDS), ("loss", LOSS_BACKENDS)):
            name = getattr(self, part)
            if name not in table:
                raise ValueError(f"unknown kernels backend {name!r} for {part}; choose one of {sorted(table)}")

    def __str__(self) -> str:
        return f"attention={self.attention}, loss={self.loss}"


class KVCache:
    """Every layer's keys and values, kept between generation steps so a step runs only new tokens.

    Buffers are (B, max_len, Hkv, D). All rows share one length — generation left-pads its prompts
    (see generate.py) — and `is_token` (B, max_len) is False at padding, which is never attended to.
    `attention(layer)` is an `Attend` for that layer: it appends the new keys and values, then
    attends the new queries over everything cached (generation never packs: documents is None).
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (batch, max_len, config.n_kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.is_token = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # positions filled; the model advances it after each forward

    def attention(self, layer: int) -> Attend:
        def attend(q: Tensor, k: Tensor, v: Tensor, documents: Documents) -> Tensor:
            start, end = self.length, self.length + q.shape[1]
            self.keys[layer][:, start:end], self.values[layer][:, start:end] = k, v
            query_pos = torch.arange(start, end, device=q.device)[:, None]
            key_pos = torch.arange(end, device=q.device)[None]
            # A query sees the real tokens up to itself, and always itself: a padding query that saw
            # nothing would turn to NaN, and 0 · NaN would leak it through the next layer's values.
            mask = (key_pos <= query_pos) & self.is_token[:, None, :end] | (key_pos == query_pos)  # (B, Tq, L)
            keys, values = self.keys[layer][:, :end], self.values[layer][:, :end]
            q, keys, values = (t.transpose(1, 2) for t in (q, keys, values))  # SDPA wants (B, H, T, D)
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask[:, None], enable_gqa=keys.shape[1] != q.shape[1]
            )
            return out.transpose(1, 2)

        return attend


class Attention(nn.Module):
    """Grouped-query attention. With qk_norm (Qwen3), each head's queries and keys are RMS-normed
    over the head dimension before RoPE, which keeps attention logits bounded (Dehghani et al. 2023)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.dim, q_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.dim, kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.dim, kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_dim, config.dim, bias=False)
        # One gain vector of head_dim per norm, shared by the heads.
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend, documents: Documents) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q, k, v, documents)  # (B, T, H, D)
        return self.o_proj(out.reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020, eq. 6); silu is recomputed in the backward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend, documents: Documents) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend, documents)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, backends: Backends | None = None) -> None:
        super().__init__()
        self.config, self.backends = config, backends or Backends()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        # Activation checkpointing (Chen et al. 2016), set by the training loop: a block's forward keeps
        # only its input, and the backward runs it again: ~1/3 more compute, a fraction of the memory.
        self.checkpoint_blocks = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2L)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            if p.dim() == 1:
                continue  # RMSNorm gains stay at 1
            std = (
                0.02 / math.sqrt(2 * self.config.n_layers)
                if name.endswith(("o_proj.weight", "down_proj.weight"))
                else 0.02
            )
            nn.init.normal_(p, mean=0.0, std=std)

    @torch.no_grad()
    def init_embeddings_as_mean(self, token_ids: list[int], rows: int = 0) -> None:
        """Start rows of never-trained tokens at the mean of the other rows — of the first `rows`
        only, when given: the tokenizer's old vocabulary, not the embedding's unused padding rows.

        A token absent from pre-training (a chat marker, a newly added token) keeps a random input
        embedding, and the softmax has pushed its output row far down: its first loss is huge and
        its updates tear through the model. The mean embedding is a neutral start.
        """
        for weight in {id(w): w for w in (self.embed_tokens.weight, self.head_weight)}.values():
            keep = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
            keep[: rows or weight.shape[0]] = True
            keep[token_ids] = False
            weight[token_ids] = weight[keep].mean(0)

    @torch.no_grad()
    def resize_vocab(self, vocab_size: int) -> None:
        """Grow the embedding (and an untied head) to vocab_size rows, for tokens added to the
        tokenizer; the new rows start at the mean row (see init_embeddings_as_mean)."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"resize_vocab only grows the vocabulary: {vocab_size} < {old}")
        self.config = replace(self.config, vocab_size=vocab_size)

        def grown(weight: Tensor) -> nn.Parameter:
            new = torch.cat([weight, weight.mean(0, keepdim=True).expand(vocab_size - old, -1)])
            return nn.Parameter(new, requires_grad=weight.requires_grad)

        self.embed_tokens.weight = grown(self.embed_tokens.weight)
        self.embed_tokens.num_embeddings = vocab_size
        if self.lm_head is not None:
            self.lm_head.weight = grown(self.lm_head.weight)
            self.lm_head.out_features = vocab_size

    @property
    def head_weight(self) -> Tensor:
        """The (V, dim) output projection: the embedding matrix itself when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, dim).

        A packed row passes position_ids (B, T), restarting at 0 for each document so RoPE sees
        what an unpacked run sees, and document_ids (B, T), so attention stays inside a document.
        Generation passes a cache: input_ids are then the tokens after the cached ones.
        """
        start = 0 if cache is None else cache.length
        end = start + input_ids.shape[1]
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds model.max_seq_len={self.config.max_seq_len}")
        positions = torch.arange(start, end, device=input_ids.device) if position_ids is None else position_ids
        cos, sin = rotary_cos_sin(positions, rotary_frequencies(self.config, input_ids.device))
        backend = ATTENTION_BACKENDS[self.backends.attention]
        # Once per forward, not per layer: the document spans (torch) or bounds (Triton).
        documents = None if document_ids is None else backend.documents(document_ids)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            attend = backend.attend if cache is None else cache.attention(i)
            if self.checkpoint_blocks and torch.is_grad_enabled():  # keep the block's input, recompute the rest
                x = checkpoint(layer, x, cos, sin, attend, documents, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attend, documents)
        if cache is not None:
            cache.length = end
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """(B, T, dim) -> (B, T, V). Only generation needs these; training never holds them all."""
        return hidden @ self.head_weight.T

    def loss(
        self,
        input_ids: Tensor,
        labels: Tensor,
        num_trained_tokens: int,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """Masked next-token loss; labels are already shifted, -100 where no loss is taken."""
        hidden = self(input_ids, position_ids, document_ids)
        return masked_lm_loss(hidden, self.head_weight, labels, num_trained_tokens, backend=self.backends.loss)

    def loss_and_base_kl(
        self,
        input_ids: Tensor,
        labels: Tensor,
        num_trained_tokens: int,
        position_ids: Tensor | None,
        document_ids: Tensor | None,
        kl_positions: Tensor,
        base_ids: Tensor,
        base_probs: Tensor,
        base_rest: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """`loss`, and Σ KL(base ‖ model) over kl_positions given the base's top-k distributions there
        (`base_kl.py`, `loss.base_kl_sum`): one forward for both."""
        hidden = self(input_ids, position_ids, document_ids)
        loss = masked_lm_loss(hidden, self.head_weight, labels, num_trained_tokens, backend=self.backends.loss)
        return loss, base_kl_sum(hidden, self.head_weight, kl_positions, base_ids, base_probs, base_rest)

    def sequence_log_probs(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """(B,) Σ log p(label) over each row's trained positions (DPO's log π(y|x)); labels shifted, -100 elsewhere."""
        hidden = self(input_ids)
        return LOGPROB_BACKENDS[self.backends.loss](hidden, self.head_weight, labels)
