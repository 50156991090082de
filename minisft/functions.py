"""RMSNorm and SwiGLU with their backward written out, so that training keeps less for it.

Activations kept for the backward are most of SFT's memory after the weights and AdamW state.
Left to autograd, the model's two elementwise blocks keep more than their maths needs:

    RMSNorm   y = x · rstd · g, rstd = 1/sqrt(mean(x²) + eps)   (Zhang & Sennrich 2019)
              autograd keeps x·rstd in fp32 beside x; and under autocast each projection reading y
              casts it to bf16 and keeps its own copy (q, k and v: three). Here: x and rstd (one
              number per row) are kept, x·rstd is recomputed, and y leaves in the autocast dtype,
              cast once for all its readers.
    SwiGLU    h = silu(a) · b                                    (Shazeer 2020, eq. 6)
              autograd keeps a, b and silu(a). Here: a and b; silu(a) is recomputed.

For SmolLM2-135M under bf16 autocast that is 24.5 instead of 35.7 KB per token and layer. The
values are the plain formulas' (`rms_norm_reference`, `swiglu_reference`; tests compare both
directions); the one numerical difference is that the gradients flowing back into y from its
readers now add up in bf16 under autocast, as every bf16 tensor's do.

    rstd backward: with n = x·rstd and gn = ∂L/∂n,  ∂L/∂x = rstd · (gn − n · mean(gn · n))
    silu backward: silu'(a) = σ(a) · (1 + a · (1 − σ(a)))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def output_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls reading a norm's output compute in: autocast's, if it is on."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return (weight * (x32 * rstd).to(x.dtype)).to(out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad = grad.float()
        grad_weight = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
        gn = grad * weight.float()
        grad_x = rstd * (gn - normed * (gn * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = x · rsqrt(mean(x²) + eps) · g over the last dim, in fp32; out in the autocast dtype if on."""
    out_dtype = output_dtype(x)
    with torch.autocast(x.device.type, enabled=False):  # the maths in fp32, whatever autocast says
        return RMSNormFunction.apply(x, weight, eps, out_dtype)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The same maths left to autograd (fp32 out for an fp32 x, whatever autocast says)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        a, b, grad32 = gate.float(), up.float(), grad.float()
        sigmoid = torch.sigmoid(a)
        grad_up = grad32 * a * sigmoid
        grad_gate = grad32 * b * sigmoid * (1 + a * (1 - sigmoid))
        return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) · up, keeping gate and up only for the backward."""
    return SwiGLUFunction.apply(gate, up)


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up
