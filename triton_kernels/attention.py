"""Causal flash attention in Triton, forward and backward, with grouped-query attention and
packed documents.

The maths (FlashAttention-2, Dao 2023, Algorithms 1 and 2). For one head, queries Q, keys K and
values V (T × D), scale τ = 1/√D:

    S = τ·Q·Kᵀ,   P = softmax(S + mask),   O = P·V,   mask_ij = 0 if j ≤ i and j, i share a document, else −∞

Forward: each program owns BLOCK_M query rows and streams the key/value blocks they may see,
keeping a running row max m, a running row sum ℓ of exp(S − m) and an unnormalised output acc
(the online softmax, eq. in §3.1.1): for a new block S_j,

    m' = max(m, rowmax S_j),  ℓ' = e^{m−m'}·ℓ + rowsum e^{S_j−m'},  acc' = e^{m−m'}·acc + e^{S_j−m'}·V_j

and finally O = acc/ℓ and L = m + log ℓ (the log-sum-exp, saved for the backward). Exponentials
are taken base 2 (exp2 is one instruction): scores are scaled by τ·log₂e, so the saved L is in
base-2 units, m + log₂ℓ, and the backward's P = exp2(S·τ·log₂e − L).

Backward recomputes P = exp(S − L) block by block instead of storing it (T² memory):

    Δ_i = rowsum(dO ∘ O)_i          (a small preprocess kernel, eq. in §3.1.2)
    dV = Pᵀ·dO,   dP = dO·Vᵀ,   dS = P ∘ (dP − Δ),   dQ = τ·dS·K,   dK = τ·dSᵀ·Q

One kernel owns a key block and loops over query blocks (dK, dV: no atomics); another owns a
query block and loops over key blocks (dQ).

Grouped-query attention: query head h reads key/value head h // (H / H_kv); the dK/dV program of
a key/value head sums over its group of query heads itself, so K and V are never repeated.

Packed documents: `document_ids` (B, T) label documents as contiguous runs of equal ids (the rule
is written once, in `documents.py`). From them each token gets the first index of its document
(doc_start) and one past its last (doc_end): `document_bounds`. Query i sees
keys j with doc_start[i] ≤ j ≤ i; key block loops start at the document start of the block's
first query (and dK/dV loops stop at the document end of the block's last key), so blocks that
lie wholly in another document are never loaded, let alone computed. In the forward only blocks
that touch the diagonal or a document edge pay for the mask; the backward kernels mask every
block they visit (simpler; splitting their loops as the forward does is a known speed-up). Without
document_ids a row is one document (doc_start = 0, doc_end = T): the same kernels, one code path.

Grid and blocks: forward and dQ — (⌈T/BLOCK_M⌉, B·H), one query block of one head each; dK/dV —
(⌈T/BLOCK_N⌉, B·H_kv). Tensors keep the model's (B, T, H, D) layout (strides are passed, so no
transposes); the log-sum-exp and Δ are (B, H, T) fp32.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from triton_kernels.documents import document_bounds, document_mask
from triton_kernels.launch import Cost, LaunchConfig

LOG2_E = 1.4426950408889634


# Pointer arithmetic. Q, K, V, O and their gradients keep the model's (B, T, heads, D) layout with
# D contiguous, so element (b, t, head, d) sits at BASE + b·stride_b + t·stride_t + head·stride_h + d.
# A program reads a tile of rows t (a block of queries or keys) × all of D for one (b, head): the
# row offsets broadcast down, the D offsets across. Kᵀ and Vᵀ tiles are loaded transposed directly.
@triton.jit
def tile_ptrs(BASE, b, rows, head, stride_b, stride_t, stride_h, offs_d):
    """Pointers to the (len(rows), HEAD_DIM) tile of batch b, head `head`."""
    return BASE + b * stride_b + rows[:, None] * stride_t + head * stride_h + offs_d[None, :]


@triton.jit
def tile_ptrs_t(BASE, b, rows, head, stride_b, stride_t, stride_h, offs_d):
    """The same tile transposed: (HEAD_DIM, len(rows)) pointers."""
    return BASE + b * stride_b + rows[None, :] * stride_t + head * stride_h + offs_d[:, None]


@triton.jit
def attention_fwd_kernel(
    Q, K, V, OUT, LSE, DOC_START,  # q/out (B, T, H, D), k/v (B, T, Hkv, D), lse (B, H, T), doc_start (B, T)
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    T, H, GROUP, qk_scale,  # qk_scale = log2(e) / sqrt(D)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H  # int64: b · stride_b passes 2^31 on long batches
    kv_h = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(tile_ptrs(Q, b, offs_m, h, stride_qb, stride_qt, stride_qh, offs_d), mask=row_ok[:, None])

    # 1. Which key blocks can this query block see? Causal: up to its last row. Packed: from the
    #    document start of its first row (doc_start never decreases along a row).
    hi = tl.minimum(start_m + BLOCK_M, T)
    row_doc_start = tl.load(DOC_START + b * T + offs_m, mask=row_ok, other=T)
    lo = (tl.load(DOC_START + b * T + start_m) // BLOCK_N) * BLOCK_N
    last_doc_start = tl.load(DOC_START + b * T + hi - 1)

    # 2. Online softmax over those key blocks.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = tl.load(tile_ptrs_t(K, b, offs_n, kv_h, stride_kb, stride_kt, stride_kh, offs_d),
                      mask=offs_n[None, :] < T, other=0.0)  # (D, BLOCK_N)  # fmt: skip
        v = tl.load(tile_ptrs(V, b, offs_n, kv_h, stride_vb, stride_vt, stride_vh, offs_d),
                    mask=offs_n[:, None] < T, other=0.0)  # (BLOCK_N, D)  # fmt: skip
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if (start_n + BLOCK_N > start_m) | (start_n < last_doc_start):  # on the diagonal or a document edge
            visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= row_doc_start[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no inf - inf
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # 3. Normalise, and keep log-sum-exp (base 2) for the backward.
    acc = acc / l_i[:, None]
    tl.store(tile_ptrs(OUT, b, offs_m, h, stride_ob, stride_ot, stride_oh, offs_d),
             acc.to(OUT.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def attention_bwd_preprocess_kernel(
    OUT, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
    T, H, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Δ = rowsum(dO ∘ O) for one block of rows of one head, in fp32. Grid as the forward."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(tile_ptrs(OUT, b, offs_m, h, stride_ob, stride_ot, stride_oh, offs_d),
                mask=row_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
    do = tl.load(tile_ptrs(DO, b, offs_m, h, stride_dob, stride_dot, stride_doh, offs_d),
                 mask=row_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC_END,  # dk/dv like k/v; do like q; lse, delta (B, H, T)
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
    T, H, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    H_KV = H // GROUP
    b, kv_h = (bkv // H_KV).to(tl.int64), bkv % H_KV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < T
    k = tl.load(tile_ptrs(K, b, offs_n, kv_h, stride_kb, stride_kt, stride_kh, offs_d), mask=key_ok[:, None], other=0.0)
    v = tl.load(tile_ptrs(V, b, offs_n, kv_h, stride_vb, stride_vt, stride_vh, offs_d), mask=key_ok[:, None], other=0.0)

    # 1. Which query blocks see these keys? Causal: from the first key on. Packed: up to the end of
    #    the last key's document.
    lo = (start_n // BLOCK_M) * BLOCK_M
    key_doc_end = tl.load(DOC_END + b * T + offs_n, mask=key_ok, other=0)
    hi = tl.load(DOC_END + b * T + tl.minimum(start_n + BLOCK_N, T) - 1)

    # 2. Accumulate dK and dV over every query head of the group and every visible query block.
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for h in range(kv_h * GROUP, (kv_h + 1) * GROUP):
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            q = tl.load(tile_ptrs(Q, b, offs_m, h, stride_qb, stride_qt, stride_qh, offs_d),
                        mask=row_ok[:, None], other=0.0)  # fmt: skip
            do = tl.load(tile_ptrs(DO, b, offs_m, h, stride_dob, stride_dot, stride_doh, offs_d),
                         mask=row_ok[:, None], other=0.0)  # fmt: skip
            lse = tl.load(LSE + (b * H + h) * T + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + (b * H + h) * T + offs_m, mask=row_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # Sᵀ (BLOCK_N, BLOCK_M)
            p_t = tl.math.exp2(s_t - lse[None, :])
            visible = (offs_m[None, :] >= offs_n[:, None]) & (offs_m[None, :] < key_doc_end[:, None]) & row_ok[None, :]
            p_t = tl.where(visible, p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # dV = Pᵀ dO
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # dPᵀ = V dOᵀ
            ds_t = p_t * (dp_t - delta[None, :])  # dSᵀ = Pᵀ ∘ (dPᵀ − Δ)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)  # dK = dSᵀ Q (τ applied below)

    out_k = tile_ptrs(DK, b, offs_n, kv_h, stride_kb, stride_kt, stride_kh, offs_d)
    out_v = tile_ptrs(DV, b, offs_n, kv_h, stride_vb, stride_vt, stride_vh, offs_d)
    tl.store(out_k, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(out_v, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC_START,  # dq like q
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
    T, H, GROUP, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    kv_h = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(tile_ptrs(Q, b, offs_m, h, stride_qb, stride_qt, stride_qh, offs_d), mask=row_ok[:, None], other=0.0)
    do = tl.load(tile_ptrs(DO, b, offs_m, h, stride_dob, stride_dot, stride_doh, offs_d),
                 mask=row_ok[:, None], other=0.0)  # fmt: skip
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)

    # The same key range as the forward pass.
    hi = tl.minimum(start_m + BLOCK_M, T)
    row_doc_start = tl.load(DOC_START + b * T + offs_m, mask=row_ok, other=T)
    lo = (tl.load(DOC_START + b * T + start_m) // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(tile_ptrs(K, b, offs_n, kv_h, stride_kb, stride_kt, stride_kh, offs_d),
                    mask=offs_n[:, None] < T, other=0.0)  # (BLOCK_N, D)  # fmt: skip
        v_t = tl.load(tile_ptrs_t(V, b, offs_n, kv_h, stride_vb, stride_vt, stride_vh, offs_d),
                      mask=offs_n[None, :] < T, other=0.0)  # (D, BLOCK_N)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= row_doc_start[:, None]) & row_ok[:, None]
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, v_t, input_precision=PRECISION)  # dP = dO Vᵀ
        ds = p * (dp - delta[:, None])  # dS = P ∘ (dP − Δ)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # dQ = dS K (τ applied below)

    tl.store(tile_ptrs(DQ, b, offs_m, h, stride_qb, stride_qt, stride_qh, offs_d),
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {q.device}); on a CPU use kernels='torch', "
            "or set TRITON_INTERPRET=1 before importing triton to run them (slowly) in the interpreter"
        )
    (B, T, H, D), Hkv = q.shape, k.shape[2]
    if k.shape != (B, T, Hkv, D) or v.shape != k.shape:
        raise ValueError(f"expected q (B, T, H, D) and k, v (B, T, Hkv, D); got {q.shape}, {k.shape}, {v.shape}")
    if H % Hkv:
        raise ValueError(f"{H} query heads cannot share {Hkv} key/value heads evenly")
    check_head_dim(D)


def check_head_dim(head_dim: int) -> None:
    if head_dim > HEAD_DIMS[-1]:
        raise ValueError(f"head dim {head_dim} is over the Triton attention's {HEAD_DIMS[-1]}: use attention = 'torch'")


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, doc_start: Tensor | None, doc_end: Tensor | None, sm_scale: float
    ) -> Tensor:
        # Contiguous, so the gradients (empty_like) share the inputs' strides; a no-op in the model.
        q, k, v = (t.contiguous() for t in (q, k, v))
        (B, T, H, D), group = q.shape, q.shape[2] // k.shape[2]
        if doc_start is None:  # one document per row: every key from 0 is in the query's document
            doc_start = torch.zeros(B, T, dtype=torch.int32, device=q.device)
            doc_end = torch.full((B, T), T, dtype=torch.int32, device=q.device)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        cfg = _tiles(q.device, "fwd")
        precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 tests want exact fp32 dots
        attention_fwd_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
            q, k, v, o, lse, doc_start, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            T, H, group, LOG2_E * sm_scale, HEAD_DIM=D, PRECISION=precision, **cfg,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse, doc_start, doc_end)
        ctx.precision, ctx.sm_scale = precision, sm_scale
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, o, lse, doc_start, doc_end = ctx.saved_tensors
        do = do.contiguous()
        (B, T, H, D), group = q.shape, q.shape[2] // k.shape[2]
        delta = torch.empty_like(lse)
        cfg = _tiles(q.device, "dq")
        attention_bwd_preprocess_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], T, H, HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"]
        )
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(HEAD_DIM=D, PRECISION=ctx.precision)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
        scales = (LOG2_E * ctx.sm_scale, ctx.sm_scale)
        cfg = _tiles(q.device, "dkdv")
        attention_bwd_dkdv_kernel[(triton.cdiv(T, cfg["BLOCK_N"]), B * k.shape[2])](
            q, k, v, do, lse, delta, dk, dv, doc_end, *strides, T, H, group, *scales, **common, **cfg
        )
        cfg = _tiles(q.device, "dq")
        attention_bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, doc_start, *strides, T, H, group, *scales, **common, **cfg
        )
        return dq, dk, dv, None, None, None


def attention(
    q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor | None = None, bounds: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Causal attention. q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D), in q's dtype.

    With document_ids (B, T) — contiguous runs of equal ids, one per packed document — a token
    attends only to earlier tokens of its own document. A caller that attends many times over the
    same documents (the model: once per layer) passes `bounds = document_bounds(document_ids)`,
    computed once, instead.

    The kernels are built for head dims 16, 32, 64 and 128 (HEAD_DIMS); any other up to 128 is
    zero-padded to the next one (the scale stays 1/√D), at the cost of a copy of q, k and v.
    """
    _check(q, k, v)
    if bounds is None and document_ids is not None:
        bounds = document_bounds(document_ids)
    D = q.shape[-1]
    block_d = next(d for d in HEAD_DIMS if d >= D)
    if block_d != D:  # zero columns add nothing to q·k and make zero output columns, cut off again
        q, k, v = (F.pad(t, (0, block_d - D)) for t in (q, k, v))
    out = AttentionFunction.apply(q, k, v, *(bounds or (None, None)), 1 / math.sqrt(D))
    return out[..., :D]


