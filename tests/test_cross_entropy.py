"""Triton cross-entropy and fused linear + cross-entropy against PyTorch, forward and backward.

On the CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so the
shapes stay small; the `gpu` tests repeat the comparison at real shapes where a GPU is present
(`scripts/gpu_suite.sh` runs them with the interpreter off).
"""

import os

import pytest
import torch
import torch.nn.functional as F

import triton_kernels.cross_entropy as cross_entropy_module
from triton_kernels.cross_entropy import (
    BLOCK_MAX,
    _chunk_rows,
    cross_entropy,
    cross_entropy_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    linear_log_probs,
    linear_log_probs_reference,
)

from helpers import ON_GPU

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU with TRITON_INTERPRET unset")
DEVICE = "cuda" if ON_GPU else "cpu"  # the small-shape tests run compiled kernels too where a GPU is
pytestmark = pytest.mark.skipif(
    not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no GPU, and TRITON_INTERPRET is off, so the kernels cannot run here",
)

# Gradients are stored in the logits' dtype: compare against the fp32 reference rounded the same way.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(rows, vocab, dtype, device=DEVICE, ignored=(), scale=3.0, offset=0.0):
    logits = (torch.randn(rows, vocab, device=device) * scale + offset).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[list(ignored)] = -100
    return logits, labels


def run_both(logits, labels, reduction, upstream=None):
    """-> (ours: loss, grad), (torch fp32: loss, grad) for the same logits and upstream gradient."""
    ours_in = logits.detach().clone().requires_grad_()
    ref_in = logits.detach().float().clone().requires_grad_()
    ours = cross_entropy(ours_in, labels, reduction, keep_logits=True)
    ref = F.cross_entropy(ref_in, labels, reduction=reduction)
    if upstream is None:
        upstream = torch.randn_like(ref) if reduction == "none" else torch.tensor(1.0, device=ref.device)
    upstream = upstream.to(ref.device)
    ours.backward(upstream)
    ref.backward(upstream)
    return (ours, ours_in.grad), (ref, ref_in.grad)


def assert_matches(ours, ref, dtype):
    (loss, grad), (ref_loss, ref_grad) = ours, ref
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)  # the loss is exact fp32 maths
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows, vocab", [(1, 17), (6, 1000), (3, 5000)])  # 5000 > one 4096-wide block
def test_cross_entropy_matches_torch(dtype, reduction, rows, vocab):
    logits, labels = make_inputs(rows, vocab, dtype, ignored=[0] if rows > 1 else [])
    ours, ref = run_both(logits, labels, reduction)
    assert_matches(ours, ref, dtype)
    torch.testing.assert_close(ours[0], cross_entropy_reference(logits, labels, reduction), atol=1e-5, rtol=1e-5)


def test_upstream_gradient_scales_the_stored_gradient():
    logits, labels = make_inputs(4, 300, torch.float32, ignored=[1])
    assert_matches(*run_both(logits, labels, "mean", upstream=torch.tensor(0.37)), torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_loss_and_zero_gradient(reduction):
    logits, labels = make_inputs(5, 300, torch.float32, ignored=range(5))
    ours, ref = run_both(logits, labels, "sum" if reduction == "mean" else reduction)
    loss = cross_entropy(logits.clone().requires_grad_(), labels, reduction).detach()
    assert torch.isfinite(loss).all() and float(loss.sum()) == 0.0  # torch's own "mean" gives NaN here
    assert float(ours[1].abs().sum()) == 0.0
    assert_matches(ours, ref, torch.float32)


@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_extreme_logits_stay_finite(offset):
    logits, labels = make_inputs(4, 700, torch.float32, offset=offset)
    logits[0, labels[0]] += 500.0  # one row dominated by its label
    logits[1, (labels[1] + 1) % 700] += 500.0  # one row where the label has ~0 probability
    (loss, grad), (ref_loss, ref_grad) = run_both(logits, labels, "sum")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss)
    # fp32 numbers near 1e4 are 1e-3 apart, so z - lse (and both gradients) carry errors of that size.
    torch.testing.assert_close(grad, ref_grad, atol=2e-3, rtol=2e-3)


