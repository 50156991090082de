"""Data-parallel training under `torchrun`: one process (rank) per device, gradients averaged by DDP.

    torchrun --nproc_per_node 2 -m minisft train --config run.toml

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `setup` joins the process group (NCCL on GPUs,
gloo on CPUs). Every rank holds a full replica of the model and reads its own share of each
optimizer step's micro-batches (see `train.py`); DDP sums the gradients across ranks during the
backward pass. Launched as a plain `python -m minisft`, none of this runs: one rank, no group.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from minisft.model import Transformer


@dataclass(frozen=True)
class Ranks:
    rank: int = 0  # this process
    world: int = 1  # processes in the run

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files (metrics, checkpoints) and prints progress."""
        return self.rank == 0


def ranks() -> Ranks:
    """This process's place in the process group, or Ranks(0, 1) outside one."""
    if not dist.is_initialized():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size())


def setup() -> Ranks:
    """Join the process group when torchrun started this process; pick this rank's GPU."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Ranks()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # so the device "cuda" is this rank's GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return ranks()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_across_ranks(value: Tensor) -> Tensor:
    """The sum of `value` over all ranks (in place; the value itself with one rank)."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


class _Loss(nn.Module):
    """DDP syncs the gradients of what its module's forward computes: here, the model's loss."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args) -> Tensor:
        return self.model.loss(*args)


class Replica:
    """The model as one rank trains it: `loss` runs through DDP when there are several ranks."""

    def __init__(self, model: Transformer) -> None:
        self.model, self.world = model, ranks().world
        # DDP broadcasts rank 0's weights on construction, so every replica starts equal.
        self.ddp = DistributedDataParallel(_Loss(model)) if self.world > 1 else None

    def loss(self, *args) -> Tensor:
        """model.loss(input_ids, labels, num_trained_tokens, position_ids, document_ids)."""
        return self.model.loss(*args) if self.ddp is None else self.ddp(*args)

    def sync_gradients(self, now: bool) -> AbstractContextManager:
        """Around a micro-batch's forward and backward: DDP all-reduces its gradients only when
        `now` (the step's last micro-batch); before that they just accumulate on each rank."""
        return nullcontext() if now or self.ddp is None else self.ddp.no_sync()
