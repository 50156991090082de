"""The built-in demo: the whole SFT story on a tiny model, on a CPU (how long: README, "Set up and run").

1. Make a synthetic domain: sorting letters up or down, and counting them.
2. Pre-train a tiny base model on plain sentences about that domain ("sort d a c : a c d",
   "d a c has 3 letters ."). It learns the operations, but has never seen a chat.
3. SFT it on chat turns (user "sort d a c" -> assistant "a c d") with the loss on the assistant
   tokens only. The chat markers <|im_start|> and <|im_end|> are new to the model.
4. Measure held-out exact match before and after SFT (instruction following), train vs held-out
   SFT loss (overfitting), and plain-text loss before vs after (forgetting); then chat.

Everything is seeded: two runs print the same numbers.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from minisft.bookkeeping import Progress
from minisft.chat import ChatML, Example, render_text
from minisft.checkpoint import save_model
from minisft.generate import generate_greedy
from minisft.model import ModelConfig, Transformer
from minisft.tokenizer import Tokenizer
from minisft.train import TrainConfig, evaluate, train_loop

LETTERS = "abcdefghijklmnop"


@dataclass(frozen=True)
class Task:
    """One operation, said two ways: plain sentences (pre-training) and an instruction (SFT)."""

    name: str
    answer: Callable[[list[str]], str]  # letters -> answer text
    sentences: tuple[str, ...]  # plain-text forms, with {x} and {y} for operand and answer
    instruction: str  # the user turn, with {x}


# The operations depend on which letters are present, not on where they stand: a tiny model
# learns such content-based rules fast, and carries them over from sentences to chat turns.
# (Position-based ones, like reversal, need many more steps than a CPU demo can spend.)
TASKS = (
    Task(
        "sort",
        lambda s: " ".join(sorted(s)),
        ("{x} in order is {y} .", "sort {x} : {y}", "sorting {x} gives {y} ."),
        "sort {x}",
    ),
    Task(
        "sort down",
        lambda s: " ".join(sorted(s, reverse=True)),
        ("{x} from last to first is {y} .", "sort down {x} : {y}", "sorting {x} downwards gives {y} ."),
        "sort down {x}",
    ),
    Task(
        "count",
        lambda s: str(len(s)),
        ("the count of {x} is {y} .", "count {x} : {y}", "{x} has {y} letters ."),
        "count {x}",
    ),
)


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    out_dir: str = "runs/demo"
    pretrain_docs: int = 12000
    sft_pairs: int = 3000
    heldout_pairs: int = 300
    model: ModelConfig = ModelConfig(
        vocab_size=384, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=64
    )
    # No mid-run checkpoints: each stage takes minutes at most, and its model is saved at the end.
    pretrain: TrainConfig = TrainConfig(
        steps=800, batch_size=64, lr=3e-3, warmup_steps=30, eval_every=100, log_every=20, save_every=0
    )
    sft: TrainConfig = TrainConfig(
        steps=300, batch_size=64, lr=6e-4, warmup_steps=10, eval_every=50, log_every=20, save_every=0
    )


def make_items(rng: random.Random, n: int, exclude: set[tuple[str, str]]) -> list[tuple[Task, str, str]]:
    """n random (task, operand, answer) triples, none of whose (task, operand) is in `exclude`."""
    items = []
    while len(items) < n:
        task = rng.choice(TASKS)
        letters = rng.sample(LETTERS, k=rng.randint(3, 6))  # distinct letters, 3 to 6 of them
        x, y = " ".join(letters), task.answer(letters)
        if (task.name, x) not in exclude:
            exclude.add((task.name, x))
            items.append((task, x, y))
    return items


def conversation(task: Task, x: str, y: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": task.instruction.format(x=x)}]
    return turns + ([{"role": "assistant", "content": y}] if y is not None else [])


def answer_all(model: Transformer, chat: ChatML, items: list[tuple[Task, str, str]]) -> list[str]:
    """Greedy answers to the items' instructions, rendered as chat prompts; progress on stderr."""
    prompts = [chat.render_prompt(conversation(task, x)) for task, x, _ in items]
    model.eval()
    outputs = []
    progress = Progress(len(prompts), "answering")
    for start in range(0, len(prompts), 100):
        outputs += generate_greedy(model, prompts[start : start + 100], 16, {chat.end_id, chat.tokenizer.eos_id})
        progress.update(len(outputs), "held-out prompts, greedy")
    return [chat.tokenizer.decode(ids).strip() for ids in outputs]


def exact_match(answers: list[str], items: list[tuple[Task, str, str]]) -> dict[str, float]:
    """Share of answers equal to the expected one: overall ("exact_match") and per task."""
    hits: dict[str, list[bool]] = {}
    for answer, (task, _, y) in zip(answers, items, strict=True):
        hits.setdefault("exact_match", []).append(answer == y)
        hits.setdefault(f"exact_match/{task.name}", []).append(answer == y)
    return {key: sum(values) / len(values) for key, values in hits.items()}


