"""Fused cross-entropy, and fused linear + cross-entropy, in Triton.

The maths, for one row of logits z ∈ R^V with label y:

    lse  = log Σ_j exp(z_j)                       (computed online, block by block)
    loss = lse − z_y                               (0 where y = ignore_index)
    ∂loss/∂z_j = softmax(z)_j − [j = y] = exp(z_j − lse) − [j = y]

The log-sum-exp is taken in one pass over the row with the online rescaling of Milakov &
Gimelshein (2018, "Online normalizer calculation for softmax"): keep a running max m and a running
sum d of exp(z − m); when a block raises the max to m', rescale d by exp(m − m').

Because the gradient needs only z, y and lse, the kernel writes it in the forward pass, over the
logits themselves (or into a fresh buffer when the caller keeps the logits). Backward then has
nothing left to compute but a multiplication by the incoming gradient — skipped when that is 1,
as it is whenever the loss is the last op before `.backward()`.

Bytes moved for N rows × V classes, b bytes per logit:
  eager PyTorch  `F.cross_entropy(logits.float(), y)`: upcast (read b, write 4), log-softmax
                 (read 4, write 4), backward (read 4, write 4, then the cast back: read 4, write b)
                 ≈ (2b + 24)·N·V bytes, plus an fp32 copy of the logits held from forward to backward.
  this kernel    read the row twice (lse pass, gradient pass), write the gradient once
                 = 3b·N·V bytes, nothing extra held; a 256 KB bf16 row usually still sits in L2 for
                 its second read, bringing DRAM traffic near the 2b·N·V minimum.

Fused linear + cross-entropy (hidden (N, d) × weight (V, d)ᵀ) processes rows in chunks: each
chunk's logits are computed, turned into their gradient in place by the kernel above, and
immediately consumed by two matmuls, ∂hidden = ∂logits · W and ∂W += ∂logitsᵀ · hidden. The
full (N, V) logits never exist; peak extra memory is one chunk's logits, which is sized to
about the hidden states' own size (the chunking of Liger-Kernel's fused linear cross-entropy).

Not implemented, on purpose: label smoothing and z-loss (SFT here does not use them, and each
would add a term to every line of the kernel).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

IGNORE_INDEX = -100


@triton.jit
def cross_entropy_kernel(
    logits_ptr,  # (N, V) logits, row-major; read only
    logits_row_stride,
    grad_ptr,  # (N, V) where ∂loss/∂logits goes; may be logits_ptr itself (in place)
    grad_row_stride,
    labels_ptr,  # (N,) int64 class ids, or ignore_index
    loss_ptr,  # (N,) fp32 per-row loss, written
    grad_scale_ptr,  # (1,) fp32 factor for every gradient: 1/count for a mean, 1 for a sum
    n_cols,  # V
    ignore_index,
    BLOCK: tl.constexpr,
):
    """Grid: one program per row. Each program streams its row in BLOCK-wide slices, twice."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 past 2^31 elements
    logits_ptr += row * logits_row_stride
    grad_ptr += row * grad_row_stride
    label = tl.load(labels_ptr + row)

    # 1. Ignored row: no loss, zero gradient.
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(grad_ptr + cols, tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty), mask=cols < n_cols)
        return

    # 2. Online log-sum-exp over the row: running max m, running Σ exp(z - m).
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(logits_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    # 3. Loss = lse - z_label.
    z_label = tl.load(logits_ptr + label).to(tl.float32)
    tl.store(loss_ptr + row, lse - z_label)

    # 4. Gradient = (softmax - onehot) * scale, written block by block (over the logits if in place).
    scale = tl.load(grad_scale_ptr)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(logits_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(grad_ptr + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def _check_device(t: Tensor) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"the Triton kernels need a CUDA tensor (got one on {t.device}); on a CPU use kernels='torch', "
            "or set TRITON_INTERPRET=1 before importing triton to run them (slowly) in the interpreter"
        )


def _block_size(n_cols: int) -> int:
    return min(triton.next_power_of_2(n_cols), 4096)


def _launch(logits: Tensor, grad: Tensor, labels: Tensor, grad_scale: Tensor, ignore_index: int) -> Tensor:
    """Run the kernel over every row; fill `grad`; return the (N,) fp32 per-row losses."""
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows:
        cross_entropy_kernel[(n_rows,)](
            logits, logits.stride(0), grad, grad.stride(0), labels, losses, grad_scale, n_cols, ignore_index,
            BLOCK=_block_size(n_cols), num_warps=8,
        )  # fmt: skip
    return losses


def _gradient_scale(labels: Tensor, reduction: str, ignore_index: int) -> tuple[Tensor, Tensor]:
    """-> (the factor the kernel applies to every gradient, the loss's divisor); no host sync."""
    if reduction == "mean":
        count = (labels != ignore_index).sum().clamp(min=1).float()
        return (1.0 / count).reshape(1), count
    if reduction in ("sum", "none"):
        one = torch.ones(1, dtype=torch.float32, device=labels.device)
        return one, one[0]
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _reduce(losses: Tensor, reduction: str, divisor: Tensor) -> Tensor:
    return losses if reduction == "none" else losses.sum() / divisor


def _scaled(grad: Tensor, grad_output: Tensor) -> Tensor:
    """grad · grad_output, in place (so a backward may run only once: no retain_graph).

    Testing `== 1` reads one number back from the GPU, a sync that costs far less than the pass
    over N·V gradients it saves in the usual case.
    """
    if grad_output.numel() == 1:
        return grad if bool(grad_output == 1) else grad.mul_(grad_output)
    return grad.mul_(grad_output[:, None])  # reduction="none": one factor per row


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, reduction: str, ignore_index: int, keep_logits: bool) -> Tensor:
        _check_device(logits)
        logits = logits.contiguous()
        grad = torch.empty_like(logits) if keep_logits else logits  # in place: logits become their gradient
        grad_scale, divisor = _gradient_scale(labels, reduction, ignore_index)
        losses = _launch(logits, grad, labels.contiguous(), grad_scale, ignore_index)
        ctx.save_for_backward(grad)
        return _reduce(losses, reduction, divisor)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return _scaled(grad, grad_output), None, None, None, None


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    keep_logits: bool = False,
) -> Tensor:
    """`F.cross_entropy(logits, labels)` for (N, V) logits in fp32/bf16/fp16; loss in fp32.

    By default the logits are overwritten with their gradient during the forward pass (the
    memory saving); pass `keep_logits=True` if you still need them afterwards.
    """
    return CrossEntropyFunction.apply(logits, labels, reduction, ignore_index, keep_logits)


