"""Data parallel on the CPU (gloo): 2 ranks × 2 micro-batches each train the same weights as one
process accumulating 4 micro-batches — the same global batch, the same global token count."""

import json
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_resume import CFG, run

from minisft.checkpoint import step_checkpoints

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
