"""SFT, then DPO, on a real model: preference tuning teaches what the SFT data never showed.

    python -m minisft demo --model smollm2 --dpo

1. SFT, as the real-model demo (`demo_real.py`) does it, shortened: SmolLM2-135M-Instruct learns to
   triage 200 support tickets into JSON written as `json.dumps` writes it, `{"category": "billing", ...}`.
2. DPO on 200 preference pairs over the same training prompts: chosen is the same JSON written
   compactly, `{"category":"billing",...}` (a fifth fewer tokens, what a log store or a token
   budget prefers), rejected the spaced form SFT taught. The SFT data never holds the compact
   form, so the SFT model prefers the spaced one — the preference is DPO's to teach.
3. Measured after SFT and after DPO, on 60 held-out tickets: held-out preference accuracy (the
   model's log π(compact) > log π(spaced), and DPO's implicit-reward accuracy), the share of greedy
   answers written compact, the task score (every field right; parsing ignores spacing), and the
   forgetting as the SFT demo measures it (general questions, plain-text loss on Alice).

The reference model is the SFT model: its log-probs are computed once before DPO (`dpo.py`).
DPO here carries RPO's SFT term on the chosen answer (`sft_weight`, α = 1) at lr 1e-5. Measured
with these settings: held-out preference accuracy 0% -> 98.3%, every greedy answer compact and
valid, the task score 81.7% -> 78.3% (2 tickets of 60 lower). Plain DPO (α = 0, lr 2e-5) learned the
preference too but collapsed the greedy answers to `{"category:account}` (task score -> 0%). The
README ("After SFT, DPO") has both tables and the token-level reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from minisft.chat import ChatFormat, render_text
from minisft.demo import write_jsonl
from minisft.demo_real import (
    GENERAL_QUESTIONS,
    Phases,
    alice_paragraphs,
    cut,
    general_answers,
    measure,
    open_chat_model,
    with_threads,
)
from minisft.dpo import DPOConfig, DPOObjective, reference_log_probs
from minisft.packing import pack_examples
from minisft.preference import Pair, render_pair
from minisft.tickets import Ticket, make_tickets
from minisft.train import TrainConfig, evaluate, train_loop


@dataclass(frozen=True)
class DPODemoConfig:
    model: str = "smollm2"  # "smollm2" (the packaged GGUF), or a path
    seed: int = 0
    out_dir: str = "runs/demo_dpo"
    train_tickets: int = 200  # SFT's tickets; DPO's pairs are built on the same prompts
    heldout_tickets: int = 60
    sft_epochs: int = 2
    sft_lr: float = 2e-4
    pack_to: int = 512
    rows_per_step: int = 2
    dpo_epochs: int = 1
    pairs_per_step: int = 8
    dpo_lr: float = 1e-5
    beta: float = 0.1
    sft_weight: float = 1.0  # RPO's α (dpo.py): without it greedy answers collapsed (README, "After SFT, DPO")
    threads: int = 1
    general_questions: int = len(GENERAL_QUESTIONS)
    max_plain_text_tokens: int = 256


def compact(answer: str) -> str:
    """The same JSON without the spaces after ':' and ','."""
    return json.dumps(json.loads(answer), separators=(",", ":"))


def preference_pairs(chat: ChatFormat, tickets: list[Ticket]) -> list[Pair]:
    """Prompt = the ticket conversation; chosen = compact JSON, rejected = the spaced JSON SFT taught."""
    answer_only = type(chat)(chat.tokenizer, "last")
    pairs = []
    for t in tickets:
        good = {"role": "assistant", "content": compact(t.answer())}
        bad = {"role": "assistant", "content": t.answer()}
        pairs.append(Pair(*render_pair(answer_only, t.conversation(with_answer=False), good, bad, "demo")))
    return pairs


def preference_accuracy(scored: list[Pair]) -> float:
    """Share of pairs whose chosen answer the model itself finds likelier: log π(chosen) > log π(rejected),
    the pairs scored by the model (`reference_log_probs`)."""
    return sum(p.reference[0] > p.reference[1] for p in scored) / len(scored)


def run_dpo_demo(cfg: DPODemoConfig = DPODemoConfig()) -> dict:
    return with_threads(cfg.threads, lambda threads: _run(cfg, threads))


def _run(cfg: DPODemoConfig, threads: int) -> dict:
    phases = Phases()
    torch.manual_seed(cfg.seed)
    saved, model, tokenizer, chat = open_chat_model(cfg.model)
    train, heldout = make_tickets(cfg.seed, cfg.train_tickets, cfg.heldout_tickets)
    out = Path(cfg.out_dir)
    train_set = chat.render_many([t.conversation() for t in train])
    train_pairs, heldout_pairs = preference_pairs(chat, train), preference_pairs(chat, heldout)
    records = [{"prompt": t.conversation(False), "chosen": compact(t.answer()), "rejected": t.answer()} for t in train]
    write_jsonl(out / "data" / "train_sft.jsonl", [t.conversation() for t in train])
    # The pairs as `python -m minisft dpo` reads them (preference.py's prompt/chosen/rejected layout).
    (out / "data" / "train_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plain_text = [cut(render_text(tokenizer, p), cfg.max_plain_text_tokens) for p in alice_paragraphs()]
    questions = GENERAL_QUESTIONS[: cfg.general_questions]
    pad = tokenizer.pad_id
    print(f"model: {saved.path.name}; {len(train)} SFT tickets = {len(train_pairs)} DPO pairs, {len(heldout)} held out")

    def measured(name: str) -> tuple[dict, list[Pair]]:
        """The model's results, and the held-out pairs it scored (after SFT: DPO's reference log-probs)."""
        losses = {"plain_text": evaluate(model, plain_text, pad, 16, "bf16")}
        scored = []
        if name == "base":  # the base never writes the JSON: only its general knowledge is measured
            result = {"general": general_answers(model, chat, questions), "losses": losses}
        else:
            result = measure(model, chat, heldout, questions, losses)
            result["compact"] = sum(a == compact(a) if valid_json(a) else False for a in result["answers"]) / len(
                heldout
            )
            scored = reference_log_probs(model, heldout_pairs, pad, 16, "bf16")
            result["preference"] = preference_accuracy(scored)
        phases.done(f"{name} measured")
        return result, scored

    base, _ = measured("base")

    # 1. SFT: the spaced JSON.
    steps = math.ceil(len(pack_examples(train_set, cfg.pack_to)) / cfg.rows_per_step) * cfg.sft_epochs
    sft_cfg = TrainConfig(
        steps=steps, batch_size=cfg.rows_per_step, lr=cfg.sft_lr, warmup_steps=10, eval_every=0, log_every=5,
        seed=cfg.seed, save_every=0, threads=threads, precision="bf16",
    )  # fmt: skip
    train_loop(model, train_set, {}, sft_cfg, pad, out / "sft", "sft", cfg.pack_to)
    phases.done("SFT")
    sft, heldout_ref = measured("SFT")

    # 2. DPO: the SFT model is the reference; its log-probs are taken once (the held-out ones just above).
    train_pairs = reference_log_probs(model, train_pairs, pad, 16, "bf16")
    phases.done("reference log-probs")
    dpo_cfg = TrainConfig(
        steps=math.ceil(len(train_pairs) / cfg.pairs_per_step) * cfg.dpo_epochs, batch_size=cfg.pairs_per_step,
        lr=cfg.dpo_lr, warmup_steps=3, eval_every=0, log_every=5, seed=cfg.seed, save_every=0, threads=threads,
        precision="bf16",
    )  # fmt: skip
    objective = DPOObjective(DPOConfig(beta=cfg.beta, sft_weight=cfg.sft_weight))
    train_loop(model, train_pairs, {}, dpo_cfg, pad, out / "dpo", "dpo", objective=objective)
    phases.done("DPO")
    tuned, _ = measured("DPO")
    tuned["implicit"] = objective.evaluate(model, heldout_ref, pad, 16, "bf16")
    print_results(base, sft, tuned, questions, heldout)
    print(phases.report(threads))
    return {"base": base, "sft": sft, "dpo": tuned, "phases": phases.rows}


def valid_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def print_results(base: dict, sft: dict, dpo: dict, questions: tuple, heldout: list[Ticket]) -> None:
    n = len(heldout)
    rows = [
        (
            "held-out preference accuracy",
            sft["preference"],
            dpo["preference"],
            f"log π(compact) > log π(spaced), {n} pairs",
        ),
        ("  implicit reward accuracy", None, dpo["implicit"]["reward_accuracy"], "β·log π/π_ref: chosen > rejected"),
        ("answers written compact", sft["compact"], dpo["compact"], f"greedy, {n} held-out tickets"),
        ("held-out tickets, exact JSON", sft["score"]["exact"], dpo["score"]["exact"], "all 3 fields right"),
        ("  valid JSON of the schema", sft["score"]["valid"], dpo["score"]["valid"], ""),
    ]
    print(f"\n{'':32}{'base':>8}{'after SFT':>12}{'after DPO':>12}   what it shows")
    for name, a, b, meaning in rows:
        first = "—" if a is None else f"{a:.1%}"
        print(f"{name:32}{'—':>8}{first:>12}{b:>12.1%}   {meaning}".rstrip())
    right = [sum(ok for _, ok in r["general"]) for r in (base, sft, dpo)]
    k = len(questions)
    print(f"{'general questions right':32}{right[0]:>5}/{k:<2}{right[1]:>9}/{k:<2}{right[2]:>9}/{k:<2}   forgetting")
    loss = [r["losses"]["plain_text"] for r in (base, sft, dpo)]
    print(f"{'plain-text loss (Alice)':32}{loss[0]:>8.3f}{loss[1]:>12.3f}{loss[2]:>12.3f}   rise = forgetting")
    for i in (0, 1):
        print(f"\nheld-out ticket: {heldout[i].text}")
        print(f"  after SFT: {sft['answers'][i]!r}\n  after DPO: {dpo['answers'][i]!r}")