# Rows with -inf logits (a masked vocabulary), over three 4096-wide blocks: V = 2 · BLOCK_MAX + 100.
# The online log-sum-exp must not compute -inf - (-inf) while every logit so far is -inf.
MASKED_VOCAB = 2 * BLOCK_MAX + 100


def masked_logits(dtype, masked):
    """4 rows; the last two are ordinary. "leading blocks": rows 0 and 1 have their two leading
    blocks at -inf, labels in the finite tail. "all but the label": every logit of rows 0 and 1 is
    -inf except the label's, in the last block (row 0) or the first (row 1)."""
    logits, labels = make_inputs(4, MASKED_VOCAB, dtype)
    labels[0] = MASKED_VOCAB - 7
    if masked == "leading blocks":
        labels[1] = 2 * BLOCK_MAX
        logits[:2, : 2 * BLOCK_MAX] = float("-inf")
    else:
        labels[1] = 5
        keep = logits[[0, 1], labels[:2]]
        logits[:2] = float("-inf")
        logits[[0, 1], labels[:2]] = keep
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", ["leading blocks", "all but the label"])
def test_minus_inf_logits_match_torch(dtype, masked):
    logits, labels = masked_logits(dtype, masked)
    ours, ref = run_both(logits, labels, "none")  # a random upstream gradient per row
    assert torch.isfinite(ours[0]).all() and torch.isfinite(ours[1]).all()
    assert_matches(ours, ref, dtype)
    if masked == "all but the label":  # the label has probability 1: loss and gradient exactly 0
        assert ours[0][:2].tolist() == [0.0, 0.0] and float(ours[1][:2].abs().max()) == 0.0


def test_default_overwrites_logits_with_their_gradient():
    logits, labels = make_inputs(3, 260, torch.float32)
    expected = F.softmax(logits, dim=1) - F.one_hot(labels, 260).float()
    buffer = logits.clone().requires_grad_()
    cross_entropy(buffer, labels, "sum").backward()
    torch.testing.assert_close(buffer.detach(), expected)  # the memory saving: no second N x V buffer
    torch.testing.assert_close(buffer.grad, expected)


def test_interpreter_off_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, labels = make_inputs(2, 10, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="need a CUDA tensor.*kernels='torch'"):
        cross_entropy(logits, labels)


def linear_both(hidden, weight, labels, reduction):
    ours_h, ours_w = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    ref_h, ref_w = (t.detach().float().clone().requires_grad_() for t in (hidden, weight))
    ours = linear_cross_entropy(ours_h, ours_w, labels, reduction)
    ref = F.cross_entropy(ref_h @ ref_w.T, labels, reduction=reduction)
    ours.backward()
    ref.backward()
    return (ours, ours_h.grad, ours_w.grad), (ref, ref_h.grad, ref_w.grad)


@pytest.fixture
def two_row_chunks(monkeypatch):
    """Chunks of ~2 rows at these small vocabularies, so the multi-chunk path runs."""
    monkeypatch.setattr(cross_entropy_module, "CHUNK_BYTES", 2 * 300 * 4)


@pytest.mark.usefixtures("two_row_chunks")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rows, dim, vocab", [(37, 16, 300), (1, 8, 50), (20, 32, 33)])
def test_linear_cross_entropy_matches_torch(reduction, rows, dim, vocab):
    hidden, weight = torch.randn(rows, dim, device=DEVICE), torch.randn(vocab, dim, device=DEVICE) / dim**0.5
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    labels[: rows // 4] = -100
    (loss, grad_h, grad_w), (ref, ref_h, ref_w) = linear_both(hidden, weight, labels, reduction)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_h, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_w, ref_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden, weight, labels, reduction))


