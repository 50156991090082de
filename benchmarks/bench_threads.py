"""CPU threads for training on a shared machine: 1, 2 and torch's default, alone and beside a competing process.

    python benchmarks/bench_threads.py [--steps 8] [--shape demo|wide]

Each row is a fresh process that builds a model, trains 2 untimed steps, then `--steps` timed
optimizer steps (AdamW, fp32, the loop's own `optimizer_step`) on the same seeded batches, and
reports tokens/s and the last loss (equal losses: the thread count changes the speed, not the
maths, up to rounding). Shapes:

    demo   the built-in demo's model: 0.83M parameters, batches of 64 rows × 24 tokens
    wide   a 25M-parameter model (dim 512, 8 layers, vocab 8192): batches of 8 rows × 256 tokens

Conditions: "alone" runs nothing else of ours (the machine may still be busy: the load average
before each row is printed beside it, and an idle row needs an idle machine); "competing" runs a
second process doing 2-thread fp32 matmuls for the whole row, like another engineer's job.
Rows alternate so a change in the machine's load hits every thread count alike.

Torch's default is one thread per core. When another process holds a core, OpenMP's threads wait
for each other at every parallel region's barrier, so a step waits for the slowest of them.
Results go to benchmarks/results/threads.md, with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import cpu_facts, markdown_table, save_results  # noqa: E402

SHAPES = {  # ModelConfig fields, and each batch's rows × tokens
    "demo": (dict(vocab_size=384, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384), 64, 24),
    "wide": (dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536), 8, 256),
}
THREADS = ("1", "2", "default")
COMPETITOR = "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"


def child(threads: str, shape: str, steps: int) -> dict:
    """One row, in this process: train and time `steps` optimizer steps."""
    import torch

    from minisft.distributed import Replica
    from minisft.model import ModelConfig, Transformer
    from minisft.packing import Batch
    from minisft.train import TrainConfig, make_optimizer, optimizer_step

    if threads != "default":
        torch.set_num_threads(int(threads))
    fields, rows, T = SHAPES[shape]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**fields, max_seq_len=T))
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, fields["vocab_size"], (rows, T + 1), generator=generator) for _ in range(steps + 2)]
    replica, times, loss = Replica(model), [], 0.0
    for ids in batches:
        start = time.perf_counter()
        loss, _, _ = optimizer_step(replica, optimizer, [Batch(ids[:, :-1], ids[:, 1:])], rows * T, grad_clip=1.0)
        times.append(time.perf_counter() - start)
    timed = sum(times[2:])
    return {"threads_used": torch.get_num_threads(), "tokens_per_s": steps * rows * T / timed, "loss": loss}


def row(threads: str, shape: str, steps: int, condition: str) -> dict:
    load = os.getloadavg()[0]
    command = [sys.executable, __file__, "--child", threads, "--shape", shape, "--steps", str(steps)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout)
    return {"condition": condition, "threads": threads, "load before": f"{load:.2f}", **result}


def measure(shape: str, steps: int) -> list[dict]:
    rows = []
    for condition in ("alone", "competing"):
        competitor = None
        if condition == "competing":
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR])
            time.sleep(2)  # let it start its threads
        try:
            for threads in THREADS:
                rows.append(row(threads, shape, steps, condition))
                print(rows[-1], flush=True)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per row")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the thread count of one row, in a subprocess
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.steps)))
        return
    facts = cpu_facts() | {"shape": args.shape, "steps": args.steps, "load at start": f"{os.getloadavg()}"}
    rows = measure(args.shape, args.steps)
    for r in rows:
        one = next(o for o in rows if o["condition"] == r["condition"] and o["threads"] == "1")
        r["× vs 1 thread"] = round(r["tokens_per_s"] / one["tokens_per_s"], 2)
        r["tokens_per_s"] = round(r["tokens_per_s"])
        r["loss"] = f"{r['loss']:.7f}"
    table = markdown_table(rows)
    print(table)
    save_results(f"threads_{args.shape}", facts | {"load at end": f"{os.getloadavg()}"}, rows, table)


if __name__ == "__main__":
    main()
