"""A Llama-style decoder-only transformer, small enough to read in one sitting.

References: RMSNorm (Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021,
RoFormer), SwiGLU feed-forward (Shazeer 2020), grouped-query attention (Ainslie et al. 2023),
as combined in Llama (Touvron et al. 2023). Parameter names follow the Hugging Face Llama
layout (`layers.0.self_attn.q_proj.weight`, ...) so a pretrained checkpoint maps onto this model
name for name.

Attention and the loss are pluggable: `Transformer(config, kernels="torch")` uses PyTorch
(SDPA and `F.cross_entropy`); the Triton kernels in `triton_kernels/` register themselves as
further backends. Classes read bottom-up: norm -> rotary -> attention -> MLP -> block -> model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minisft.loss import masked_lm_loss


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: each K/V head serves n_heads // n_kv_heads Q heads
    ffn_dim: int = 384  # hidden width of the SwiGLU MLP
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head shares the token-embedding matrix

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("model.rope_theta and model.norm_eps must be positive")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self) -> int:
        """Parameter count from the config alone (embedding counted once when tied)."""
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        attention = d * d * 2 + d * kv * 2  # q, o and k, v projections
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
        attention = 12 * self.n_layers * self.dim * seq_len // 2
        return 6 * n_matmul + attention


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · g, computed in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles, each (..., T, head_dim), for positions (..., T).

    Pair i of a head rotates by position · theta^(-2i/head_dim) (RoFormer eq. 15). The halves
    layout (`rotate_half`) is the one Hugging Face Llama checkpoints are trained with.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, H, D) by the angles in cos/sin, (T, D) or (B, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    return (x.float() * cos + rotated_half.float() * sin).to(x.dtype)


def attention_torch(q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor | None = None) -> Tensor:
    """Causal attention with PyTorch SDPA. q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D).

    With document_ids (B, T), a packed row's token attends only to earlier tokens of its own
    document — through an explicit (B, 1, T, T) mask, which is what the Triton kernel avoids.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants (B, H, T, D)
    gqa = k.shape[1] != q.shape[1]
    if document_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        T = q.shape[2]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
        mask = (causal & same_document)[:, None]  # (B, 1, T, T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


def attention_triton(q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor | None = None) -> Tensor:
    """The same, by the Triton flash-attention kernel: no (T, T) mask or score matrix in memory."""
    from triton_kernels.attention import attention  # imported on use: triton is heavy

    return attention(q, k, v, document_ids)


# Name -> causal attention function (the model's `kernels` picks one, and the loss with it:
# see LOSS_BACKENDS in loss.py).
ATTENTION_BACKENDS = {"torch": attention_torch, "triton": attention_triton}


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        kv_dim = config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.k_proj = nn.Linear(config.dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend, document_ids: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q, k, v, document_ids)  # (B, T, H, D)
        return self.o_proj(out.reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020, eq. 6)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend, document_ids: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend, document_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, kernels: str = "torch") -> None:
        super().__init__()
        if kernels not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown kernels backend {kernels!r}; choose one of {sorted(ATTENTION_BACKENDS)}")
        self.config, self.kernels = config, kernels
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2L)."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue  # RMSNorm gains stay at 1
            std = (
                0.02 / math.sqrt(2 * self.config.n_layers)
                if name.endswith(("o_proj.weight", "down_proj.weight"))
                else 0.02
            )
            nn.init.normal_(p, mean=0.0, std=std)

    @torch.no_grad()
    def init_embeddings_as_mean(self, token_ids: list[int]) -> None:
        """Start rows of never-trained tokens at the mean of the other rows.

        A token absent from pre-training (a chat marker, a newly added token) keeps a random input
        embedding, and the softmax has pushed its output row far down: its first loss is huge and
        its updates tear through the model. The mean embedding is a neutral start.
        """
        for weight in {id(w): w for w in (self.embed_tokens.weight, self.head_weight)}.values():
            keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            keep[token_ids] = False
            weight[token_ids] = weight[keep].mean(0)

    @property
    def head_weight(self) -> Tensor:
        """The (V, dim) output projection: the embedding matrix itself when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self, input_ids: Tensor, position_ids: Tensor | None = None, document_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, dim).

        A packed row passes position_ids (B, T), restarting at 0 for each document so RoPE sees
        what an unpacked run sees, and document_ids (B, T), so attention stays inside a document.
        """
        T = input_ids.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.config.max_seq_len}")
        positions = torch.arange(T, device=input_ids.device) if position_ids is None else position_ids
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        attend = ATTENTION_BACKENDS[self.kernels]
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attend, document_ids)
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
        return masked_lm_loss(hidden, self.head_weight, labels, num_trained_tokens, backend=self.kernels)