# Per-row losses of the fused linear layer take a per-row upstream gradient (DPO's ∂L/∂logp):
# compared with F.cross_entropy on full fp32 logits, over dtypes, odd V, ignored rows, several chunks.
LINEAR_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.usefixtures("two_row_chunks")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, dim, vocab", [(9, 16, 301), (1, 8, 7), (20, 32, 33)])
def test_linear_cross_entropy_per_row_losses_take_a_per_row_upstream_gradient(dtype, rows, dim, vocab):
    hidden = torch.randn(rows, dim, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, dim, device=DEVICE) / dim**0.5).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    labels[1::3] = -100
    upstream = torch.randn(rows, device=DEVICE)
    ours_h, ours_w = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    ref_h, ref_w = (t.detach().float().clone().requires_grad_() for t in (hidden, weight))
    ours = linear_cross_entropy(ours_h, ours_w, labels, "none")
    ref = F.cross_entropy(ref_h @ ref_w.T, labels, reduction="none")
    ours.backward(upstream)
    ref.backward(upstream)
    tol = LINEAR_TOLERANCE[dtype]
    assert ours.dtype == torch.float32 and ours_h.grad.dtype == dtype and ours_w.grad.dtype == dtype
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    assert (ours[labels == -100] == 0).all()
    torch.testing.assert_close(ours_h.grad.float(), ref_h.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(ours_w.grad.float(), ref_w.grad, atol=tol, rtol=tol)


@pytest.mark.usefixtures("two_row_chunks")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_log_probs_sum_each_sequence_like_full_logits(dtype):
    batch, length, dim, vocab = 3, 5, 16, 301
    hidden = torch.randn(batch, length, dim, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, dim, device=DEVICE) / dim**0.5).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), device=DEVICE)
    labels[:, :2] = -100  # the prompt
    labels[2] = -100  # a sequence with nothing trained: log-prob 0, zero gradient
    upstream = torch.tensor([0.7, -1.3, 2.0], device=DEVICE)
    ours_h, ours_w = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    ref_h, ref_w = (t.detach().float().clone().requires_grad_() for t in (hidden, weight))
    ours, ref = linear_log_probs(ours_h, ours_w, labels), linear_log_probs_reference(ref_h, ref_w, labels)
    ours.backward(upstream)
    ref.backward(upstream)
    tol = LINEAR_TOLERANCE[dtype]
    assert ours.shape == (batch,) and ours[2] == 0 and (ours_h.grad[2] == 0).all()
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(ours_h.grad.float(), ref_h.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(ours_w.grad.float(), ref_w.grad, atol=tol, rtol=tol)
    # The reference itself against a by-hand sum of log_softmax picks (fp32).
    logp = torch.log_softmax(hidden.float() @ weight.float().T, -1)
    by_hand = [
        sum(logp[b, t, labels[b, t]].item() for t in range(length) if labels[b, t] != -100) for b in range(batch)
    ]
    torch.testing.assert_close(
        linear_log_probs_reference(hidden.float(), weight.float(), labels), torch.tensor(by_hand, device=DEVICE)
    )


@pytest.mark.usefixtures("two_row_chunks")
def test_linear_cross_entropy_with_logits_that_overflow_to_minus_inf():
    """A finite linear layer gives a -inf logit when h·w overflows (|h·w| > 3.4e38, fp32 and bf16
    alike); an -inf inside hidden or weight would instead make NaN of ∂W = ∂logitsᵀ·h in torch too.
    Column 0 of the weight is -10 on the two leading blocks and hidden[0, 0] = 1e38: row 0's
    leading blocks are -inf. Column 1 is -10 everywhere but row 1's label: row 1 is -inf but for
    its label. Rows 2 and 3 (ignored) have zeros in both columns and stay finite."""
    dim = 8
    hidden, weight = torch.randn(4, dim, device=DEVICE), torch.randn(MASKED_VOCAB, dim, device=DEVICE) / dim**0.5
    labels = torch.tensor([MASKED_VOCAB - 7, 2 * BLOCK_MAX + 3, 11, -100], device=DEVICE)
    hidden[:, :2], weight[:, :2] = 0.0, 0.0
    weight[: 2 * BLOCK_MAX, 0] = -10.0
    weight[:, 1] = -10.0
    weight[labels[1], 1] = 0.0
    hidden[0, 0], hidden[1, 1] = 1e38, 1e38
    logits = hidden @ weight.T
    assert logits[0, : 2 * BLOCK_MAX].isneginf().all() and logits[0, 2 * BLOCK_MAX :].isfinite().all()
    assert int(logits[1].isfinite().sum()) == 1 and logits[2:].isfinite().all()
    (loss, grad_h, grad_w), (ref, ref_h, ref_w) = linear_both(hidden, weight, labels, "mean")
    assert torch.isfinite(loss) and torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_h, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_w, ref_w, atol=1e-5, rtol=1e-5)


