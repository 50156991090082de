"""LoRA under data parallel (gloo, CPU): 2 ranks × 2 micro-batches train the adapters one process
accumulating 4 micro-batches does, and rank 0's checkpoints hold the adapters alone."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_distributed import ONE_PROCESS, PER_RANK, train_records
from test_resume import HELDOUT, TRAIN
from test_train_parts import tiny_model

from minisft.lora import LoRAConfig, apply_lora
from minisft.train import train_loop

pytestmark = pytest.mark.usefixtures("one_thread")


def lora_run(run_dir, cfg):
    model = tiny_model(vocab_size=16, max_seq_len=32, seed=0)
    torch.manual_seed(5)  # the adapters' A: the same on every rank (DDP would also broadcast rank 0's)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets="q,v,up"))
    model.lora_base = {"path": "tiny_model(seed=0)", "sha256": "0" * 64}  # what attach_lora records
    train_loop(model, TRAIN, {"heldout": HELDOUT}, cfg, 0, run_dir, "test")
    return model


def rank_main(rank: int, world: int, store: str, run_dir: str, weights: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = lora_run(run_dir, PER_RANK)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    finally:
        dist.destroy_process_group()


def test_lora_on_two_ranks_equals_one_process_with_accumulation(tmp_path):
    weights = tmp_path / "ddp.safetensors"
    mp.spawn(rank_main, args=(2, str(tmp_path / "store"), str(tmp_path / "ddp"), str(weights)), nprocs=2, join=True)
    single = lora_run(tmp_path / "single", ONE_PROCESS)

    ddp = load_file(str(weights))
    trained = [name for name in ddp if "lora_" in name]
    assert len(trained) == 2 * 3 * 2
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp[name], value, atol=1e-6, rtol=0, msg=name)
    base = tiny_model(vocab_size=16, max_seq_len=32, seed=0).state_dict()
    assert all(torch.equal(ddp[name], value) for name, value in base.items())  # the base never moved
    for a, b in zip(train_records(tmp_path / "ddp"), train_records(tmp_path / "single"), strict=True):
        assert a["trained_tokens"] == b["trained_tokens"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-6)
    step = tmp_path / "ddp" / "checkpoints" / "step_6"
    assert not (step / "model.safetensors").exists()
    assert sorted(load_file(str(step / "adapter_model.safetensors"))) == sorted(
        f"base_model.model.model.{name}.weight" for name in trained
    )