def attention_reference(q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor | None = None) -> Tensor:
    """The same maths in plain PyTorch, in fp32, with the explicit (B, 1, T, T) mask of `documents.py`."""
    T, D, group = q.shape[1], q.shape[3], q.shape[2] // k.shape[2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    if document_ids is None:
        visible = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    else:
        visible = document_mask(document_ids)
    out = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype)


# ---------------------------------------------------------------------------------------------------
# Launch metadata: the tiles the wrapper launches on a GPU, every configuration it can pick, and what
# a launch should cost — for scripts/kernel_report.py (see launch.py), declared from the same constants.


# Tile sizes per kernel on a GPU, one table for every head dim and for triton 3.6 to 3.9. Compiled
# for H100 (sm_90a) and A100 (sm_80) with the 16-byte alignment hints a real launch gets, in bf16,
# none spills registers under triton 3.6 or 3.9 (scripts/kernel_report.py checks every one; CI the
# training ones under both), and on H100 each uses wgmma (HGMMA in the SASS). Why these:
# - The rows a program owns (BLOCK_M for fwd and dQ, BLOCK_N for dK/dV) are 16 × num_warps. A score
#   tile that feeds the next dot from registers is split across warps by rows only, so with fewer
#   rows the second warpgroup recomputes the first one's S and dP: the earlier 64-row, 8-warp dK/dV
#   and dQ tiles issued 1.5× and 1.7× the HGMMA work they needed.
# - dK/dV keeps two fp32 (BLOCK_N, D) accumulators in registers: 16 query rows per step is what fits
#   beside them at D = 128 (32 spills on A100; 64 × 64 spilled under triton 3.6, on both GPUs).
# - dQ: 64 × 32 in 4 warps also fits fp32 at D = 128 in A100's shared memory (128 × 32 did not).
# Not yet timed on a GPU.
GPU_TILES = {
    "fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    "dkdv": {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "dq": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
}
# The interpreter gets 16-wide tiles, so that small test shapes span many blocks.
INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def _tiles(device: torch.device, kernel: str) -> dict:
    return GPU_TILES[kernel] if device.type == "cuda" else INTERPRETER_TILE