def test_chunk_rows_follow_the_memory_budget():
    assert _chunk_rows(16384, 128256, 2) == 1046  # 256 MiB of bf16 logits at V = 128k: ~1000 rows
    assert _chunk_rows(5, 10, 4) == 5  # never more rows than there are


def test_out_of_range_label_gives_nan_not_a_neighbours_logit():
    logits, labels = make_inputs(3, 50, torch.float32)
    labels[1] = 50
    losses = cross_entropy(logits, labels, "none", keep_logits=True)
    assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()


def test_in_place_gradient_cannot_corrupt_an_earlier_ops_backward():
    x, labels = make_inputs(4, 30, torch.float32)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        cross_entropy(torch.tanh(x), labels).backward()  # tanh saved its output: the logits
    cross_entropy(torch.tanh(x), labels, keep_logits=True).backward()
    ours = x.grad.clone()
    x.grad = None
    F.cross_entropy(torch.tanh(x), labels).backward()
    torch.testing.assert_close(ours, x.grad)


def test_linear_cross_entropy_under_bf16_autocast_matches_torch_autocast():
    hidden = torch.randn(21, 32, device=DEVICE)
    weight = torch.randn(70, 32, device=DEVICE) / 32**0.5
    labels = torch.randint(0, 70, (21,), device=DEVICE)
    results = []
    for fn in (
        lambda h, w: linear_cross_entropy(h, w, labels),
        lambda h, w: F.cross_entropy((h @ w.T).float(), labels),
    ):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = fn(h, w)
        loss.backward()
        results.append((loss, h.grad, w.grad))
    (loss, grad_h, grad_w), (ref, ref_h, ref_w) = results
    assert grad_h.dtype == torch.float32 and grad_w.dtype == torch.float32  # the parameters' dtype
    torch.testing.assert_close(loss, ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(grad_h, ref_h, atol=5e-3, rtol=2e-2)
    torch.testing.assert_close(grad_w, ref_w, atol=5e-3, rtol=2e-2)


@pytest.mark.usefixtures("two_row_chunks")
def test_linear_cross_entropy_all_ignored_and_bf16():
    hidden, weight = torch.randn(9, 16, device=DEVICE), torch.randn(40, 16, device=DEVICE)
    labels = torch.full((9,), -100, device=DEVICE)
    (loss, grad_h, grad_w), _ = linear_both(hidden, weight, labels, "mean")
    assert float(loss.detach()) == 0.0 and float(grad_h.abs().sum()) == 0.0 and float(grad_w.abs().sum()) == 0.0
    labels = torch.randint(0, 40, (9,), device=DEVICE)
    (loss, grad_h, grad_w), (ref, ref_h, ref_w) = linear_both(hidden.bfloat16(), weight.bfloat16(), labels, "sum")
    assert grad_h.dtype == torch.bfloat16 and grad_w.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, atol=0.05, rtol=2e-2)  # bf16 logits from a bf16 matmul
    torch.testing.assert_close(grad_h.float(), ref_h, atol=0.05, rtol=2e-2)
    torch.testing.assert_close(grad_w.float(), ref_w, atol=0.05, rtol=2e-2)


