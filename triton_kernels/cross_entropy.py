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
nothing left to compute but a multiplication by the incoming gradient — skipped when that is 1
(a plain `loss.backward()`), which costs one GPU→CPU read to find out but saves a pass over N·V.

Bytes moved for N rows × V classes, b bytes per logit:
  eager PyTorch  `F.cross_entropy(logits.float(), y)`: upcast (read b, write 4), log-softmax
                 (read 4, write 4), backward (read 4, write 4, then the cast back: read 4, write b)
                 ≈ (2b + 24)·N·V bytes, plus an fp32 copy of the logits held from forward to backward.
  this kernel    read the row twice (lse pass, gradient pass), write the gradient once
                 = 3b·N·V bytes, nothing extra held. (With ~1000 rows in flight at once the second
                 read probably comes from DRAM, not L2: the minimum is 2b·N·V; unmeasured.)

Fused linear + cross-entropy (hidden (N, d) × weight (V, d)ᵀ) processes rows in chunks: each
chunk's logits are computed, turned into their gradient in place by the kernel above, and
immediately consumed by two matmuls, ∂hidden = ∂logits · W and ∂W += ∂logitsᵀ · hidden. The
full (N, V) logits never exist. Extra memory: one chunk's logits (CHUNK_BYTES, 256 MiB), ∂hidden,
and ∂W in fp32 (V·d·4 bytes, 1 GiB at 128k × 2048), held from forward to backward.