def write_jsonl(path: Path, conversations: list[list[dict[str, str]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": turns}) + "\n" for turns in conversations))


def run_demo(cfg: DemoConfig = DemoConfig()) -> dict[str, float]:
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    seen: set[tuple[str, str]] = set()
    heldout = make_items(rng, cfg.heldout_pairs, seen)  # drawn first, so nothing trained repeats them
    sft_items = make_items(rng, cfg.sft_pairs, seen)
    text_heldout = make_items(rng, cfg.heldout_pairs, seen)
    text_items = make_items(rng, cfg.pretrain_docs, seen)
    sentences = [rng.choice(task.sentences).format(x=x, y=y) for task, x, y in text_items]

    chats = [conversation(*item) for item in sft_items]
    chat_text = [f"{turn['role']}\n{turn['content']}" for turns in chats for turn in turns]
    tokenizer = Tokenizer.train_bpe(sentences + chat_text, cfg.model.vocab_size)
    chat = ChatML(tokenizer)
    model_cfg = replace(cfg.model, vocab_size=tokenizer.vocab_size)
    text_train = [render_text(tokenizer, s) for s in sentences]
    text_eval = [render_text(tokenizer, rng.choice(t.sentences).format(x=x, y=y)) for t, x, y in text_heldout]
    sft_train = [chat.render(turns) for turns in chats]
    sft_eval = [chat.render(conversation(*item)) for item in heldout]
    print(
        f"data: {len(text_train)} plain-text documents, {len(sft_train)} SFT chats "
        f"({sum(e.num_trained_tokens for e in sft_train)} trained tokens), {len(heldout)} held-out chats; "
        f"tokenizer: {tokenizer.vocab_size} tokens"
    )

    out = Path(cfg.out_dir)
    write_jsonl(out / "data" / "sft_train.jsonl", chats)  # what SFT trains on, for a reader to open
    write_jsonl(out / "data" / "sft_heldout.jsonl", [conversation(*item) for item in heldout])
    model = Transformer(model_cfg)
    print(f"model: {model_cfg.num_params() / 1e6:.2f}M parameters")
    print("stage 1: pre-train on plain text")
    train_loop(
        model, text_train, {"plain_text": text_eval}, cfg.pretrain, tokenizer.pad_id, out / "pretrain", "pretrain"
    )
    save_model(out / "pretrain" / "model", model, tokenizer, chat.name)
    base = measure(model, chat, heldout, sft_train, sft_eval, text_eval, cfg)

    print("stage 2: SFT on chats, loss on assistant tokens only")
    model.init_embeddings_as_mean([chat.start_id, chat.end_id])  # never seen in pre-training
    train_loop(model, sft_train, {"sft_heldout": sft_eval}, cfg.sft, tokenizer.pad_id, out / "sft", "sft")
    save_model(out / "sft" / "model", model, tokenizer, chat.name)
    tuned = measure(model, chat, heldout, sft_train, sft_eval, text_eval, cfg)

    print_table(base, tuned)
    answers = answer_all(model, chat, heldout[:2])
    for (task, x, _), answer in zip(heldout[:2], answers, strict=True):
        print(f"\nuser: {task.instruction.format(x=x)}\nassistant: {answer}")
    print(f"\nmodels saved in {out}/pretrain/model and {out}/sft/model; took {time.perf_counter() - t0:.0f} s")
    return {f"base_{k}": v for k, v in base.items()} | {f"sft_{k}": v for k, v in tuned.items()}


def measure(
    model: Transformer,
    chat: ChatML,
    heldout: list[tuple[Task, str, str]],
    sft_train: list[Example],
    sft_eval: list[Example],
    text_eval: list[Example],
    cfg: DemoConfig,
) -> dict[str, float]:
    """Exact match (overall, per task) and the three losses the table reports."""
    pad, bs = chat.tokenizer.pad_id, cfg.sft.eval_batch_size
    return exact_match(answer_all(model, chat, heldout), heldout) | {
        "sft_train_loss": evaluate(model, sft_train[: len(sft_eval)], pad, bs),
        "sft_heldout_loss": evaluate(model, sft_eval, pad, bs),
        "plain_text_loss": evaluate(model, text_eval, pad, bs),
    }


def print_table(base: dict[str, float], tuned: dict[str, float]) -> None:
    rows = [
        ("held-out exact match", "exact_match", "instruction following", "{:.1%}"),
        *[(f"  {task.name}", f"exact_match/{task.name}", "", "{:.1%}") for task in TASKS],
        ("SFT loss, train", "sft_train_loss", "", "{:.3f}"),
        ("SFT loss, held-out", "sft_heldout_loss", "gap to train = overfitting", "{:.3f}"),
        ("plain-text loss, held-out", "plain_text_loss", "rise = forgetting", "{:.3f}"),
    ]
    print(f"\n{'':27}{'base':>10}{'after SFT':>12}   what it shows")
    for name, key, meaning, fmt in rows:
        print(f"{name:27}{fmt.format(base[key]):>10}{fmt.format(tuned[key]):>12}   {meaning}".rstrip())
