"""LoRA layers (minisft/lora.py) against hand-written references: step 0 is the base model, merge and
unmerge are exact, only the adapters learn, and the Triton kernels and packing see no difference."""

import math
import random

import pytest
import torch
from test_packing import random_examples
from test_train_parts import tiny_model

from minisft.errors import ConfigError
from minisft.lora import LoRAConfig, LoRALinear, apply_lora, lora_layers, merge_lora
from minisft.model import Backends
from minisft.packing import pack_examples, packed_batch
from minisft.train import TrainConfig, make_optimizer

from helpers import assert_packed_equals_alone, interpreter_only, sharpen_

pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_adapters_(model, seed: int = 0, std: float = 0.3) -> None:
    """B = 0 makes every adapter a no-op: give B (and A) values, so a test can see the adapters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * std)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)


def batch(vocab: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, 12), generator=gen)
    labels = torch.randint(1, vocab, (2, 12), generator=gen)
    labels[0, :4] = -100
    return ids, labels, int((labels != -100).sum())


def test_step_zero_is_the_base_model_bitwise():
    model = sharpen_(tiny_model(seed=1), seed=1)
    ids, labels, n = batch()
    before = model.logits(model(ids))
    apply_lora(model, LoRAConfig(r=4))
    assert all(bool((layer.lora_A != 0).any()) for layer in lora_layers(model).values())  # A is random, B zero
    assert torch.equal(model.logits(model(ids)), before)


def test_forward_is_w_x_plus_scaled_b_a_x_by_hand():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5, bias=True)
    layer = LoRALinear(linear, r=3, scale=2.5, dropout=0.0, base_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = x @ linear.weight.T + linear.bias + 2.5 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    bound = 1 / math.sqrt(6)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), nn.Linear's init
    assert bound / 2 < float(layer.lora_A.detach().abs().max()) <= bound


@pytest.mark.parametrize(("r", "alpha", "rslora", "scale"), [(8, 16.0, False, 2.0), (16, 16.0, True, 4.0)])
def test_scale_is_alpha_over_r_or_over_sqrt_r(r, alpha, rslora, scale):
    assert LoRAConfig(r=r, alpha=alpha, rslora=rslora).scale == scale


def test_merge_then_unmerge_restores_the_base_and_merged_equals_unmerged():
    model = sharpen_(tiny_model(seed=2), seed=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ids, _, _ = batch()
    base_logits = model.logits(model(ids))
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets="q,v,down"))
    randomise_adapters_(model)
    unmerged = model.logits(model(ids))
    assert not torch.allclose(unmerged, base_logits, atol=1e-2)  # the adapters change the model
    for layer in lora_layers(model).values():
        layer.merge()
    torch.testing.assert_close(model.logits(model(ids)), unmerged, atol=1e-4, rtol=1e-4)
    for layer in lora_layers(model).values():
        layer.unmerge()
    state = model.state_dict()
    for name, tensor in base.items():
        torch.testing.assert_close(state[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_merge_lora_leaves_a_plain_model_with_the_same_logits():
    model = sharpen_(tiny_model(seed=3), seed=3)
    apply_lora(model, LoRAConfig(r=2))
    randomise_adapters_(model, seed=3, std=0.1)
    ids, _, _ = batch()
    expected = model.logits(model(ids))
    merge_lora(model)
    assert not lora_layers(model) and set(model.state_dict()) == set(tiny_model().state_dict())
    torch.testing.assert_close(model.logits(model(ids)), expected, atol=1e-4, rtol=1e-4)


def test_gradients_reach_only_the_adapters_and_the_optimizer_holds_only_them():
    model = sharpen_(tiny_model(seed=4), seed=4).train()
    wrapped = apply_lora(model, LoRAConfig(r=4, targets="q,k,v,o,gate,up,down"))
    assert len(wrapped) == 7 * model.config.n_layers
    randomise_adapters_(model, seed=4)
    ids, labels, n = batch()
    model.loss(ids, labels, n).backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    adapters = {id(p) for name, p in model.named_parameters() if "lora_" in name}
    optimizer = make_optimizer(model, TrainConfig())
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(held) == sorted(adapters)


def test_adapter_gradients_equal_the_hand_derived_ones():
    """dL/dB = s · g (A x)ᵀ, dL/dA = s · Bᵀ g xᵀ for L = Σ g·h: an independent check of autograd's path."""
    torch.manual_seed(5)
    layer = LoRALinear(torch.nn.Linear(7, 5, bias=False), r=3, scale=0.5, dropout=0.0, base_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_()
    x, g = torch.randn(4, 7), torch.randn(4, 5)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(layer.lora_B.grad, 0.5 * g.T @ (x @ layer.lora_A.T).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, 0.5 * (g @ layer.lora_B).T.detach() @ x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("where", ["fp32", "bf16 input", "bf16 autocast", "bf16 base, bf16 autocast"])
def test_forward_in_bf16_equals_the_maths_to_bf16_precision(where):
    """h = W x + b + s·B A x in float64 is the reference; in bf16 (a bf16 model, or autocast) the
    adapter's path runs in bf16 too, so the output is bf16 and equal to bf16's rounding."""
    torch.manual_seed(8)
    linear = torch.nn.Linear(48, 40, bias=True)
    base_dtype = torch.bfloat16 if "bf16 base" in where else torch.float32
    layer = LoRALinear(linear, r=6, scale=1.5, dropout=0.0, base_dtype=base_dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    x = torch.randn(16, 48)
    W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    expected = x.double() @ W.T + linear.bias.double() + 1.5 * (x.double() @ A.T) @ B.T
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in where):
        out = layer(x.bfloat16() if where == "bf16 input" else x)
    assert out.dtype == (torch.float32 if where == "fp32" else torch.bfloat16)
    tol = 1e-5 if where == "fp32" else 3e-2  # bf16 keeps 8 bits: inputs, weights and result each round once
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_adapters_save_no_copy_of_their_input_for_the_backward():
    """Under autocast, q, k and v reading one bf16 x keep x itself for their backward, once — no
    per-adapter fp32-then-bf16 copy. Counted with saved-tensor hooks: every saved tensor as large
    as x must be x's own storage (the others are weights and the r-wide products)."""
    layers = [LoRALinear(torch.nn.Linear(64, 64), r=4, scale=2.0, dropout=0.0, base_dtype=torch.float32)]
    layers += [LoRALinear(torch.nn.Linear(64, 32), r=4, scale=2.0, dropout=0.0, base_dtype=torch.float32)] * 2
    x = torch.randn(256, 64, dtype=torch.bfloat16, requires_grad=True)  # what RMSNorm hands over under autocast
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [layer(x) for layer in layers]
    large = [t for t in saved if t.numel() >= x.numel()]
    assert large and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in large)
    sum(o.float().sum() for o in outs).backward()  # and the backward still reaches every adapter
    assert all(layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32 for layer in layers)


def test_bf16_base_keeps_fp32_adapters_and_equals_a_rounded_base_at_step_zero():
    model = sharpen_(tiny_model(seed=6), seed=6)
    ids, labels, n = batch()
    with torch.no_grad():  # the reference: the same base with its projections rounded to bf16
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(p.bfloat16().float())
    expected = model.loss(ids, labels, n)
    apply_lora(model, LoRAConfig(r=4, base_dtype="bf16"))
    for name, p in model.named_parameters():
        want = torch.float32 if "lora_" in name or not name.endswith("proj.weight") else torch.bfloat16
        assert p.dtype == want, name
    torch.testing.assert_close(model.loss(ids, labels, n), expected, atol=1e-6, rtol=1e-6)


def test_dropout_touches_only_the_adapter_path_and_is_off_in_eval():
    model = sharpen_(tiny_model(seed=7), seed=7)
    apply_lora(model, LoRAConfig(r=4, dropout=0.5))
    randomise_adapters_(model, seed=7)
    ids, _, _ = batch()
    model.train()
    a, b = model.logits(model(ids)), model.logits(model(ids))
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model.logits(model(ids)), model.logits(model(ids)), atol=0, rtol=0)


