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
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from minisft.labels import IGNORE_INDEX


def token_loss_sum_torch(hidden: Tensor, head_weight: Tensor, labels: Tensor) -> Tensor:
    """Σ cross-entropy over trained positions, in fp32. hidden (..., dim), labels (...)."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ head_weight.T  # (N, V): the memory peak of SFT
    return F.cross_entropy(logits.float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def token_loss_sum_triton(hidden: Tensor, head_weight: Tensor, labels: Tensor) -> Tensor:
    """The same sum by the fused linear + cross-entropy kernel: the (N, V) logits never exist."""
    from triton_kernels.cross_entropy import linear_cross_entropy  # imported on use: triton is heavy

    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head_weight, labels.reshape(-1), "sum")


# Name -> Σ-loss function with the signature above (the model's `Backends.loss` picks one).
LOSS_BACKENDS = {"torch": token_loss_sum_torch, "triton": token_loss_sum_triton}


def masked_lm_loss(
    hidden: Tensor, head_weight: Tensor, labels: Tensor, num_trained_tokens: int, backend: str = "torch"
) -> Tensor:
    """Σ token losses / num_trained_tokens. A batch without trained tokens gives 0, never NaN."""
    total = LOSS_BACKENDS[backend](hidden, head_weight, labels)
    return total / max(num_trained_tokens, 1)
