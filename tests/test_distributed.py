"""Data parallel on the CPU (gloo): 2 ranks × 2 micro-batches each train the same weights as one
process accumulating 4 micro-batches — the same global batch, the same global token count."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_resume import CFG, run
from test_train_parts import tiny_model

from minisft.checkpoint import load_checkpoint, step_checkpoints
from minisft.train import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_PROCESS = replace(CFG, steps=6, grad_accum=4, eval_every=3, save_every=3)
PER_RANK = replace(ONE_PROCESS, grad_accum=2)


def rank_main(rank: int, world: int, store: str, run_dir: str, weights: str, pack_to: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = run(run_dir, pack_to, cfg=PER_RANK)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    finally:
        dist.destroy_process_group()


def train_records(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "train_loss" in r]


@pytest.mark.parametrize("pack_to", [0, pytest.param(32, marks=pytest.mark.slow)], ids=["padded", "packed"])
def test_two_ranks_equal_one_process_with_accumulation(tmp_path, pack_to):
    weights = tmp_path / "ddp.safetensors"
    args = (2, str(tmp_path / "store"), str(tmp_path / "ddp"), str(weights), pack_to)
    mp.spawn(rank_main, args=args, nprocs=2, join=True)
    single = run(tmp_path / "single", pack_to, cfg=ONE_PROCESS)

    ddp = load_file(str(weights))
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp[name], value, atol=1e-6, rtol=0, msg=name)
    ddp_records, single_records = train_records(tmp_path / "ddp"), train_records(tmp_path / "single")
    assert [r["step"] for r in ddp_records] == list(range(1, 7))  # rank 0 alone writes: each step once
    for a, b in zip(ddp_records, single_records, strict=True):
        assert a["trained_tokens"] == b["trained_tokens"]  # N counts both ranks' tokens
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-6)
    assert [p.name for p in step_checkpoints(tmp_path / "ddp" / "checkpoints")] == ["step_3", "step_6"]


FSDP = replace(PER_RANK, fsdp=True)


def fsdp_rank_main(rank: int, world: int, store: str, run_dir: str, resumed_dir: str) -> None:
    """An FSDP2 run; then a run resumed from a copy of its step_3 checkpoint (as if stopped at step 4)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        run(run_dir, 0, cfg=FSDP)
        if rank == 0:
            shutil.copytree(Path(run_dir) / "checkpoints" / "step_3", Path(resumed_dir) / "checkpoints" / "step_3")
            shutil.copy(Path(run_dir) / "metrics.jsonl", resumed_dir)
        dist.barrier()
        run(resumed_dir, 0, resume=True, cfg=FSDP)
        # Without this, rank 1 (two FSDP2 models behind it) sometimes aborted at exit ("terminate called
        # without an active exception") while rank 0 was still writing its last checkpoint.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp_equals_one_process_and_writes_the_same_checkpoints(tmp_path):
    """FSDP2 over 2 ranks (tied embeddings, clipping on sharded gradients) trains the weights one
    process does; its checkpoints have the one-process format, load into a plain model, and
    resume under FSDP2 exactly."""
    args = (2, str(tmp_path / "store"), str(tmp_path / "fsdp"), str(tmp_path / "resumed"))
    mp.spawn(fsdp_rank_main, args=args, nprocs=2, join=True)
    single = run(tmp_path / "single", 0, cfg=ONE_PROCESS)
    assert single.lm_head is None  # tied

    fsdp_dir, single_dir = tmp_path / "fsdp" / "checkpoints" / "step_6", tmp_path / "single" / "checkpoints" / "step_6"
    plain = tiny_model(vocab_size=16, max_seq_len=32, seed=1)  # other weights: all must come from the checkpoint
    load_checkpoint(fsdp_dir, plain, make_optimizer(plain, ONE_PROCESS))
    for name, value in single.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)
    fsdp_optimizer, single_optimizer = (load_file(str(d / "optimizer.safetensors")) for d in (fsdp_dir, single_dir))
    assert fsdp_optimizer.keys() == single_optimizer.keys()
    for name, value in single_optimizer.items():
        torch.testing.assert_close(fsdp_optimizer[name], value, atol=1e-6, rtol=0, msg=name)
    assert json.loads((fsdp_dir / "optimizer.json").read_text()) == json.loads(
        (single_dir / "optimizer.json").read_text()
    )
    for a, b in zip(train_records(tmp_path / "fsdp"), train_records(tmp_path / "single"), strict=True):
        assert a["trained_tokens"] == b["trained_tokens"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-6)  # the global norm, not a shard's

    resumed = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_6" / "model.safetensors"))
    for name, value in load_file(str(fsdp_dir / "model.safetensors")).items():
        assert torch.equal(resumed[name], value), name
    assert [r["step"] for r in train_records(tmp_path / "resumed")] == list(range(1, 7))


@pytest.mark.slow  # ~13 s: torchrun and two ranks each import torch
def test_torchrun_fsdp_train_command_saves_the_final_model(tmp_path):
    """`torchrun --nproc_per_node 2 -m minisft train ... --train.fsdp true`, as a user types it: the
    final save gathers the sharded weights on rank 0 (it used to crash in state_dict() of DTensor
    shards, leaving checkpoints/final.tmp); the result is the one-process run's, with 2× accumulation."""
    import os
    import subprocess
    import sys

    from test_resume import write_train_files

    from minisft.checkpoint import load_model

    config = write_train_files(tmp_path, "[train]\nsteps = 4\nbatch_size = 4\nsave_every = 2\neval_every = 2\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # two CPU ranks (gloo), also on a machine with one GPU
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "minisft", "train", "--config", str(config), "--train.fsdp", "true"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "final", "step_2", "step_4"]  # no final.tmp
    final = load_file(str(checkpoints / "final" / "model.safetensors"))
    assert final.keys() == load_file(str(checkpoints / "step_4" / "model.safetensors")).keys()
    for name, value in load_file(str(checkpoints / "step_4" / "model.safetensors")).items():
        assert torch.equal(final[name], value), name

    one = [sys.executable, "-m", "minisft", "train", "--config", str(config), "--out_dir", str(tmp_path / "one")]
    done = subprocess.run([*one, "--train.grad_accum", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # on the CPU too, as the ranks
    single, _, _ = load_model(tmp_path / "one" / "checkpoints" / "final")
    for name, value in single.state_dict().items():
        torch.testing.assert_close(final[name], value, atol=1e-5, rtol=0, msg=name)


def test_more_ranks_than_gpus_is_one_clear_error(monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU machine: a ConfigError naming the fix (the CLI prints
    it in one line), not CUDA's "invalid device ordinal" from deep inside torch."""
    from minisft import distributed
    from minisft.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"than it has GPUs \(1\): use --nproc_per_node 1, or CUDA_VISIBLE_DEVICES="):
        distributed.setup()