def cross_entropy_reference(
    logits: Tensor, labels: Tensor, reduction: str = "mean", ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """The same maths in plain PyTorch, in fp32: lse - z_label per row, 0 on ignored rows."""
    logits = logits.float()
    keep = labels != ignore_index
    z_label = logits.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    losses = torch.where(keep, torch.logsumexp(logits, dim=1) - z_label, 0.0)
    if reduction == "none":
        return losses
    return losses.sum() / (keep.sum().clamp(min=1) if reduction == "mean" else 1)


def _chunk_rows(n_rows: int, vocab: int, dim: int) -> int:
    """Rows per chunk such that a chunk's logits (rows × V) are about as big as hidden (N × d)."""
    return max(1, min(n_rows, triton.next_power_of_2(math.ceil(n_rows / math.ceil(vocab / dim)))))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str, ignore_index: int) -> Tensor:
        _check_device(hidden)
        if reduction == "none":
            raise ValueError("linear_cross_entropy supports reduction 'mean' or 'sum'")
        n_rows, dim = hidden.shape
        grad_scale, divisor = _gradient_scale(labels, reduction, ignore_index)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        # ∂W accumulates over all chunks: fp32, so thousands of small bf16 updates do not round away.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        chunk = _chunk_rows(n_rows, weight.shape[0], dim)
        for start in range(0, n_rows, chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows]
            logits = h @ weight.T  # (chunk, V): the only logits that ever exist
            losses[rows] = _launch(logits, logits, labels[rows].contiguous(), grad_scale, ignore_index)
            if grad_hidden is not None:
                grad_hidden[rows] = logits @ weight.to(logits.dtype)
            if grad_weight is not None:
                grad_weight += logits.T @ h.to(logits.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return losses.sum() / divisor

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = _scaled(grad_hidden, grad_output)
        if grad_weight is not None:
            grad_weight = _scaled(grad_weight, grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str = "mean", ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """cross_entropy(hidden @ weight.T, labels) without materialising the (N, V) logits.

    hidden (N, d), weight (V, d), labels (N,). Gradients for hidden and weight are computed in
    the forward pass, chunk by chunk; the loss is fp32.
    """
    return LinearCrossEntropyFunction.apply(hidden, weight, labels, reduction, ignore_index)


def linear_cross_entropy_reference(
    hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str = "mean", ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """The same maths in plain PyTorch: the full logits, then `cross_entropy_reference`."""
    return cross_entropy_reference(hidden @ weight.T, labels, reduction, ignore_index)