Per-row mode (reduction='none', DPO's per-token log-probs, `linear_log_probs` sums them per
sequence): the upstream gradient is one factor per row, g_r = ∂L/∂loss_r, known only after the
whole loss is — DPO's ∂L/∂log π(y|x) depends on every token of both sequences. So the forward
keeps only the losses (the kernel still writes a gradient in place, discarded: one extra pass over
a chunk's logits, small beside its matmul), and the backward recomputes each chunk's logits and
runs the kernel with `grad_scale_ptr` pointing at the chunk's g_r, then the two matmuls as above:
∂logits_r = g_r · (softmax(z_r) − onehot(y_r)). Cost: 4 matmuls per chunk instead of 3; memory:
still one chunk's logits, and ∂W only during the backward.

Not implemented, on purpose: label smoothing and z-loss (SFT here does not use them, and each
would add a term to every line of the kernel).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_kernels.launch import Cost, LaunchConfig

IGNORE_INDEX = -100
BLOCK_MAX = 4096  # columns per slice; any vocabulary ≥ 4096 streams its rows in slices this wide
NUM_WARPS = 8


@triton.jit
def cross_entropy_kernel(
    logits_ptr,  # (N, V) logits, row-major; read only
    logits_row_stride,
    grad_ptr,  # (N, V) where ∂loss/∂logits goes; may be logits_ptr itself (in place)
    grad_row_stride,
    labels_ptr,  # (N,) int64 class ids, or ignore_index
    loss_ptr,  # (N,) fp32 per-row loss, written
    grad_scale_ptr,  # (N,) fp32 factor for each row's gradient: 1/count for a mean, 1 for a sum, ∂L/∂loss_row
    n_cols,  # V
    ignore_index,
    BLOCK: tl.constexpr,
):
    """Grid: one program per row. Each program streams its row in BLOCK-wide slices, twice."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 past 2^31 elements
    logits_ptr += row * logits_row_stride
    grad_ptr += row * grad_row_stride
    label = tl.load(labels_ptr + row)

    # 1. A label outside [0, V) is a data bug: NaN, never a neighbouring row's logit.
    if (label != ignore_index) & ((label < 0) | (label >= n_cols)):
        tl.store(loss_ptr + row, float("nan"))
        return

    # 2. Ignored row: no loss, zero gradient.
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(grad_ptr + cols, tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty), mask=cols < n_cols)
        return

    # 3. Online log-sum-exp over the row: running max m, running Σ exp(z - m). While every logit
    #    so far is -inf (a masked vocabulary), m is -inf and z - m would be -inf - (-inf) = NaN:
    #    shift by 0 instead, so those blocks add exp(-inf) = 0 (one scalar select per block).
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(logits_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), axis=0)
        m = m_new
    lse = m + tl.log(d)

    # 4. Loss = lse - z_label.
    z_label = tl.load(logits_ptr + label).to(tl.float32)
    tl.store(loss_ptr + row, lse - z_label)

    # 5. Gradient = (softmax - onehot) * scale, written block by block (over the logits if in place).
    scale = tl.load(grad_scale_ptr + row)
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
    return min(triton.next_power_of_2(n_cols), BLOCK_MAX)


def _launch(logits: Tensor, grad: Tensor, labels: Tensor, grad_scale: Tensor, ignore_index: int) -> Tensor:
    """Run the kernel over every row; fill `grad`; return the (N,) fp32 per-row losses.

    grad_scale: (1,) one factor for every row, or (N,) one per row (an upstream ∂L/∂loss_row)."""
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    # The kernel reads one factor per row: N floats, nothing beside the N·V logits.
    grad_scale = grad_scale.float().expand(n_rows).contiguous()
    if n_rows:
        cross_entropy_kernel[(n_rows,)](
            logits, logits.stride(0), grad, grad.stride(0), labels, losses, grad_scale, n_cols, ignore_index,
            BLOCK=_block_size(n_cols), num_warps=NUM_WARPS,
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
    over N·V gradients it saves when the loss is backpropagated as is.
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
        if grad is logits:  # an op that saved these logits for its own backward must now fail loudly
            torch.autograd.graph.increment_version(logits)
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


# Memory for one chunk's logits. Big enough that the ∂W matmul (contraction over the chunk's rows)
# stays compute-bound — ~1000 rows at V = 128k in bf16 — and small beside the model.
CHUNK_BYTES = 256 * 2**20


def _chunk_rows(n_rows: int, vocab: int, element_size: int) -> int:
    return max(1, min(n_rows, CHUNK_BYTES // (vocab * element_size)))


def _fused_chunks(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    grad_scale: Tensor,
    ignore_index: int,
    dtype: torch.dtype,
    grads: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One pass over the rows, a chunk at a time: logits = h·Wᵀ, the kernel (losses, and ∂logits in
    place), then — with grads — ∂hidden = ∂logits·W and ∂W += ∂logitsᵀ·h. -> (losses (N,) fp32,
    ∂hidden or None, ∂W in fp32 or None); a gradient is None when its input needs none too."""
    n_rows, device = hidden.shape[0], hidden.device.type
    w = weight.to(dtype)  # cast once here, not in every chunk's matmuls: saves 3 casts of V·d per chunk
    grad_hidden = torch.empty_like(hidden) if grads and hidden.requires_grad else None
    # ∂W accumulates over all chunks: fp32, so many small bf16 updates do not round away.
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads and weight.requires_grad else None
    losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    chunk = _chunk_rows(n_rows, weight.shape[0], w.element_size())
    with torch.autocast(device, enabled=False):
        for start in range(0, n_rows, chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows].to(dtype)
            logits = h @ w.T  # (chunk, V): the only logits that ever exist
            scale = grad_scale if grad_scale.numel() == 1 else grad_scale[rows]
            losses[rows] = _launch(logits, logits, labels[rows].contiguous(), scale, ignore_index)
            if grad_hidden is not None:
                grad_hidden[rows] = logits @ w
            if grad_weight is not None:
                grad_weight += logits.T @ h
    return losses, grad_hidden, grad_weight


def _matmul_dtype(hidden: Tensor) -> torch.dtype:
    """What autocast would pick (bf16 in training), else the inputs' own."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class LinearCrossEntropyFunction(torch.autograd.Function):
    """reduction 'mean' / 'sum': both gradients are made in the forward pass (the upstream gradient
    is a single number, applied in backward). reduction 'none': the upstream gradient is one number
    per row and unknown until backward — DPO's ∂L/∂logp depends on the whole sequence's sum — so
    the forward keeps only the losses and backward recomputes each chunk's logits with the row
    factors in the kernel: one more (chunk, d) × (d, V) matmul per chunk, still no (N, V) logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str, ignore_index: int) -> Tensor:
        _check_device(hidden)
        dtype = _matmul_dtype(hidden)
        grad_scale, divisor = _gradient_scale(labels, reduction, ignore_index)
        per_row = reduction == "none"
        losses, grad_hidden, grad_weight = _fused_chunks(
            hidden, weight, labels, grad_scale, ignore_index, dtype, grads=not per_row
        )
        ctx.reduction, ctx.ignore_index, ctx.dtype, ctx.weight_dtype = reduction, ignore_index, dtype, weight.dtype
        if per_row:
            ctx.save_for_backward(hidden, weight, labels)
            return losses
        ctx.save_for_backward(grad_hidden, grad_weight)
        return losses.sum() / divisor

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.reduction == "none":
            hidden, weight, labels = ctx.saved_tensors
            hidden = hidden.detach().requires_grad_(ctx.needs_input_grad[0])
            weight = weight.detach().requires_grad_(ctx.needs_input_grad[1])
            _, grad_hidden, grad_weight = _fused_chunks(
                hidden, weight, labels, grad_output.contiguous(), ctx.ignore_index, ctx.dtype, grads=True
            )
            if grad_weight is not None:
                grad_weight = grad_weight.to(ctx.weight_dtype)
            return grad_hidden, grad_weight, None, None, None
        # Always scale (no `== 1` test and its sync): these are N·d and V·d numbers, not N·V, and
        # in training grad_output is never 1 anyway: 1/N (loss.py divides the sum by the step's
        # token count), world/N under torchrun (train.py scales each rank's loss by the ranks).
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str = "mean", ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """cross_entropy(hidden @ weight.T, labels) without materialising the (N, V) logits.

    hidden (N, d), weight (V, d), labels (N,). With 'mean' or 'sum' the gradients for hidden and
    weight are computed in the forward pass, chunk by chunk; with 'none' the (N,) per-row losses
    (−log p of each label: a per-token log-prob, negated) take any upstream gradient, and backward
    recomputes the chunks. The loss is fp32.
    """
    return LinearCrossEntropyFunction.apply(hidden, weight, labels, reduction, ignore_index)


