"""Triton flash attention against PyTorch, forward and backward: odd lengths, GQA, packed documents.

On the CPU the kernels run in the Triton interpreter with 16-wide tiles, so T = 37 spans three
query blocks and three key blocks; `gpu` tests repeat the comparison at real shapes on a GPU.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from triton_kernels.attention import attention, attention_reference
from triton_kernels.documents import document_spans

from helpers import ON_GPU

DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(
    not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no GPU, and TRITON_INTERPRET is off, so the kernels cannot run here",
)
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU with TRITON_INTERPRET unset")

# Outputs and gradients are rounded to the input dtype; the reference computes in fp32.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_qkv(B, T, H, Hkv, D, dtype, device=DEVICE):
    shapes = [(B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D)]
    return [torch.randn(shape, device=device).to(dtype).requires_grad_() for shape in shapes]


def document_ids(lengths, B=1, device=DEVICE):
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return ids[None].expand(B, -1).contiguous().to(device)


def forward_backward(fn, q, k, v, docs, upstream):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, docs)
    out.backward(upstream)
    return [out.detach()] + [t.grad.detach().clone() for t in (q, k, v)]


def sdpa(q, k, v, docs):
    """PyTorch's own attention (math backend on a CPU), on the same (B, T, H, D) layout."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = kt.shape[1] != qt.shape[1]
    if docs is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        T = q.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() & (docs[:, :, None] == docs[:, None, :])
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], enable_gqa=gqa)
    return out.transpose(1, 2)