HEAD_DIMS = (16, 32, 64, 128)


def launch_configs() -> list[LaunchConfig]:
    """Every config the wrapper can launch on a GPU: kernel × dtype × head dim.

    Pointers from torch are 16-byte aligned, and every stride is a multiple of the head dim (≥ 16);
    T, H and GROUP carry no such promise. Training launches bf16 at head dim 64 or 128: those are
    compiled in CI.
    """
    configs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for head_dim in HEAD_DIMS:
            in_ci = dtype == "bf16" and head_dim >= 64
            constexprs = {"HEAD_DIM": head_dim, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
            for name, kernel in (("fwd", attention_fwd_kernel), ("dkdv", attention_bwd_dkdv_kernel),
                                 ("dq", attention_bwd_dq_kernel)):  # fmt: skip
                tiles = _tiles(torch.device("cuda"), name)
                blocks = {"BLOCK_M": tiles["BLOCK_M"], "BLOCK_N": tiles["BLOCK_N"]}
                configs.append(LaunchConfig(
                    kernel, f"{name} {dtype} D={head_dim} BLOCK_M={tiles['BLOCK_M']} BLOCK_N={tiles['BLOCK_N']}", dtype,
                    _argument_types(kernel, dtype),
                    constexprs | blocks, tiles["num_warps"], tiles["num_stages"], in_ci,
                ))  # fmt: skip
            block_m = _tiles(torch.device("cuda"), "dq")["BLOCK_M"]
            configs.append(LaunchConfig(
                attention_bwd_preprocess_kernel, f"delta {dtype} D={head_dim} BLOCK_M={block_m}", dtype,
                _argument_types(attention_bwd_preprocess_kernel, dtype),
                {"HEAD_DIM": head_dim, "BLOCK_M": block_m}, 4, 3, dtype == "bf16" and head_dim == 128,
            ))  # fmt: skip
    return configs


# Every run-time argument of the four kernels -> its Triton type, as the JIT sees it at a real launch
# ("{dtype}": the data dtype). ":16" = divisible by 16: pointers from torch are 16-byte aligned and
# every stride is a multiple of the head dim (≥ 16); T, H and GROUP carry no such promise.
ARGUMENT_TYPES = {
    **dict.fromkeys("Q K V OUT DO DQ DK DV".split(), "*{dtype}:16"),
    **dict.fromkeys("LSE DELTA".split(), "*fp32:16"),
    **dict.fromkeys("DOC_START DOC_END".split(), "*i32:16"),
    **dict.fromkeys("stride_qb stride_qt stride_qh stride_kb stride_kt stride_kh".split(), "i32:16"),
    **dict.fromkeys("stride_vb stride_vt stride_vh stride_ob stride_ot stride_oh".split(), "i32:16"),
    **dict.fromkeys("stride_dob stride_dot stride_doh".split(), "i32:16"),
    **dict.fromkeys("T H GROUP".split(), "i32"),
    **dict.fromkeys("qk_scale sm_scale".split(), "fp32"),
}


def _argument_types(kernel, dtype: str) -> dict[str, str]:
    """ARGUMENT_TYPES of the kernel's run-time arguments (its tl.constexpr ones are launch_configs')."""
    return {name: ARGUMENT_TYPES[name].format(dtype=dtype) for name in kernel.arg_names if name in ARGUMENT_TYPES}


def attention_cost(batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, dtype: str) -> list[Cost]:
    """Causal attention over one sequence per row, forward and backward.

    FLOPs: 2·D per (query, key) pair per matmul; T(T+1)/2 causal pairs per head; the forward does 2
    matmuls, dK/dV 4 (recomputing S), dQ 3 (recomputing S). Bytes: each tensor crosses DRAM once
    — the K/V (or Q/dO) blocks re-read by every query (or key) block of a head are ~2 MB per head
    at T = 4096 and are assumed to come from the 50 MB L2.
    """
    b = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    pairs = batch * heads * seq_len * (seq_len + 1) // 2
    q = batch * seq_len * heads * head_dim * b  # bytes of Q, and of O, dO, dQ
    kv = batch * seq_len * kv_heads * head_dim * b  # bytes of K, and of V, dK, dV
    row_stats = batch * heads * seq_len * 4  # the fp32 log-sum-exp or Δ
    shape = f"B={batch} T={seq_len} H={heads}/{kv_heads} D={head_dim}, causal, {dtype}"
    return [
        Cost("attention_fwd_kernel", shape, 2 * q + 2 * kv + row_stats, tensor_flops=2 * 2 * head_dim * pairs),
        Cost("attention_bwd_dkdv_kernel", shape, 2 * q + 4 * kv + 2 * row_stats, tensor_flops=4 * 2 * head_dim * pairs),
        Cost("attention_bwd_dq_kernel", shape, 3 * q + 2 * kv + 2 * row_stats, tensor_flops=3 * 2 * head_dim * pairs),
    ]


def reference_costs() -> list[Cost]:
    """Llama-3.2-1B's attention (32 query heads, 8 K/V heads of 128) over 8 rows of 4096 tokens."""
    return attention_cost(8, 4096, 32, 8, 128, "bf16")