def linear_log_probs(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-sequence Σ log p(label) over the non-ignored positions, from hidden states and the head
    weight, without the logits: hidden (B, T, d), labels (B, T) -> (B,) fp32 (DPO's log π(y|x))."""
    losses = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), "none", ignore_index
    )
    return -losses.view(labels.shape).sum(-1)


def linear_cross_entropy_reference(
    hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str = "mean", ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """The same maths in plain PyTorch: the full logits, then `cross_entropy_reference`."""
    return cross_entropy_reference(hidden @ weight.T, labels, reduction, ignore_index)


def linear_log_probs_reference(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """The same per-sequence sums from the full (B, T, V) logits: log_softmax, gather, mask, sum."""
    logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    keep = labels != ignore_index
    return torch.where(keep, logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0).sum(-1)


# ---------------------------------------------------------------------------------------------------
# Launch metadata: every configuration the wrapper can pick, and what a launch should cost — for
# scripts/kernel_report.py (see launch.py), declared from the wrapper's own constants.


def launch_configs() -> list[LaunchConfig]:
    """Every config `_launch` can pick: dtype × BLOCK (a power of two ≤ BLOCK_MAX) × V's alignment.

    Triton's JIT specialises on V (= the row strides) being a multiple of 16: then it emits
    16-byte loads and stores, otherwise 2-byte ones (bf16), a different kernel. Pointers from torch
    are 16-byte aligned. Real training launches BLOCK_MAX: those configs are compiled in CI.
    """
    configs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for block in (BLOCK_MAX >> i for i in range(BLOCK_MAX.bit_length())):  # 4096, 2048, …, 1
            for v16 in (":16", "") if block >= 16 else ("",):  # V ≤ BLOCK < 16 is no multiple of 16
                args = {
                    "logits_ptr": f"*{dtype}:16", "logits_row_stride": f"i32{v16}",
                    "grad_ptr": f"*{dtype}:16", "grad_row_stride": f"i32{v16}",
                    "labels_ptr": "*i64:16", "loss_ptr": "*fp32:16", "grad_scale_ptr": "*fp32:16",
                    "n_cols": f"i32{v16}", "ignore_index": "i32",
                }  # fmt: skip
                label = f"{dtype} BLOCK={block} V%16{'=0' if v16 else '≠0'}"
                configs.append(LaunchConfig(
                    cross_entropy_kernel, label, dtype, args, {"BLOCK": block}, NUM_WARPS, in_ci=block == BLOCK_MAX
                ))  # fmt: skip
    return configs


def cross_entropy_cost(n_rows: int, n_cols: int, dtype: str) -> Cost:
    """One launch over (N, V) logits: read every row twice, write its gradient once (3b·N·V bytes,
    plus labels and losses); ≈ 8 FLOPs per logit (lse pass: max, subtract, exp, add; gradient pass:
    subtract, exp, subtract the one-hot, scale)."""
    b = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    return Cost(
        "cross_entropy_kernel",
        f"N={n_rows} × V={n_cols}, {dtype}",
        bytes=3 * b * n_rows * n_cols + (8 + 4) * n_rows,
        fp32_flops=8 * n_rows * n_cols,
    )


def reference_costs() -> list[Cost]:
    """A step of 8 × 1024 tokens over Qwen3's 151936-token vocabulary."""
    return [cross_entropy_cost(8192, 151936, dtype) for dtype in ("bf16", "fp32")]