def assert_close_per_dtype(ours, ref, dtype):
    tol = TOLERANCE[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.dtype == dtype, name
        scale = max(1.0, float(b.float().abs().max()))
        torch.testing.assert_close(a.float(), b.float(), atol=tol * scale, rtol=tol, msg=name)


CASES = [  # B, T, H, Hkv, D, document lengths (None: one causal sequence per row)
    (2, 37, 4, 4, 32, None),  # odd length, no GQA
    (1, 37, 4, 2, 16, [20, 1, 16]),  # GQA 2, a 1-token document in the middle
    (2, 40, 4, 1, 32, [3, 3, 34]),  # GQA 4 (one K/V head)
    (1, 33, 2, 2, 64, [1, 31, 1]),  # 1-token documents at both ends
    (1, 17, 2, 1, 128, None),  # the largest head dim
    (1, 37, 2, 1, 8, [20, 17]),  # head dims off the kernels' 16/32/64/128: zero-padded to the next
    (2, 19, 2, 2, 24, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, T, H, Hkv, D, lengths", CASES)
def test_attention_matches_reference_and_sdpa(dtype, B, T, H, Hkv, D, lengths):
    q, k, v = make_qkv(B, T, H, Hkv, D, dtype)
    docs = None if lengths is None else document_ids(lengths, B)
    upstream = torch.randn(B, T, H, D, device=DEVICE).to(dtype)
    ours = forward_backward(attention, q, k, v, docs, upstream)
    assert_close_per_dtype(ours, forward_backward(attention_reference, q, k, v, docs, upstream), dtype)
    if dtype == torch.float32:  # SDPA is an independent second reference
        assert_close_per_dtype(ours, forward_backward(sdpa, q, k, v, docs, upstream), dtype)


@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_packed_row_equals_each_document_alone(Hkv):
    lengths = [20, 1, 16]
    q, k, v = make_qkv(1, sum(lengths), 4, Hkv, 32, torch.float32)
    upstream = torch.randn_like(q)
    packed = forward_backward(attention, q, k, v, document_ids(lengths), upstream)
    alone = [[] for _ in range(4)]
    start = 0
    for n in lengths:
        piece = [t.detach()[:, start : start + n].clone().requires_grad_() for t in (q, k, v)]
        for i, result in enumerate(forward_backward(attention, *piece, None, upstream[:, start : start + n])):
            alone[i].append(result)
        start += n
    for name, a, pieces in zip(("out", "dq", "dk", "dv"), packed, alone, strict=True):
        torch.testing.assert_close(a, torch.cat(pieces, dim=1), atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the poisoned rows themselves reduce over NaN
def test_blocks_of_other_documents_are_never_read():
    """Documents on block edges; the first document's keys/values and the last one's
    queries/gradients are NaN. A kernel that loaded those blocks and masked them afterwards would
    still turn 0 · NaN into NaN; skipping them leaves the middle document exact."""
    unit = 128 if ON_GPU else 16  # the largest tile side: the GPU's tiles are 16 to 128 wide
    lengths = [2 * unit, unit, unit]
    q, k, v = make_qkv(1, 4 * unit, 2, 1, 16, torch.float32)
    upstream = torch.randn_like(q)
    with torch.no_grad():
        k[:, : 2 * unit], v[:, : 2 * unit] = float("nan"), float("nan")
        q[:, 3 * unit :] = float("nan")
    upstream[:, 3 * unit :] = float("nan")
    out, dq, dk, dv = forward_backward(attention, q, k, v, document_ids(lengths), upstream)
    middle = slice(2 * unit, 3 * unit)
    piece = [t.detach()[:, middle].clone().requires_grad_() for t in (q, k, v)]
    expected = forward_backward(attention_reference, *piece, None, upstream[:, middle])
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), expected, strict=True):
        torch.testing.assert_close(got[:, middle], want, atol=1e-5, rtol=1e-5, msg=name)


def test_views_of_a_fused_qkv_projection():
    """q, k, v as strided views of one (B, T, 3·H·D) tensor: forward and gradients still exact."""
    qkv = torch.randn(2, 37, 3 * 2 * 16, device=DEVICE, requires_grad=True)
    q, k, v = (t.view(2, 37, 2, 16) for t in qkv.split(32, dim=-1))
    upstream = torch.randn(2, 37, 2, 16, device=DEVICE)
    attention(q, k, v).backward(upstream)
    ours = qkv.grad.clone()
    qkv.grad = None
    attention_reference(q, k, v).backward(upstream)
    torch.testing.assert_close(ours, qkv.grad, atol=1e-5, rtol=1e-5)


def test_a_repeated_id_starts_a_new_document():
    """Documents are contiguous runs: ids 0,0,1,1,0,0 are three documents, in every backend."""
    q, k, v = make_qkv(1, 37, 2, 1, 16, torch.float32)
    ids = torch.tensor([0] * 10 + [1] * 10 + [0] * 17, device=DEVICE)[None]
    distinct = torch.tensor([0] * 10 + [1] * 10 + [2] * 17, device=DEVICE)[None]
    upstream = torch.randn_like(q)
    ours = forward_backward(attention, q, k, v, ids, upstream)
    for name, a, b in zip(
        ("out", "dq", "dk", "dv"), ours, forward_backward(sdpa, q, k, v, distinct, upstream), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(attention_reference(q, k, v, ids), ours[0], atol=1e-5, rtol=1e-5)
    from minisft.model import attention_torch  # the model's PyTorch backend reads ids the same way

    torch.testing.assert_close(attention_torch(q, k, v, document_spans(ids)), ours[0], atol=1e-5, rtol=1e-5)


def test_unsupported_inputs_are_clear_errors():
    q, k, v = make_qkv(1, 8, 4, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="4 query heads cannot share 3"):
        attention(q, k, v)
    q, k, v = make_qkv(1, 8, 2, 2, 256, torch.float32)
    with pytest.raises(ValueError, match="head dim 256 is over the Triton attention's 128"):
        attention(q, k, v)
    q, k, v = make_qkv(1, 8, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="must share a dtype"):
        attention(q, k.half(), v)


def test_kernels_auto_takes_pytorch_attention_for_a_head_too_wide(capsys):
    """On CUDA "auto" picks the Triton kernels; a 256-wide head then runs PyTorch's attention instead,
    said in one line, where attention = "triton" asked for outright is refused."""
    from minisft.config import load_config
    from minisft.errors import ConfigError
    from minisft.model import Backends, Transformer
    from minisft.recipe import fit_attention

    shape = ["--model.dim", "256", "--model.n_heads", "1", "--model.n_kv_heads", "1", "--model.n_layers", "1"]
    config = load_config(None, shape)
    model = Transformer(config.model, Backends("triton", "triton"))  # what "auto" picks on CUDA
    fit_attention(model, config)
    assert model.backends == Backends("torch", "triton")
    assert "head dim 256 is over the Triton attention's 128: attention=torch" in capsys.readouterr().out
    asked = load_config(None, [*shape, "--attention", "triton"])
    with pytest.raises(ConfigError, match="head dim 256 is over the Triton attention's 128"):
        fit_attention(Transformer(asked.model, Backends("triton", "triton")), asked)


def test_train_refuses_a_head_too_wide_for_the_triton_attention(tmp_path, capsys):
    """attention = "triton" on a model with 256-wide heads: one line naming the fix, before any step."""
    from test_resume import write_train_files

    from minisft.__main__ import main

    config = write_train_files(tmp_path, "n_heads = 1\nn_kv_heads = 1\n[train]\nsteps = 2\n")
    args = ["--model.dim", "256", "--attention", "triton"]
    assert main(["train", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert "head dim 256 is over the Triton attention's 128: use attention = 'torch'" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("packed", [False, True])
def test_model_with_triton_kernels_equals_torch_backend(packed):
    from minisft.model import Backends, ModelConfig, Transformer

    config = ModelConfig(vocab_size=61, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    input_ids = torch.randint(0, 61, (2, 37), device=DEVICE)
    labels = torch.randint(0, 61, (2, 37), device=DEVICE)
    position_ids = docs = None
    if packed:
        docs = document_ids([20, 1, 16], B=2)
        position_ids = torch.cat([torch.arange(n) for n in (20, 1, 16)])[None].expand(2, -1).to(DEVICE)
    grads = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        model = Transformer(config, Backends(kernels, kernels)).to(DEVICE)
        loss = model.loss(input_ids, labels, int(labels.numel()), position_ids, docs)
        loss.backward()
        grads[kernels] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["triton"][0], grads["torch"][0], atol=1e-5, rtol=1e-5)
    for name, g in grads["torch"][1].items():
        torch.testing.assert_close(grads["triton"][1][name], g, atol=1e-5, rtol=1e-4, msg=name)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, H, Hkv, D, lengths", [(1000, 8, 2, 64, None), (4096, 16, 4, 128, [1000, 7, 3089])])
def test_attention_matches_sdpa_on_gpu(dtype, T, H, Hkv, D, lengths):
    q, k, v = make_qkv(2, T, H, Hkv, D, dtype)
    docs = None if lengths is None else document_ids(lengths, 2)
    upstream = torch.randn_like(q)
    assert_close_per_dtype(
        forward_backward(attention, q, k, v, docs, upstream), forward_backward(sdpa, q, k, v, docs, upstream), dtype
    )
