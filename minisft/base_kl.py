"""A pull toward the base model while fine-tuning: SFT's loss plus λ · KL(base ‖ model) on the prompts.

    loss = Σ_answers CE / N  +  λ · Σ_{t ∈ P} KL(q_t ‖ p_t) / |P|          (train.base_kl = λ)

SFT trains the answer tokens only, yet every weight it moves also moves the model's predictions
everywhere else: on ordinary text too, which is forgetting (the plain-text loss's rise,
`data.plain_text_eval`). The second term asks the model to keep predicting what the base model
(q, the model as the run starts) predicts on P, the positions SFT does *not* train: real tokens
(not pads) whose next token carries no loss (label -100) — the prompts, and with data.train_on =
"last" the earlier answers too; text the user supplies anyway, so no other data is needed. (With
train_on = "all" P is empty: refused.)
Its gradient in the logits is p − q per position: distillation from the base (Hinton et al. 2015),
as Learning without Forgetting (Li & Hoiem 2016) keeps a network's old outputs on new inputs.
|P| counts the whole step's positions (all micro-batches, all ranks), as N does for the token loss,
so gradient accumulation and DDP give the one-big-batch gradient.

The base never changes, so its distributions are computed once, before the first step — one
forward over the training set, as DPO's reference log-probs are (`dpo.py`) — and kept cut to their
`train.base_kl_top_k` likeliest tokens plus the rest's mass (`loss.top_k_distributions`; the KL
is then taken through those k + 1 buckets, `loss.base_kl_sum`). No second model is held and no
step runs the base: a step pays only its own logits over P, two matmuls a chunk (the gradient is
made in the forward, while the chunk's logits exist). The kept distributions cost
|P| · (8k + 4) bytes of CPU memory — printed when they are made. A resumed run makes them again
from the model it is given, before its checkpoint is restored, so its base is the same. Under
torchrun every rank makes them all: which rows a rank trains changes every epoch.
The step's `base_kl` (Σ KL / |P|) is logged with the loss, which then holds both terms.

`train.base_kl_every = n` keeps one prompt position in n — the columns t ≡ phase (mod n) of each item,
its phase drawn from its own tokens (`anchored_positions`) — a sparser sample of the same mean, for
~1/n of the LM head and KL work in the setup pass and in each step. The body's forward in the setup
pass stays whole: position t's hidden state needs every token before it.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch import Tensor

from minisft.distributed import Replica, ranks, sum_across_ranks
from minisft.labels import IGNORE_INDEX
from minisft.loss import top_k_distributions
from minisft.model import Transformer
from minisft.packing import Batch
from minisft.train import Item, Objective, TrainConfig, autocast, collate


class BaseDistributions(NamedTuple):
    """The base's next-token distributions at one item's anchored positions, in order, cut to top k."""

    ids: Tensor  # (n, k) int32: the k likeliest tokens
    probs: Tensor  # (n, k) fp32: their probabilities
    rest: Tensor  # (n,) fp32: the probability of every other token together


class AnchoredBatch(NamedTuple):
    """A Batch and the base's distributions at its anchored positions, row by row (`anchored_positions`'s
    order): what the loss compares the model's with."""

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor | None
    document_ids: Tensor | None
    base_ids: Tensor  # (|P|, k)
    base_probs: Tensor  # (|P|, k)
    base_rest: Tensor  # (|P|,)


def anchored_positions(batch: Batch | AnchoredBatch, pad_id: int, every: int = 1) -> Tensor:
    """(B, T) bool: the real tokens whose next token SFT takes no loss on (the prompts); with every = n,
    only those in columns t ≡ phase (mod n), each row's phase the sum of its tokens mod n — so a chat
    template's fixed positions (the system prompt's first token, say) are not kept in every row or
    none, and a row has the same phase whatever batch it is in (rows are right-padded)."""
    real = batch.input_ids != pad_id
    prompts = (batch.labels == IGNORE_INDEX) & real
    if every == 1:
        return prompts
    phase = (batch.input_ids * real).sum(-1, keepdim=True) % every
    columns = torch.arange(batch.labels.shape[1], device=batch.labels.device)
    return prompts & (columns % every == phase)


