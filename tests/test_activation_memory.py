"""What training keeps for the backward: RMSNorm and SwiGLU with hand-written backwards
(minisft/functions.py) against the plain formulas left to autograd, values and gradients over
dtypes and odd sizes; and activation checkpointing, which must change the memory, not the maths."""

from dataclasses import replace

import pytest
import torch

from minisft.chat import Example
from minisft.functions import rms_norm, rms_norm_reference, swiglu, swiglu_reference
from minisft.model import ModelConfig, Transformer

TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def grads_of(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 33), (1, 5, 576)])
def test_rms_norm_matches_the_formula_forward_and_backward(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    grad_out = torch.randn(shape, generator=gen)
    ours, our_grads = grads_of(lambda x, w: rms_norm(x, w, 1e-5), [x, weight], grad_out)
    ref, ref_grads = grads_of(lambda x, w: rms_norm_reference(x, w, 1e-5), [x, weight], grad_out)
    assert ours.dtype == ref.dtype == dtype
    torch.testing.assert_close(ours, ref, **TOLERANCES[dtype])
    for a, b in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])


def test_rms_norm_under_autocast_leaves_in_bf16_with_the_values_the_matmul_would_cast_to():
    x, weight = torch.randn(4, 9, 64), torch.rand(64) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rms_norm(x, weight, 1e-6)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, rms_norm_reference(x, weight, 1e-6).to(torch.bfloat16))  # bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_the_formula_forward_and_backward(dtype):
    gen = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(2, 11, 37, generator=gen) * 4).to(dtype), torch.randn(2, 11, 37, generator=gen).to(dtype)
    grad_out = torch.randn(2, 11, 37, generator=gen)
    ours, our_grads = grads_of(swiglu, [gate, up], grad_out)
    ref, ref_grads = grads_of(swiglu_reference, [gate, up], grad_out)
    torch.testing.assert_close(ours, ref, **TOLERANCES[dtype])
    for a, b in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])


def saved_bytes(model, ids) -> int:
    """Bytes of the activations a forward keeps for the backward (weights and their casts excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params and t.dim() > 1 and t.shape[0] != model.config.vocab_size:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(ids, ids, ids.numel())
    return sum(seen.values())


def test_a_block_keeps_about_two_thirds_of_what_autograd_alone_would(monkeypatch):
    import minisft.model

    config = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=64)
    model = Transformer(config)
    ids = torch.randint(0, 256, (2, 64))
    lean = saved_bytes(model, ids)
    monkeypatch.setattr(minisft.model, "rms_norm", rms_norm_reference)
    monkeypatch.setattr(minisft.model, "swiglu", swiglu_reference)
    plain = saved_bytes(model, ids)
    assert lean < 0.72 * plain, (lean, plain)


def test_activation_checkpointing_keeps_a_fraction_and_computes_the_same(tmp_path):
    from minisft.train import TrainConfig, train_loop

    config = ModelConfig(vocab_size=256, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=64)
    ids = torch.randint(0, 256, (2, 64))
    torch.manual_seed(0)
    model = Transformer(config)
    grads = {}
    for recompute in (False, True):
        model.checkpoint_blocks = recompute
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(ids, ids, ids.numel())
        loss.backward()
        grads[recompute] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    assert torch.equal(grads[True][0], grads[False][0])
    for a, b in zip(grads[True][1], grads[False][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    kept = saved_bytes(model, ids)
    model.checkpoint_blocks = False
    assert kept < 0.25 * saved_bytes(model, ids)

    examples = [Example(row.tolist(), row.tolist()) for row in torch.randint(0, 256, (8, 32))]
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, eval_every=0, save_every=0)
    train_loop(model, examples, {}, replace(cfg, activation_checkpointing=True), 0, tmp_path)
    assert model.checkpoint_blocks  # the loop sets it from train.activation_checkpointing
