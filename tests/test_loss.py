"""The SFT loss: values and gradients against F.cross_entropy / by-hand log-softmax, the global-N
normalisation that makes gradient accumulation exact, and the all-masked batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from minisft.chat import Example
from minisft.labels import count_trained_tokens
from minisft.loss import masked_lm_loss
from minisft.model import ModelConfig, Transformer
from minisft.packing import pad_batch

pytestmark = pytest.mark.usefixtures("one_thread")


V, DIM = 50, 16


def random_labels(shape, frac_masked=0.4, generator=None):
    labels = torch.randint(0, V, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < frac_masked] = -100
    return labels


def test_count_trained_tokens():
    labels = torch.tensor([[1, -100, 3], [-100, -100, 0]])
    assert count_trained_tokens(labels) == 3


def test_masked_lm_loss_equals_mean_cross_entropy_values_and_grads():
    hidden = torch.randn(3, 7, DIM, requires_grad=True)
    weight = (torch.randn(V, DIM) / math.sqrt(DIM) * 3).requires_grad_()
    labels = random_labels((3, 7))
    n = int((labels != -100).sum())
    assert 0 < n < labels.numel()

    loss = masked_lm_loss(hidden, weight, labels, n)
    loss.backward()

    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = F.cross_entropy((h64 @ w64.T).reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    ref.backward()

    # an independent by-hand value: -(logit of the label - logsumexp), averaged over trained tokens
    logits = (h64 @ w64.T).detach().reshape(-1, V)
    flat = labels.reshape(-1)
    keep = flat != -100
    per_token = torch.logsumexp(logits[keep], -1) - logits[keep].gather(1, flat[keep, None]).squeeze(1)
    assert loss.item() == pytest.approx(per_token.mean().item(), abs=1e-5)

    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=1e-6, rtol=1e-4)


def test_masked_lm_loss_divides_the_sum_by_the_given_count():
    hidden, weight = torch.randn(2, 5, DIM), torch.randn(V, DIM)
    labels = random_labels((2, 5))
    n = count_trained_tokens(labels)
    total = F.cross_entropy((hidden @ weight.T).reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert masked_lm_loss(hidden, weight, labels, 4 * n).item() == pytest.approx(total.item() / (4 * n), rel=1e-5)


def _tiny_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)
    )
    with torch.no_grad():  # larger weights: per-token losses differ a lot, so the averaging matters
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
    return model


def _uneven_examples() -> list[Example]:
    """Six rows of different lengths and very different trained-token counts."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(6, 1), (14, 12), (9, 2), (4, 4), (16, 15), (11, 3)]  # (length, trained tokens at the end)
    examples = []
    for length, trained in shapes:
        ids = torch.randint(0, V, (length + 1,), generator=gen).tolist()
        labels = [-100] * (length - trained) + ids[1 + length - trained :]
        examples.append(Example(input_ids=ids[:-1], labels=labels))
    return examples


def test_gradient_accumulation_with_global_count_equals_one_big_batch():
    model = _tiny_model()
    examples = _uneven_examples()
    full_ids, full_labels = pad_batch(examples, pad_id=0)
    n_global = count_trained_tokens(full_labels)
    assert n_global == 1 + 12 + 2 + 4 + 15 + 3

    loss_full = model.loss(full_ids, full_labels, n_global)
    loss_full.backward()
    grads_full = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    # independent check of the big batch itself: mean cross-entropy over trained tokens
    with torch.no_grad():
        logits = model.logits(model(full_ids))
        ref = F.cross_entropy(logits.reshape(-1, V), full_labels.reshape(-1), ignore_index=-100)
    assert loss_full.item() == pytest.approx(ref.item(), abs=1e-6)

    # k = 3 micro-batches, each padded to its own width, each normalised by the global N
    micro = [pad_batch(examples[i : i + 2], pad_id=0) for i in range(0, 6, 2)]
    assert len({ids.shape[1] for ids, _ in micro}) > 1  # the micro-batches really have different widths
    total = torch.zeros(())
    for ids, labels in micro:
        loss = model.loss(ids, labels, n_global)
        loss.backward()
        total += loss.detach()
    assert total.item() == pytest.approx(loss_full.item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_full[name], atol=1e-6, rtol=1e-5, msg=name)

    # The per-micro-batch mean (the classic accumulation bug) gives a different loss and gradient.
    model.zero_grad(set_to_none=True)
    means = []
    for ids, labels in micro:
        loss = model.loss(ids, labels, count_trained_tokens(labels)) / len(micro)
        loss.backward()
        means.append(loss.item())
    assert abs(sum(means) - loss_full.item()) > 1e-2
    max_grad_diff = max((p.grad - grads_full[name]).abs().max().item() for name, p in model.named_parameters())
    assert max_grad_diff > 1e-4


def test_all_masked_batch_gives_zero_loss_and_zero_finite_gradients():
    hidden = torch.randn(2, 4, DIM, requires_grad=True)
    weight = torch.randn(V, DIM, requires_grad=True)
    labels = torch.full((2, 4), -100)
    loss = masked_lm_loss(hidden, weight, labels, count_trained_tokens(labels))
    assert torch.isfinite(loss)
    assert loss.item() == 0.0
    loss.backward()
    for grad in (hidden.grad, weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and (grad == 0).all()

    model = _tiny_model()
    loss = model.loss(torch.randint(0, V, (2, 5)), torch.full((2, 5), -100), 0)
    assert loss.item() == 0.0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad == 0).all(), name