@torch.no_grad()
def base_distributions(
    model: Transformer, items: list[Item], pad_id: int, top_k: int, batch_size: int, precision: str, every: int = 1
) -> list[BaseDistributions]:
    """Each item's (an example, or a packed row of them) anchored distributions under `model` as it is
    now, in eval mode, batch_size items a forward. An item's anchored positions do not depend on the
    batch it is collated into (rows are right-padded), so they line up with any later batch's."""
    device, was_training = model.embed_tokens.weight.device, model.training
    model.eval()
    found = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size], pad_id)
        ids, positions, documents = (None if t is None else t.to(device) for t in batch[:1] + batch[2:])
        with autocast(device, precision):  # as the loss will see the model's own: bf16 matmuls on a GPU
            hidden = model(ids, positions, documents)
            for row, anchored in zip(hidden, anchored_positions(batch, pad_id, every).to(device), strict=True):
                kept = top_k_distributions(row[anchored], model.head_weight, top_k)
                found.append(BaseDistributions(*(t.cpu() for t in kept)))
    model.train(was_training)
    return found


class BaseKL(Objective):
    """SFT's token loss plus weight · the mean KL(base ‖ model) over the step's anchored positions.
    Its items are (item, BaseDistributions) pairs: `with_base` makes them."""

    stats = ("base_kl",)

    def __init__(self, weight: float, pad_id: int, every: int = 1) -> None:
        self.weight, self.pad_id, self.every = weight, pad_id, every
        self.anchored = 0  # |P| of the current step, set by `count`
        self.seconds = 0.0  # spent making the base's distributions (`with_base`)

    def with_base(self, model: Transformer, items: list[Item], cfg: TrainConfig, label: str) -> list[tuple]:
        """items paired with their base distributions under `model` as it is now: the base."""
        start = time.perf_counter()
        found = base_distributions(
            model, items, self.pad_id, cfg.base_kl_top_k, cfg.batch_size, cfg.precision, self.every
        )
        self.seconds = time.perf_counter() - start  # what the run spent on them, beside its steps
        if ranks().is_main:
            positions, size = sum(len(d.rest) for d in found), sum(t.nbytes for d in found for t in d)
            k = min(cfg.base_kl_top_k, model.head_weight.shape[0])
            sampled = f" (one in {self.every})" if self.every > 1 else ""
            print(
                f"{label}: the base's next-token distributions at {positions:,} prompt positions{sampled}, top {k} "
                f"each ({size / 2**20:.1f} MiB), in {self.seconds:.1f} s"
            )
        return list(zip(items, found, strict=True))

    def collate(self, items: list[tuple], pad_id: int) -> AnchoredBatch:
        batch = collate([item for item, _ in items], pad_id)
        return AnchoredBatch(*batch, *(torch.cat(parts) for parts in zip(*(base for _, base in items), strict=True)))

    def count(self, batches: list[AnchoredBatch], pad_id: int, device: torch.device) -> tuple[int, int, int]:
        anchored = sum(len(b.base_rest) for b in batches)
        if ranks().world > 1:
            anchored = int(sum_across_ranks(torch.tensor([anchored], device=device)).item())
        self.anchored = anchored
        return super().count(batches, pad_id, device)

    def loss(self, replica: Replica, batch: AnchoredBatch, normaliser: int) -> tuple[Tensor, list[Tensor]]:
        token_loss, kl_sum = replica.run(
            "loss_and_base_kl", batch.input_ids, batch.labels, normaliser, batch.position_ids, batch.document_ids,
            anchored_positions(batch, self.pad_id, self.every), batch.base_ids, batch.base_probs, batch.base_rest,
        )  # fmt: skip
        kl = kl_sum / max(self.anchored, 1)
        return token_loss + self.weight * kl, [kl.detach()]
