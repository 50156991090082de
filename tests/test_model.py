"""The Transformer against a forward pass written out by hand, plus its config's arithmetic.

The reference below shares no code with minisft.model: it reads the weights from the state
dict, works in float64, rotates each pair (i, i + D/2) with an explicit 2x2 rotation, builds the
causal mask as a -inf upper triangle and repeats K/V heads for grouped-query attention.
"""

import math
from dataclasses import replace

import pytest
import torch

from minisft.model import Backends, ModelConfig, Transformer, rotary_frequencies

from helpers import interpreter_only

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=64,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=48,
        max_seq_len=32,
        rope_theta=100.0,
        norm_eps=1e-5,
        tie_embeddings=True,
    )
    return ModelConfig(**{**base, **overrides})


def randomize(model: Transformer) -> Transformer:
    """Weights of scale 1/sqrt(fan_in) and RMSNorm gains != 1: logits of order 1, sharp attention,
    every gain visible. (The default 0.02 init makes attention nearly uniform and hides bugs.)"""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    return model


def reference_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Hand-written Llama forward in float64, from the state dict alone."""
    cfg = model.config
    w = {name: t.detach().double() for name, t in model.state_dict().items()}
    B, T = ids.shape
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads

    def rmsnorm(x, gain):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * gain

    def rotate(x):  # x (B, T, heads, D): pair (i, i + D/2) turns by pos * theta^(-2i/D)
        out = torch.empty_like(x)
        pos = torch.arange(T, dtype=torch.float64)
        for i in range(D // 2):
            angle = pos * cfg.rope_theta ** (-2 * i / D)
            c, s = torch.cos(angle)[None, :, None], torch.sin(angle)[None, :, None]
            a, b = x[..., i], x[..., i + D // 2]
            out[..., i] = a * c - b * s
            out[..., i + D // 2] = a * s + b * c
        return out

    def silu(z):
        return z / (1 + torch.exp(-z))

    mask = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), diagonal=1)
    x = w["embed_tokens.weight"][ids]
    for layer in range(cfg.n_layers):
        p = f"layers.{layer}."
        h = rmsnorm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, H, D)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, D)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, D)
        q, k = rotate(q), rotate(k)
        k = k.repeat_interleave(H // Hkv, dim=2)  # query head j reads K/V head j // (H / Hkv)
        v = v.repeat_interleave(H // Hkv, dim=2)
        heads = []
        for j in range(H):
            scores = q[:, :, j] @ k[:, :, j].transpose(1, 2) / math.sqrt(D) + mask  # (B, T, T)
            heads.append(torch.softmax(scores, dim=-1) @ v[:, :, j])
        attn = torch.cat(heads, dim=-1)  # (B, T, H*D), head-major like the o_proj input
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rmsnorm(x, w["norm.weight"])
    head = w["embed_tokens.weight"] if cfg.tie_embeddings else w["lm_head.weight"]
    return x @ head.T


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_forward_matches_hand_written_reference(n_kv_heads, tie):
    model = randomize(Transformer(tiny_config(n_kv_heads=n_kv_heads, tie_embeddings=tie)))
    if not tie:  # the untied head must really be a different matrix from the embedding
        assert not torch.equal(model.lm_head.weight, model.embed_tokens.weight)
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        got = model.logits(model(ids))
    expected = reference_logits(model, ids)
    assert got.shape == (2, 13, 64)
    assert expected.abs().max() > 1.0  # logits of order 1: the comparison is not trivially small
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_detects_a_wrong_rotary_layout():
    """The reference is sharp enough to tell the halves layout from the interleaved one."""
    model = randomize(Transformer(tiny_config()))
    ids = torch.randint(0, 64, (1, 10))
    expected = reference_logits(model, ids)
    # Permute q/k output rows so halves-pairs become interleaved pairs: different maths.
    D = model.config.head_dim
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    with torch.no_grad():
        for layer in model.layers:
            for proj, heads in ((layer.self_attn.q_proj, 4), (layer.self_attn.k_proj, 2)):
                w = proj.weight.view(heads, D, -1)
                proj.weight.copy_(w[:, perm].reshape(heads * D, -1))
        got = model.logits(model(ids)).double()
    assert (got - expected).abs().max() > 1e-3


def test_causality_later_tokens_do_not_change_earlier_states():
    model = randomize(Transformer(tiny_config()))
    ids = torch.randint(0, 64, (1, 16))
    t = 9
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 7) % 64
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    # ...while position t and everything after it does see the change.
    assert (a[0, t:] - b[0, t:]).abs().amax(-1).min() > 1e-3


def test_sequence_longer_than_max_seq_len_is_refused():
    model = Transformer(tiny_config(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_unknown_kernels_backend_is_refused():
    with pytest.raises(ValueError, match="unknown kernels backend 'nope'"):
        Transformer(tiny_config(), Backends(attention="nope"))


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"model\.dim=30 must be divisible by model\.n_heads=4"):
        ModelConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match=r"model\.n_heads=4 must be divisible by model\.n_kv_heads=3"):
        ModelConfig(dim=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="model.head_dim 3 must be even"):
        ModelConfig(dim=12, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize("field", ["n_heads", "n_kv_heads"])
def test_config_zero_heads_is_a_value_error(field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: 0})


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_num_params_counts_the_real_parameters(tie):
    cfg = tiny_config(tie_embeddings=tie, n_kv_heads=1)
    model = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    # and by hand: V=64, d=32, L=2, kv_dim=8, ffn=48
    per_layer = 32 * 32 * 2 + 32 * 8 * 2 + 3 * 32 * 48 + 2 * 32
    assert cfg.num_params() == 64 * 32 * (1 if tie else 2) + 2 * per_layer + 32


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_flops_per_token_hand_count(tie):
    V, d, L, H, Hkv, f, T = 64, 32, 2, 4, 2, 48, 24
    cfg = tiny_config(tie_embeddings=tie)
    kv = Hkv * (d // H)
    matmul = L * (d * d + 2 * d * kv + d * d + 3 * d * f) + V * d  # q, k, v, o, gate/up/down, head
    # minisft's N is "all parameters but the input embedding" (PaLM's non-embedding N), which also
    # counts the RMSNorm gains (2 per layer + the final one), though no matmul touches them.
    norms = L * 2 * d + d
    attention = 6 * L * d * T  # 12·L·d·T for full attention, halved by the causal mask
    assert cfg.flops_per_token(T) == 6 * (matmul + norms) + attention
    # The output head costs the same FLOPs whether or not it shares the embedding's storage.
    assert cfg.flops_per_token(T) == tiny_config(tie_embeddings=not tie).flops_per_token(T)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_packed_row_equals_each_document_alone(n_kv_heads):
    """Three documents in one row, positions reset and attention kept per document, give the
    hidden states and the parameter gradients of the three documents run one by one."""
    model = randomize(Transformer(tiny_config(n_kv_heads=n_kv_heads)))
    lengths = [5, 1, 7]
    docs = [torch.randint(0, 64, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]

    hidden = model(packed, position_ids, document_ids)
    hidden.square().sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    alone = torch.cat([model(doc) for doc in docs], dim=1)
    alone.square().sum().backward()

    torch.testing.assert_close(hidden, alone, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        scale = float(p.grad.abs().max())  # the sum-of-squares loss makes gradients up to ~50
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5 * scale, rtol=1e-5, msg=name)
    # Without the document mask the second and third documents see the first: the guard matters.
    assert not torch.allclose(model(packed, position_ids), alone, atol=1e-3)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_num_params_counts_attention_biases(tie):
    cfg = tiny_config(attention_bias=True, tie_embeddings=tie)
    model = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert cfg.num_params() - tiny_config(tie_embeddings=tie).num_params() == 2 * (32 + 2 * 16)  # q, k, v biases
    assert all(not layer.self_attn.k_proj.bias.any() for layer in model.layers)  # biases start at zero


def test_num_params_and_flops_count_qk_norms_and_a_wider_head():
    """Qwen3's layout: head_dim 16 != dim / n_heads = 8, and a gain vector per q and k norm."""
    cfg = tiny_config(qk_norm=True, head_dim=16)
    model = Transformer(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    attention = 2 * 32 * (4 * 16) + 2 * 32 * (2 * 16) + 2 * 16  # q and o, k and v, two norm gains
    default_attention = 2 * 32 * (4 * 8) + 2 * 32 * (2 * 8)
    assert cfg.num_params() - tiny_config().num_params() == 2 * (attention - default_attention)  # 2 layers
    assert cfg.flops_per_token(10) == 6 * cfg.num_params() + 12 * 2 * (4 * 16) * 10 // 2  # tied: no embedding
    assert tiny_config(head_dim=0) == tiny_config(head_dim=8)  # 0 means dim // n_heads


def test_llama3_rope_frequencies_follow_metas_reference():
    """Llama 3.1's `apply_scaling` (Meta's reference code), in plain Python floats, at the real
    settings: head dim 128, theta 500000, factor 8, low/high 1/4, original context 8192."""
    cfg = ModelConfig(dim=128 * 4, n_heads=4, n_kv_heads=4, rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0)
    expected, regimes = [], set()
    for i in range(64):
        freq = 1.0 / 500000.0 ** (2 * i / 128)
        wavelength = 2 * math.pi / freq
        if wavelength < 8192 / 4:
            expected.append(freq)
            regimes.add("kept")
        elif wavelength > 8192 / 1:
            expected.append(freq / 8)
            regimes.add("slowed")
        else:
            smooth = (8192 / wavelength - 1) / (4 - 1)
            expected.append((1 - smooth) * freq / 8 + smooth * freq)
            regimes.add("blended")
    assert regimes == {"kept", "slowed", "blended"}
    got = rotary_frequencies(cfg).double()
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=0, rtol=1e-6)
    linear = rotary_frequencies(replace(cfg, rope_scaling="linear", rope_factor=4.0))
    torch.testing.assert_close(linear * 4, rotary_frequencies(replace(cfg, rope_scaling="")), atol=0, rtol=1e-6)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_resize_vocab_keeps_old_rows_and_starts_new_ones_at_the_mean(tie):
    model = randomize(Transformer(tiny_config(tie_embeddings=tie)))
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        before = model.logits(model(ids))
        old_mean = model.head_weight.mean(0)
        model.resize_vocab(80)
        after = model.logits(model(ids))
    assert model.config.vocab_size == 80 and model.embed_tokens.weight.shape == (80, 32)
    torch.testing.assert_close(after[..., :64], before, atol=0, rtol=0)
    torch.testing.assert_close(model.head_weight[64:], old_mean.expand(16, -1), atol=1e-6, rtol=0)
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params()


