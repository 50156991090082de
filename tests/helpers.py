"""Small helpers shared by several test files (pytest puts tests/ on sys.path)."""

import math
import os

import pytest
import torch

# Where a CUDA GPU is and TRITON_INTERPRET is off, the Triton kernels run compiled, on CUDA tensors only.
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
# Tests that run the kernels on CPU-built models and tensors, in the interpreter (CI). On a GPU their
# kernels are checked compiled by test_attention.py and test_cross_entropy.py instead.
interpreter_only = pytest.mark.skipif(ON_GPU, reason="runs the Triton kernels on CPU tensors (the interpreter's way)")


def sharpen_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of scale 1/sqrt(fan_in), norm gains != 1, non-zero biases: logits of order 1 and
    sharp attention, so a wrong cache position, a leaked pad or a mismatched weight changes the
    argmax. In place; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 2 / math.sqrt(p.shape[1]))
    return model.eval()


def greedy_without_cache(model, prompt: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """The obvious reference: rerun the whole sequence, take the argmax of the last position."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model.logits(model(torch.tensor([seq])))[0, -1].argmax())
            if token in stop_ids:
                break
            out.append(token)
            seq.append(token)
    return out


def assert_packed_equals_alone(model, examples, batch, leak_tolerance: float = 1e-4) -> None:
    """A packed batch's loss and gradients equal those of its examples run one by one (no padding,
    no neighbours) — and without the packing ids they would not, so the check can fail."""
    n = sum(e.num_trained_tokens for e in examples)
    model.zero_grad()
    alone = sum(model.loss(torch.tensor([e.input_ids]), torch.tensor([e.labels]), n) for e in examples)
    alone.backward()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # LoRA: adapters only
    expected = {name: p.grad.clone() for name, p in trained}
    model.zero_grad()
    packed = model.loss(batch.input_ids, batch.labels, n, batch.position_ids, batch.document_ids)
    packed.backward()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    for name, p in trained:
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)
    leaky = model.loss(batch.input_ids, batch.labels, n)  # packing without its boundaries: the bug
    assert not torch.allclose(leaky, alone, atol=leak_tolerance, rtol=leak_tolerance)
