"""A pull toward the base model while fine-tuning: SFT's loss plus λ · KL(base ‖ model) on the prompts.

    loss = Σ_answers CE / N  +  λ · Σ_{t ∈ P} KL(q_t ‖ p_t) / |P|          (train.base_kl = λ)

SFT trains the answer tokens only, yet every weight it moves also moves the model's predictions
everywhere else: on ordinary text too, which is forgetting (the plain-text loss's rise,
`data.plain_text_eval`). The second term asks the model to keep predicting what the base model
(q, the model as the run started) predicts on P, the positions SFT does *not* train: real tokens
(not pads) whose next token carries no loss (label -100) — the prompts, and with data.train_on =
"last" the earlier answers too; text the user supplies anyway, so no other data is needed. (With
train_on = "all" P is empty: refused.)
Its gradient in the logits is p − q per position: distillation from the base (Hinton et al. 2015),
as Learning without Forgetting (Li & Hoiem 2016) keeps a network's old outputs on new inputs.
|P| counts the whole step's positions (all micro-batches, all ranks), as N does for the token loss,
so gradient accumulation and DDP give the one-big-batch gradient.

The base costs one forward without gradients per micro-batch, and logits over P on both sides
(each chunk's recomputed in the backward, the base's too, as the PyTorch token loss recomputes its):
  - with LoRA, the base *is* the model with its adapters off (`lora.adapters_off`): no second copy;
  - otherwise a frozen copy of the weights as the run starts (before a resumed run restores its
    checkpoint, so a resumed run keeps the same base): one more model's weights in memory.
The step's `base_kl` (Σ KL / |P|) is logged with the loss, which then holds both terms.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from minisft.distributed import Replica, ranks, sum_across_ranks
from minisft.labels import IGNORE_INDEX
from minisft.lora import adapters_off, lora_layers
from minisft.model import Transformer
from minisft.packing import Batch
from minisft.train import Objective


def anchored_positions(batch: Batch, pad_id: int) -> Tensor:
    """(B, T) bool: the real tokens whose next token SFT takes no loss on (the prompts)."""
    return (batch.labels == IGNORE_INDEX) & (batch.input_ids != pad_id)


class BaseKL(Objective):
    """SFT's token loss plus weight · the mean KL(base ‖ model) over the step's anchored positions."""

    stats = ("base_kl",)

    def __init__(self, model: Transformer, weight: float, pad_id: int) -> None:
        self.model, self.weight, self.pad_id = model, weight, pad_id
        # Without adapters to switch off, the base must be kept: a frozen copy, made before any step.
        self.copy = None if lora_layers(model) else copy.deepcopy(model).requires_grad_(False).eval()
        self.anchored = 0  # |P| of the current step, set by `count`

    @contextmanager
    def base(self) -> Iterator[Transformer]:
        if self.copy is not None:
            yield self.copy
        else:
            with adapters_off(self.model):
                yield self.model

    def count(self, batches: list[Batch], pad_id: int, device: torch.device) -> tuple[int, int, int]:
        anchored = sum(int(anchored_positions(b, pad_id).sum()) for b in batches)
        if ranks().world > 1:
            anchored = int(sum_across_ranks(torch.tensor([anchored], device=device)).item())
        self.anchored = anchored
        return super().count(batches, pad_id, device)

    def loss(self, replica: Replica, batch: Batch, normaliser: int) -> tuple[Tensor, list[Tensor]]:
        ids, positions, documents = batch.input_ids, batch.position_ids, batch.document_ids
        with torch.no_grad(), self.base() as base:
            base_hidden = base(ids, positions, documents)
            base_head = base.head_weight
        token_loss, kl_sum = replica.run(
            "loss_and_base_kl", ids, batch.labels, normaliser, positions, documents,
            base_hidden, base_head, anchored_positions(batch, self.pad_id),
        )  # fmt: skip
        kl = kl_sum / max(self.anchored, 1)
        return token_loss + self.weight * kl, [kl.detach()]
