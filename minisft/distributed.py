"""Data-parallel training under `torchrun`: one process (rank) per device, gradients averaged by DDP.

    torchrun --nproc_per_node 2 -m minisft train --config run.toml

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `setup` joins the process group (NCCL on GPUs,
gloo on CPUs). Every rank holds a full replica of the model and reads its own share of each
optimizer step's micro-batches (see `train.py`); DDP averages the gradients across ranks during
the backward pass, and `optimizer_step` scales each rank's loss by the number of ranks so that the
average is the sum the global loss needs. Launched as a plain `python -m minisft`, none of this
runs: one rank, no group.

With `train.fsdp = true` (for a model that does not fit one GPU) each rank holds only a shard of
every parameter, gradient and AdamW moment instead (FSDP2, `fully_shard`): each Block, then the
rest of the model, is all-gathered for its forward and backward, and the gradients are
reduce-scattered. Checkpoints keep the one-process format: `full_state` gathers whole state dicts
on rank 0, `load_full_state` sends them back out from rank 0.
"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from minisft.errors import ConfigError
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
        local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= gpus:
            raise ConfigError(
                f"torchrun started more processes on this machine than it has GPUs ({gpus}): use "
                f"--nproc_per_node {gpus}, or CUDA_VISIBLE_DEVICES= to train on the CPU (gloo)"
            )
        torch.cuda.set_device(local_rank)  # so the device "cuda" is this rank's GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return ranks()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_across_ranks(value: Tensor) -> Tensor:
    """The sum of `value` over all ranks (in place; the value itself with one rank)."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


class _Loss(nn.Module):
    """DDP syncs the gradients of what its module's forward computes: here, one of the model's
    training methods (`loss` for SFT, `loss_and_base_kl` with train.base_kl, `sequence_log_probs` for
    DPO), named by the caller."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, method: str, *args) -> Tensor:  # the method's arguments, as Replica.run passes them
        return getattr(self.model, method)(*args)


# The model's methods a training step calls instead of forward: FSDP2 gathers parameters for them too.
TRAINING_METHODS = ("loss", "sequence_log_probs")  # loss_and_base_kl: FSDP is refused with it


def shard(model: Transformer) -> None:
    """FSDP2 in place: each Block its own all-gather unit, the rest (embedding, tied head, final
    norm) the root's. The parameters become DTensors: build the optimizer after this."""
    # FSDP's modules are imported here, not at the top: torch.distributed.tensor alone takes ~1 s to
    # import, which every `python -m minisft` command would pay, FSDP or not.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)  # rank 0's weights everywhere, as DDP does on construction
    # The mesh on the model's device: FSDP's default is CUDA wherever a GPU exists, and a CUDA mesh
    # over gloo (a CPU run on a GPU machine) crashed with a segfault.
    mesh = init_device_mesh(model.embed_tokens.weight.device.type, (dist.get_world_size(),))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # `loss` (not only `forward`) gathers the root's parameters: the tied head is used after forward.
    for method in TRAINING_METHODS:
        register_fsdp_forward_method(model, method)


def full_model_state(model: nn.Module) -> dict | None:
    """A model sharded by FSDP2: its whole state dict, on the CPU, on rank 0 (empty on the others) —
    a collective, so every rank calls it. None for a model that is not sharded: its own state_dict()
    is whole. (state_dict() of a sharded model gives each rank's DTensor shards, which a save cannot
    read: "Attempted to access the data pointer on an invalid python storage".)"""
    if not any(is_sharded(p) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_sharded(tensor: Tensor) -> bool:
    """Whether FSDP2 made `tensor` a DTensor (one shard per rank). Only `shard` imports the DTensor
    class, so before it nothing can be one — and this never imports it (see `shard`)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order one process's optimizer.state_dict() numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


class Replica:
    """The model as one rank trains it: `loss` runs through DDP (or FSDP2's hooks) when there are
    several ranks."""

    def __init__(self, model: Transformer, fsdp: bool = False) -> None:
        self.model, self.world = model, ranks().world
        self.fsdp = fsdp and self.world > 1
        if self.fsdp:
            shard(model)
        # DDP broadcasts rank 0's weights on construction, so every replica starts equal.
        self.ddp = DistributedDataParallel(_Loss(model)) if self.world > 1 and not self.fsdp else None

    def loss(
        self,
        input_ids: Tensor,
        labels: Tensor,
        num_trained_tokens: int,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """`Transformer.loss`, through DDP when there is one (DDP syncs what its forward computes)."""
        return self.run("loss", input_ids, labels, num_trained_tokens, position_ids, document_ids)

    def run(self, method: str, *args) -> Tensor:
        """A training method of the model (TRAINING_METHODS), through DDP when there is one."""
        return getattr(self.model, method)(*args) if self.ddp is None else self.ddp(method, *args)

    def sync_gradients(self, now: bool) -> AbstractContextManager:
        """Around a micro-batch's forward and backward: DDP all-reduces its gradients only when
        `now` (the step's last micro-batch); before that they just accumulate on each rank.
        Under FSDP2 every micro-batch's gradients are reduce-scattered into the sharded ones, where
        they add up: holding whole unsharded gradients until the last one would undo the sharding."""
        return nullcontext() if now or self.ddp is None else self.ddp.no_sync()

    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
        """Under FSDP2, (model, optimizer) state dicts as one process's, whole and on the CPU, on rank 0
        (empty on the others); a collective, so every rank calls it. None otherwise: use the model's own."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = full_model_state(self.model)
        by_name = get_optimizer_state_dict(self.model, optimizer, options=options)
        if not by_name:  # not rank 0
            return model_state, {}
        # torch names the parameters by their path in the model; one process's state_dict numbers them.
        index = {name: i for i, name in enumerate(_param_names(self.model, optimizer))}
        optimizer_state = {
            "state": {index[name]: entries for name, entries in by_name["state"].items()},
            "param_groups": [g | {"params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
        }
        return model_state, optimizer_state

    def load_full_state(self, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
        """`full_state`'s inverse under FSDP2: rank 0's whole state dicts, sharded out to every rank."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        names = _param_names(self.model, optimizer)
        by_name = {
            "state": {names[i]: entries for i, entries in optimizer_state["state"].items()},
            "param_groups": [g | {"params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]],
        }
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.model, model_state, options=options)
        set_optimizer_state_dict(self.model, optimizer, by_name, options=options)