@interpreter_only
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_documents_are_prepared_once_per_forward_for_all_layers(monkeypatch, backend):
    """The (B, 1, T, T) mask (torch) or the kernel's document bounds (Triton) are built once per
    forward and handed to every layer, not rebuilt in each."""
    import minisft.model as model_module

    calls = []
    real = model_module.ATTENTION_BACKENDS[backend]

    def documents(document_ids):
        calls.append(document_ids.shape)
        return real.documents(document_ids)

    monkeypatch.setitem(model_module.ATTENTION_BACKENDS, backend, real._replace(documents=documents))
    model = Transformer(tiny_config(n_layers=3, dim=64), Backends(attention=backend))  # head dim 16: the kernel's least
    input_ids = torch.randint(0, 64, (2, 16))
    document_ids = torch.tensor([0] * 5 + [1] * 11)[None].expand(2, -1)
    packed = model(input_ids, document_ids=document_ids)
    assert calls == [(2, 16)]
    alone = model(input_ids[:, 5:], position_ids=torch.arange(11)[None].expand(2, -1))
    torch.testing.assert_close(packed[:, 5:], alone, atol=1e-5, rtol=1e-5)  # the second document saw only itself


def test_backends_are_chosen_separately():
    model = Transformer(tiny_config(), Backends(attention="torch", loss="triton"))
    assert (model.backends.attention, model.backends.loss) == ("torch", "triton")
    with pytest.raises(ValueError, match="unknown kernels backend 'fast' for loss"):
        Backends(loss="fast")
