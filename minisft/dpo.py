"""DPO: preference tuning after SFT, as an objective of the same loop (train.py).

Direct Preference Optimization (Rafailov et al., 2023, eq. 7) trains the policy π_θ so that its
implicit reward r(x, y) = β · (log π_θ(y|x) − log π_ref(y|x)) ranks the chosen answer y_w above the
rejected y_l. With the margin

    m = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]

the per-pair losses are

    sigmoid (DPO)   −(1 − ε) · log σ(β·m) − ε · log σ(−β·m)      ε = label_smoothing: cDPO (Mitchell,
                                                                  2023), labels flipped with prob. ε
    ipo             (m − 1/(2β))²                                 IPO (Azar et al., 2023, eq. 17)

With dpo.sft_weight = α > 0 each pair's loss also holds α times the chosen answer's SFT loss,
α · (−log π_θ(y_w|x)) / |y_w| (RPO, Pang et al., 2024, "Iterative Reasoning Preference
Optimization", eq. 3): DPO alone ranks y_w above y_l but may lower both, and the probability y_l
loses can go to answers neither of them (the demo's README section shows it happen); the SFT term
keeps y_w likely in absolute terms. |y_w| is the pair's own trained-token count, as in the paper;
TRL's `rpo_alpha` instead averages the NLL over all chosen tokens of the batch.

A step's loss is the per-pair losses' sum over the step's pairs (all micro-batches, all ranks) divided by
the number of pairs — the SFT loss's rule, with pairs for tokens. log π(y|x) is the sum of the
answer's token log-probs, over exactly the positions SFT would train (`preference.py`), taken
from hidden states and the head weight by the loss backend (`loss.py`): never the (N, V) logits.

The reference model is the policy before DPO. Its log-probs are computed once, before the first
step, and written to the run folder (`reference_logps.json`): no second model is held in memory,
and a resumed run reads them back instead of recomputing them from weights it no longer has.

Conventions that differ from TRL's DPOTrainer (checked against it in tests/test_dpo_trl.py):
IPO here uses summed log-probs, as the IPO paper's log-likelihoods; TRL divides them by the
answer's length first. TRL also trains the ChatML "\n" after <|im_end|> (its completion is all that
follows the prompt); minisft's answer ends at the end-of-turn token, as in SFT.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from minisft.chat import Example
from minisft.distributed import Replica, sum_across_ranks
from minisft.errors import ConfigError
from minisft.integrity import read_json, write_atomically
from minisft.labels import IGNORE_INDEX
from minisft.model import Transformer
from minisft.packing import pad_batch
from minisft.preference import Pair
from minisft.train import Objective, autocast, count_tokens

LOSS_TYPES = ("sigmoid", "ipo")
REFERENCE_FILE = "reference_logps.json"


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1  # β: how far the policy may move from the reference (the reward's scale)
    loss_type: str = "sigmoid"  # sigmoid (DPO, Rafailov et al. 2023) or ipo (Azar et al. 2023)
    label_smoothing: float = 0.0  # cDPO: the chance a pair's preference is flipped (sigmoid only; 0 = plain DPO)
    sft_weight: float = 0.0  # α of RPO (Pang et al. 2024): + α · NLL(chosen) / its tokens, per pair (0 = plain DPO)

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be positive, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"dpo.loss_type: {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("dpo.label_smoothing is cDPO's: it needs dpo.loss_type = 'sigmoid'")
        if self.sft_weight < 0:
            raise ValueError(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")


def dpo_losses(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    cfg: DPOConfig,
    chosen_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair log-probs (P,) each -> (per-pair losses, chosen rewards, rejected rewards), fp32.
    chosen_tokens (P,): each chosen answer's trained-token count, needed when cfg.sft_weight > 0."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if cfg.loss_type == "ipo":
        losses = (margin - 1 / (2 * cfg.beta)) ** 2
    else:
        eps = cfg.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(cfg.beta * margin) - eps * F.logsigmoid(-cfg.beta * margin)
    if cfg.sft_weight:
        if chosen_tokens is None:
            raise ValueError("dpo.sft_weight needs each chosen answer's token count")
        losses = losses + cfg.sft_weight * -chosen / chosen_tokens.to(chosen.device)
    return losses, cfg.beta * chosen_ratio.detach(), cfg.beta * rejected_ratio.detach()


class PairBatch(NamedTuple):
    input_ids: Tensor  # (2P, T): the P chosen conversations, then the P rejected ones
    labels: Tensor  # (2P, T), -100 but on the answers
    reference: Tensor  # (2P,) fp32 reference log-probs, in the same order


def collate_pairs(pairs: list[Pair], pad_id: int) -> PairBatch:
    input_ids, labels = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    reference = torch.tensor([p.reference[0] for p in pairs] + [p.reference[1] for p in pairs])
    return PairBatch(input_ids, labels, reference)


class DPOObjective(Objective):
    """The loop's objective for DPO: micro-batches of pairs, normalised by the step's pair count."""

    # Logged every log_every steps, each a mean over the step's pairs: how often the implicit reward
    # ranks chosen first, by how much, and the policy's log-probs of each answer.
    stats = ("reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected")

    def __init__(self, cfg: DPOConfig) -> None:
        self.cfg = cfg

    def collate(self, items: list[Pair], pad_id: int) -> PairBatch:
        return collate_pairs(items, pad_id)

    def count(self, batches: list[PairBatch], pad_id: int, device: torch.device) -> tuple[int, int, int]:
        trained, real = count_tokens(batches, pad_id, device)
        pairs = torch.tensor(sum(len(b.reference) // 2 for b in batches), device=device)
        return int(sum_across_ranks(pairs)), trained, real

    def pair_terms(self, logps: Tensor, reference: Tensor, chosen_tokens: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(2P,) policy and reference log-probs, chosen first, and (P,) chosen answers' token counts
        -> (per-pair losses, per-pair statistics as `stats`)."""
        n = len(logps) // 2
        reference = reference.to(logps.device)
        losses, chosen_reward, rejected_reward = dpo_losses(
            logps[:n], logps[n:], reference[:n], reference[n:], self.cfg, chosen_tokens
        )
        logps = logps.detach()
        return losses, [
            (chosen_reward > rejected_reward).float(),
            chosen_reward - rejected_reward,
            logps[:n],
            logps[n:],
        ]

    def loss(self, replica: Replica, batch: PairBatch, normaliser: int) -> tuple[Tensor, list[Tensor]]:
        logps = replica.run("sequence_log_probs", batch.input_ids, batch.labels)
        chosen_tokens = (batch.labels[: len(logps) // 2] != IGNORE_INDEX).sum(dim=1)
        losses, stats = self.pair_terms(logps, batch.reference, chosen_tokens)
        return losses.sum() / normaliser, [s.sum() / normaliser for s in stats]

    def evaluate(
        self, model: Transformer, items: list, pad_id: int, batch_size: int, precision: str
    ) -> dict[str, float]:
        """Held-out pairs -> mean loss and statistics; plain-text examples (forgetting) -> their SFT loss."""
        if isinstance(items[0], Example):
            return super().evaluate(model, items, pad_id, batch_size, precision)
        logps = pair_log_probs(model, items, pad_id, batch_size, precision)
        reference = torch.tensor([p.reference for p in items])
        chosen_tokens = torch.tensor([p.chosen.num_trained_tokens for p in items])
        losses, stats = self.pair_terms(logps.T.flatten(), reference.T.flatten(), chosen_tokens)
        means = [float(t.mean()) for t in (losses, *stats)]
        return {"": means[0]} | dict(zip(self.stats, means[1:], strict=True))


@torch.no_grad()
def pair_log_probs(model: Transformer, pairs: list[Pair], pad_id: int, batch_size: int, precision: str) -> Tensor:
    """(P, 2) fp32 on the CPU: log π(chosen|x) and log π(rejected|x) of each pair under `model` as it
    is now, in eval mode (no dropout) — the reference before DPO, the policy when evaluating."""
    device, was_training = model.embed_tokens.weight.device, model.training
    model.eval()
    rows = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        input_ids, labels = pad_batch([p.chosen for p in chunk] + [p.rejected for p in chunk], pad_id)
        with autocast(device, precision):
            logps = model.sequence_log_probs(input_ids.to(device), labels.to(device)).float().cpu()
        rows.append(logps.view(2, len(chunk)).T)  # chosen first, then rejected -> (chunk, 2)
    model.train(was_training)
    return torch.cat(rows)


def reference_log_probs(
    model: Transformer, pairs: list[Pair], pad_id: int, batch_size: int, precision: str
) -> list[Pair]:
    """The pairs with `reference` filled in by `model` as it is now (before DPO)."""
    logps = pair_log_probs(model, pairs, pad_id, batch_size, precision).tolist()
    return [replace(p, reference=(chosen, rejected)) for p, (chosen, rejected) in zip(pairs, logps, strict=True)]


def with_reference(
    model: Transformer,
    sets: dict[str, list],
    run_dir: Path,
    resume: bool,
    pad_id: int,
    batch_size: int,
    precision: str,
    write: bool,
) -> dict[str, list]:
    """Every pair set with its reference log-probs: computed now and written to run_dir (write: rank
    0), or, on resume, read back from there (the reference model's weights are gone by then)."""
    path = run_dir / REFERENCE_FILE
    pair_sets = {name: items for name, items in sets.items() if items and isinstance(items[0], Pair)}
    if resume:
        if not path.is_file():
            raise ConfigError(f"{path} is missing: a DPO run resumes with the reference log-probs it began with")
        stored = read_json(path)  # garbled (a hand edit): one line, not a JSONDecodeError
        for name, items in pair_sets.items():
            if stored.get(name, {}).get("pairs") != fingerprint(items):
                raise ConfigError(f"{path}: its {name} pairs are not the data's now (the data files changed)")
        return sets | {
            name: [replace(p, reference=tuple(r)) for p, r in zip(items, stored[name]["logps"], strict=True)]
            for name, items in pair_sets.items()
        }
    done = {name: reference_log_probs(model, items, pad_id, batch_size, precision) for name, items in pair_sets.items()}
    if write:
        stored = {
            name: {"pairs": fingerprint(items), "logps": [p.reference for p in items]} for name, items in done.items()
        }
        write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(stored)))  # never half a file
    return sets | done


def fingerprint(pairs: list[Pair]) -> str:
    """SHA-256 of the pairs' token ids and labels: which data the stored log-probs belong to."""
    digest = hashlib.sha256()
    for p in pairs:
        for example in (p.chosen, p.rejected):
            digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()