@interpreter_only
def test_lora_on_the_triton_kernels_equals_the_torch_path():
    models = {}
    for backend in ("torch", "triton"):
        model = sharpen_(tiny_model(seed=8, n_heads=2, n_kv_heads=1), seed=8).train()  # head dim 16
        model.backends = Backends(backend, backend)
        apply_lora(model, LoRAConfig(r=4, targets="q,v,up"))
        randomise_adapters_(model, seed=8)
        ids, labels, n = batch()
        loss = model.loss(ids, labels, n)
        loss.backward()
        models[backend] = (loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(models["triton"][0], models["torch"][0], atol=1e-4, rtol=1e-4)
    for name, grad in models["torch"][1].items():
        torch.testing.assert_close(models["triton"][1][name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_lora_packed_equals_lora_unpacked():
    model = tiny_model(seed=9, vocab_size=50)
    apply_lora(model, LoRAConfig(r=4))
    randomise_adapters_(model, seed=9, std=0.1)
    examples = random_examples(random.Random(9), 12, vocab=50)
    rows = pack_examples(examples, max_len=48)
    assert len(rows) < len(examples)
    assert_packed_equals_alone(model, examples, packed_batch(rows, pad_id=0), leak_tolerance=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": -1}, "lora.r must be at least 1"),
        ({"r": 4, "targets": "q,qkv"}, "'qkv' matches no layer"),
        ({"r": 4, "targets": ""}, "matches no layer"),
        ({"r": 4, "dropout": 1.0}, "lora.dropout"),
        ({"r": 4, "base_dtype": "fp8"}, "lora.base_dtype"),
    ],
)
def test_bad_lora_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_peft_target_names_are_accepted():
    assert LoRAConfig(r=2, targets="q_proj, v_proj,down_proj").target_list == ["q", "v", "down"]


def test_a_model_without_blocks_matches_nothing():
    model = tiny_model(n_layers=1)
    model.layers = torch.nn.ModuleList()
    with pytest.raises(ConfigError, match="matches no layer"):
        apply_lora(model, LoRAConfig(r=2))


def test_measuring_the_cpu_peak_leaves_the_random_stream_of_dropout_alone():
    """The FLOPs peak is measured once per process; it used to draw from torch's global generator, so
    a process's first run had other dropout masks than its later ones (and than a resumed run)."""
    from minisft.flops import measured_cpu_peak

    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    measured_cpu_peak.__wrapped__(1, size=64, repeats=1)
    assert torch.equal(torch.rand(4), expected)


def test_weights_read_from_a_hugging_face_folder_own_their_memory(tmp_path):
    """Tensors read from model.safetensors are copied out of the file's mapping: views of it (storages
    over memory torch does not own, so not resizable) kept the file's pages resident while any weight
    lived, and a bf16 LoRA base, which replaces the fp32 projections, cost 0.2 GB more than fp32 on
    SmolLM2 instead of 0.2 GB less (0.99 vs 0.80 GB resident after attaching, now 0.70)."""
    from minisft.hf import export_hf
    from minisft.pretrained import SavedModel
    from minisft.tokenizer import Tokenizer

    export_hf(tmp_path / "base", tiny_model(vocab_size=320), Tokenizer.train_bpe(["user text"] * 4, 300), "chatml")
    model, _ = SavedModel(tmp_path / "base").load()
    assert all(p.untyped_storage().resizable() for p in model.parameters())
    apply_lora(model, LoRAConfig(r=4, base_dtype="bf16"))
    assert {layer.weight.dtype for layer in lora_layers(model).values()} == {torch.bfloat16}