@pytest.mark.usefixtures("one_thread")
def test_training_step_with_triton_backend_equals_torch_backend():
    from minisft.distributed import Replica
    from minisft.model import Backends, ModelConfig, Transformer
    from minisft.packing import Batch
    from minisft.train import optimizer_step

    config = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    models = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        models[kernels] = Transformer(config, Backends(kernels, kernels)).to(DEVICE)
    input_ids = torch.randint(0, 97, (3, 11), device=DEVICE)
    labels = torch.randint(0, 97, (3, 11), device=DEVICE)
    labels[0, :5] = -100
    labels[2] = -100
    num_trained = int((labels != -100).sum())
    losses, norms = {}, {}
    for kernels, model in models.items():
        # SGD, not AdamW: Adam's g / sqrt(v) turns a 1e-9 difference in a ~0 gradient into a full step.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        batches = [Batch(input_ids[:2], labels[:2]), Batch(input_ids[2:], labels[2:])]  # accumulation, as in training
        losses[kernels], norms[kernels], _ = optimizer_step(
            Replica(model), optimizer, batches, num_trained, grad_clip=1.0, precision="fp32"
        )  # fp32 on a GPU too, where "auto" is bf16 autocast
    torch.testing.assert_close(losses["triton"], losses["torch"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(norms["triton"], norms["torch"], atol=1e-6, rtol=1e-6)
    for (name, p_torch), p_triton in zip(
        models["torch"].named_parameters(), models["triton"].parameters(), strict=True
    ):
        assert torch.allclose(p_triton, p_torch, atol=1e-6, rtol=1e-5), name


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, vocab", [(4096, 32000), (1024, 128256), (333, 151669)])
def test_cross_entropy_matches_torch_on_gpu(dtype, rows, vocab):
    logits, labels = make_inputs(rows, vocab, dtype, device="cuda", ignored=range(0, rows, 7))
    for reduction in ("mean", "sum"):
        assert_matches(*run_both(logits, labels, reduction), dtype)


@gpu
def test_linear_cross_entropy_matches_torch_on_gpu():
    hidden = torch.randn(2048, 1024, device="cuda")
    weight = torch.randn(50257, 1024, device="cuda") / 32
    labels = torch.randint(0, 50257, (2048,), device="cuda")
    labels[::5] = -100
    (loss, grad_h, grad_w), (ref, ref_h, ref_w) = linear_both(hidden, weight, labels, "mean")
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)  # TF32 may round the matmuls
    torch.testing.assert_close(grad_h, ref_h, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(grad_w, ref_w, atol=1e-5, rtol=1e-3)


def test_every_launch_is_a_declared_launch_config(monkeypatch):
    """`scripts/kernel_report.py` compiles `launch_configs()`: it must hold whatever `_launch` launches."""
    import triton_kernels.cross_entropy as ce

    dtypes = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    declared = {
        (c.dtype, c.constexprs["BLOCK"], c.num_warps, c.num_stages, c.args["n_cols"]) for c in ce.launch_configs()
    }
    launched = []

    class RecordLaunch:  # stands in for the kernel: records what the JIT would specialise on
        def __getitem__(self, grid):
            def launch(logits, *args, BLOCK, num_warps, num_stages=3):
                n_cols = args[6]
                v16 = ":16" if n_cols % 16 == 0 else ""
                launched.append((dtypes[logits.dtype], BLOCK, num_warps, num_stages, f"i32{v16}"))

            return launch

    monkeypatch.setattr(ce, "cross_entropy_kernel", RecordLaunch())
    for dtype in dtypes:
        for vocab in (1, 7, 16, 100, 4096, 5000, 151936):
            logits, labels = make_inputs(2, vocab, dtype)
            ce.cross_entropy(logits, labels)
        linear_cross_entropy(
            torch.randn(5, 8, dtype=dtype, device=DEVICE),
            torch.randn(48, 8, dtype=dtype, device=DEVICE),
            torch.randint(0, 48, (5,), device=DEVICE),
        )
    assert launched and set(launched) <= declared, set(launched) - declared
