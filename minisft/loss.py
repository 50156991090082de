"""The SFT loss: next-token cross-entropy on trained tokens only, normalised per token.

    loss = Σ_{t : labels[t] != -100} −log softmax(h_t · Wᵀ)[labels[t]]  /  N

N is the number of trained tokens in the whole optimizer step — all micro-batches and, under
torchrun, all ranks (`train.count_tokens` sums it) — passed in by the caller. Dividing each
micro-batch's *sum* by the same global N makes k accumulated micro-batches give exactly the loss
and gradient of one big batch; taking a per-micro-batch mean instead weights a short answer's
tokens more than a long one's (the gradient-accumulation bug that TRL and transformers shipped for
years).

Labels arrive already shifted (labels[t] is the token after input_ids[t]; see `chat.py`), so
nothing here shifts.

The (N, V) logits are SFT's memory peak — at a 49k–152k vocabulary, larger than every layer's
activations together — so neither backend ever holds them whole. The PyTorch one takes the trained
rows only (a prompt token's logits would be computed to be thrown away) and turns them into losses
a chunk of rows at a time under activation checkpointing: a chunk's logits live while its loss is
computed and are recomputed in the backward, one more (rows, dim) × (dim, V) matmul per chunk. The
Triton one fuses the head matmul and the cross-entropy in a kernel (`triton_kernels/cross_entropy.py`).

DPO (`dpo.py`) needs per-sequence sums instead, log π(y|x) = Σ_t log p(y_t | y_<t, x) over the
response: the same two backends, the torch one summing per-token losses into their sequences, the
Triton one the fused kernel's per-row mode (its backward takes one upstream factor per token).

train.base_kl's pull toward the base (`base_kl.py`) needs distributions, not one label's
probability: `top_k_distributions` keeps the base's top k once, before training, and `base_kl_sum`
takes KL(base ‖ model) against them over marked rows, chunked like the PyTorch token loss, its
gradients computed as each chunk's logits are, on either backend (the fused kernel has no KL mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from minisft.labels import IGNORE_INDEX

CHUNK_LOGITS = 2**24  # logits per chunk (64 MiB in fp32): 341 rows at SmolLM2's 49,152-token vocabulary
# The base_kl term's chunks are a quarter of that (85 rows at 49k): it runs over every prompt row, at
# the end of the forward, beside all the activations kept for the backward — with activation
# checkpointing its few (rows, V) buffers were the largest thing alive (SmolLM2 LoRA: +0.33 GB at 64 MiB).
# The base's pass before the first step (`top_k_distributions`) uses them too: its softmax, top-k and
# scatter copies of a 64 MiB chunk were the next largest.
KL_CHUNK_LOGITS = 2**22


def _chunk_token_losses(hidden: Tensor, head_weight: Tensor, labels: Tensor) -> Tensor:
    logits = hidden @ head_weight.T  # (rows, V)
    return F.cross_entropy(logits.float(), labels, reduction="none")


def token_losses_torch(hidden: Tensor, head_weight: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """-> (cross-entropy of each trained position in fp32, those positions' flat indices), chunk by
    chunk. hidden (..., dim), labels (...)."""
    labels = labels.reshape(-1)
    where = (labels != IGNORE_INDEX).nonzero()[:, 0]  # a sync on a GPU (the row count), where the Triton backend runs
    hidden, labels = hidden.reshape(-1, hidden.shape[-1])[where], labels[where]
    chunks = logit_chunks(len(labels), head_weight.shape[0])
    losses = [checkpoint(_chunk_token_losses, hidden[c], head_weight, labels[c], use_reentrant=False) for c in chunks]
    return torch.cat(losses), where


def logit_chunks(rows: int, vocab: int, logits: int | None = None) -> list[slice]:
    """Slices of rows whose logits fit `logits` (CHUNK_LOGITS); no row: one empty chunk (zero gradients,
    never a missing graph)."""
    step = max(1, (logits or CHUNK_LOGITS) // vocab)
    return [slice(start, start + step) for start in range(0, max(rows, 1), step)]


def token_loss_sum_torch(hidden: Tensor, head_weight: Tensor, labels: Tensor) -> Tensor:
    """Σ cross-entropy over trained positions, in fp32, chunk by chunk. hidden (..., dim), labels (...)."""
    return token_losses_torch(hidden, head_weight, labels)[0].sum()


def token_loss_sum_triton(hidden: Tensor, head_weight: Tensor, labels: Tensor) -> Tensor:
    """The same sum by the fused linear + cross-entropy kernel: the (N, V) logits never exist."""
    from triton_kernels.cross_entropy import linear_cross_entropy  # imported on use: triton is heavy

    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head_weight, labels.reshape(-1), "sum")


# Name -> Σ-loss function with the signature above (the model's `Backends.loss` picks one).
LOSS_BACKENDS = {"torch": token_loss_sum_torch, "triton": token_loss_sum_triton}


def sequence_log_probs_torch(hidden: Tensor, head_weight: Tensor, labels: Tensor) -> Tensor:
    """Σ log p(label) over each sequence's trained positions: hidden (B, T, dim), labels (B, T) -> (B,) fp32."""
    losses, where = token_losses_torch(hidden, head_weight, labels)
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
    return -sums.index_add(0, where // labels.shape[1], losses)


def sequence_log_probs_triton(hidden: Tensor, head_weight: Tensor, labels: Tensor) -> Tensor:
    """The same sums by the fused linear kernel's per-row mode: the (B·T, V) logits never exist."""
    from triton_kernels.cross_entropy import linear_log_probs

    return linear_log_probs(hidden, head_weight, labels)


# Name -> per-sequence log-prob function (DPO's log π(y|x)), picked by the same loss backend name.
LOGPROB_BACKENDS = {"torch": sequence_log_probs_torch, "triton": sequence_log_probs_triton}


def _chunk_top_k(hidden: Tensor, head_weight: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    probs = F.softmax((hidden @ head_weight.T).float(), dim=-1)
    top = probs.topk(k, dim=-1)
    rest = probs.scatter(-1, top.indices, 0.0).sum(-1)  # summed, not 1 − Σ top: exact 0 when k = V
    return top.indices.int(), top.values, rest


@torch.no_grad()
def top_k_distributions(hidden: Tensor, head_weight: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The next-token distributions of rows hidden (n, dim), cut to their k likeliest tokens: -> ids
    (n, k) int32, their probabilities (n, k) fp32, and the rest's mass (n,) fp32 (what `base_kl_sum`
    takes as the base's). Chunked: no (n, V) logits."""
    k = min(k, head_weight.shape[0])
    chunks = logit_chunks(len(hidden), head_weight.shape[0], KL_CHUNK_LOGITS)
    parts = [_chunk_top_k(hidden[c], head_weight, k) for c in chunks]
    return tuple(torch.cat(columns) for columns in zip(*parts, strict=True))


class _BucketedKL(torch.autograd.Function):
    """Σ over rows of the KL through the base's top-k buckets (`base_kl_sum`), its gradients computed in
    the forward while each chunk's logits exist, so the backward only scales them by the upstream
    gradient (a scalar: the output is a sum) and no chunk's logits are made twice — fused linear
    cross-entropy's trick (Liger Kernel, Hsu et al. 2024): one matmul fewer per chunk than recomputing
    them (on SmolLM2's 49k vocabulary these matmuls are most of the term's cost)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, head_weight: Tensor, top_ids: Tensor, top_probs: Tensor, rest: Tensor) -> Tensor:
        grad_hidden = torch.empty_like(hidden)
        grad_head = torch.zeros_like(head_weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for c in logit_chunks(len(hidden), head_weight.shape[0], KL_CHUNK_LOGITS):
            h, ids, q_top, q_rest = hidden[c], top_ids[c].long(), top_probs[c], rest[c, None]
            logits = (h @ head_weight.T).float()
            log_p = logits.sub_(logits.logsumexp(-1, keepdim=True))  # in place: two (rows, V) buffers at most
            log_p_top = log_p.gather(-1, ids)
            # log p(rest): the top k set to the most negative float, not -inf, so that an empty bucket
            # (k = V) gives a finite log and a zero gradient, not NaN.
            log_p_rest = log_p.scatter(-1, ids, torch.finfo(log_p.dtype).min).logsumexp(-1, keepdim=True)
            q = torch.cat([q_top, q_rest], dim=-1)
            total += (torch.xlogy(q, q) - q * torch.cat([log_p_top, log_p_rest], dim=-1)).sum()
            # dKL/dz_v = p_v − q_v in the top k, p_v − q_rest · p_v / p_rest outside it (p_v ≤ p_rest
            # there: the clamp only bounds the top k's values, which the scatter then replaces).
            grad = (log_p - log_p_rest).clamp_max_(0).exp_().mul_(-q_rest).add_(log_p.exp_())
            grad = grad.scatter_(-1, ids, log_p_top.exp() - q_top).to(h.dtype)
            grad_hidden[c] = grad @ head_weight
            if grad_head is not None:
                grad_head += grad.T @ h
        ctx.save_for_backward(grad_hidden, grad_head)
        return total

    @staticmethod
    def backward(ctx, upstream: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_head = ctx.saved_tensors
        grad_hidden = grad_hidden * upstream.to(grad_hidden.dtype)
        return grad_hidden, None if grad_head is None else grad_head * upstream, None, None, None


def base_kl_sum(
    hidden: Tensor, head_weight: Tensor, positions: Tensor, top_ids: Tensor, top_probs: Tensor, rest: Tensor
) -> Tensor:
    """Σ_t KL(q_t ‖ p_t) over the positions marked True, in fp32: p the model's next-token distribution,
    q the base model's as `top_k_distributions` keeps it (`base_kl.py`) — its top k tokens, one row
    per marked position in row-major order, and the rest of its mass as a (k+1)-th bucket:

        KL = Σ_{v ∈ top k} q_v log(q_v / p_v)  +  q_rest log(q_rest / p_rest),   p_rest = Σ_{v ∉ top k} p_v

    the KL between the two distributions seen through those k + 1 buckets: 0 when p = q, never more
    than the full KL (merging outcomes loses information), equal to it at k = V. Its gradient in the
    model's logit z_v is p_v − q_v in the top k and p_v (1 − q_rest / p_rest) outside it: the rest's
    mass is pulled to the base's, spread as the model spreads it. Distillation from the base (Hinton
    et al. 2015) with the teacher's top k stored, as Learning without Forgetting (Li & Hoiem 2016)
    keeps a network's old outputs while it learns a new task. hidden (..., dim); positions (...) bool.
    Chunked like the token loss, its gradients made in the forward (`_BucketedKL`): no (N, V) logits."""
    where = positions.reshape(-1).nonzero()[:, 0]
    if len(where) != len(top_ids):
        raise ValueError(f"base_kl_sum: {len(where)} marked positions but the base's distributions at {len(top_ids)}")
    hidden = hidden.reshape(-1, hidden.shape[-1])[where]
    return _BucketedKL.apply(hidden, head_weight, top_ids, top_probs, rest)


def masked_lm_loss(
    hidden: Tensor, head_weight: Tensor, labels: Tensor, num_trained_tokens: int, backend: str = "torch"
) -> Tensor:
    """Σ token losses / num_trained_tokens. A batch without trained tokens gives 0, never NaN."""
    total = LOSS_BACKENDS[backend](hidden, head_weight, labels)
    return total / max(num_trained_tokens, 1)
