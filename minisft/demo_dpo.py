"""SFT, then DPO, on a real model: preference tuning teaches what the SFT data never showed.

    python -m minisft demo --model smollm2 --dpo

1. SFT, as the real-model demo (`demo_real.py`) does it, shortened: SmolLM2-135M-Instruct learns to
   triage 200 support tickets into JSON written as `json.dumps` writes it,
   `{"category": "billing", "priority": "high", "order_id": null}`.
2. DPO on 200 preference pairs over the same training prompts (`preference`, PREFERENCES):
   "escalate" (the default) — chosen is the same JSON with a field the SFT data never holds,
   `"escalate": true` exactly when the priority is high (a rule the support team now wants), written
   between priority and order_id; rejected the JSON SFT taught. "escalate_last" writes the field after
   order_id; "compact" writes the same JSON without spaces, `{"category":"billing",...}`. Either way
   the SFT model prefers the rejected answer: the preference is DPO's to teach.
3. Measured after SFT and after DPO, on 200 held-out tickets (half in new phrasing; the first 100
   also as pairs): held-out preference accuracy (the model's log π(chosen) > log π(rejected), and
   DPO's implicit-reward accuracy), the share of greedy answers that show the preference, the task
   score (the three fields right; parsing ignores spacing and the escalate field), and the
   forgetting as the SFT demo measures it (general questions, plain-text loss on Alice).

Why the field goes between priority and order_id: DPO's gradient comes from the tokens after the
point where chosen and rejected part (the shared prefix cancels in log π(chosen) − log π(rejected)),
and at that first differing token DPO pushes the rejected token down, the freed probability going
wherever the softmax sends it. There the pair parts at a key (` "` then `esc` vs `order`), after
the category and the priority are written, and both answers then write the same order_id tokens. After
order_id, it parts at the token that closes a string order number (`"}` vs `",`: one BPE token with the
quote), and DPO pushed order numbers on into `"])` or more digits; the compact form parts at the first
key and moves the order_id null-or-string decision onto a token DPO promotes (README, "After SFT, DPO",
all three measured).

The reference model is the SFT model: its log-probs of a preference's pairs are computed once and
stored beside it (sft/reference_NAME.json). DPO here carries RPO's SFT term on the chosen answer
(`sft_weight`, α = 1) at lr 1e-5. bf16 autocast only where the CPU multiplies bf16 natively;
elsewhere fp32 (`precision`).

In parts: the SFT stage — the SFT model (OUT_DIR/sft/model) and its measurements (sft/stage.json,
written last) — is saved, and a rerun with the same SFT settings reads it back instead of redoing
it, and says so: only DPO runs again (and the reference log-probs of a preference not seen before).
A stage made with other SFT settings is refused, never replaced. `sft_dir` points a run at another
run's stage (`benchmarks/dpo_variants.py` runs DPO variants so). Each held-out ticket's answers
after SFT and after DPO are in OUT_DIR/answers.jsonl, the printed numbers in OUT_DIR/results.json.
Measured numbers and the variants: README, "After SFT, DPO".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from minisft.chat import ChatFormat
from minisft.checkpoint import save_model
from minisft.demo import write_jsonl
from minisft.demo_real import (
    GENERAL_QUESTIONS,
    PLAIN_TEXT_LOSS,
    Phases,
    alice_examples,
    general_answers,
    measure,
    open_chat_model,
    with_threads,
)
from minisft.dpo import DPOConfig, DPOObjective, pair_log_probs
from minisft.errors import ConfigError
from minisft.integrity import read_json, write_atomically
from minisft.packing import pack_examples
from minisft.preference import Pair, render_pair
from minisft.tickets import Ticket, is_exact, make_tickets
from minisft.train import TrainConfig, cpu_precision, evaluate, train_loop

STAGE_FILE = "stage.json"  # in the SFT folder, written last: the SFT stage's results, its model beside it
# The settings the SFT stage depends on: a saved stage is reused only when they all match (and when its
# plain-text loss was measured as now: PLAIN_TEXT_LOSS).
SFT_SETTINGS = (
    "model", "seed", "train_tickets", "heldout_tickets", "preference_tickets", "sft_epochs", "sft_lr", "pack_to",
    "rows_per_step", "general_questions", "max_plain_text_tokens", "precision",
)  # fmt: skip
ANSWER_TOKENS = 48  # a greedy answer's budget: the JSON with the escalate field is 33 tokens, SFT's at most 26
FIELD = "escalate"  # the "escalate" preference's field


def compact(answer: str) -> str:
    """The same JSON without the spaces after ':' and ','."""
    return json.dumps(json.loads(answer), separators=(",", ":"))


def escalated(ticket: Ticket, last: bool = False) -> str:
    """The ticket's JSON with the field SFT never taught — escalate exactly the high-priority tickets —
    between priority and order_id, or (last) after order_id."""
    flag = {FIELD: ticket.priority == "high"}
    if last:
        return json.dumps(json.loads(ticket.answer()) | flag)
    return json.dumps({"category": ticket.category, "priority": ticket.priority} | flag | {"order_id": ticket.order_id})


def parsed(answer: str) -> dict | None:
    try:
        value = json.loads(answer)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def task_fields(answer: str) -> str:
    """The answer as the task score reads it: without the escalate field, which is the preference's."""
    value = parsed(answer)
    return json.dumps({k: v for k, v in value.items() if k != FIELD}) if value and FIELD in value else answer


@dataclass(frozen=True)
class Preference:
    """What DPO's pairs teach: the chosen answer (the rejected one is the JSON SFT taught), and
    whether a greedy answer to a ticket shows the preference."""

    chosen: Callable[[Ticket], str]
    shows: Callable[[str, Ticket], bool]
    says: str  # what `shows` counts, for the printout


def flagged(answer: str, ticket: Ticket) -> bool:
    """Whether the answer holds the escalate flag the ticket's priority calls for."""
    return (parsed(answer) or {}).get(FIELD, None) is (ticket.priority == "high")


PREFERENCES = {
    "escalate": Preference(escalated, flagged, 'with "escalate" right'),
    "escalate_last": Preference(lambda t: escalated(t, last=True), flagged, 'with "escalate" right'),
    "compact": Preference(lambda t: compact(t.answer()), lambda a, t: parsed(a) is not None and a == compact(a),
                          "written compact"),
}  # fmt: skip


@dataclass(frozen=True)
class DPODemoConfig:
    model: str = "smollm2"  # "smollm2" (the packaged GGUF), or a path
    seed: int = 0
    out_dir: str = "runs/demo_dpo"
    sft_dir: str = ""  # the SFT stage's folder (default OUT_DIR/sft): made when absent, reused when its settings match
    train_tickets: int = 200  # SFT's tickets; DPO's pairs are built on the same prompts
    heldout_tickets: int = 200  # the task score's: 0.5 points a ticket
    preference_tickets: int = 100  # the first of the held-out ones, scored as pairs (2 forward passes each)
    sft_epochs: int = 2
    sft_lr: float = 2e-4
    pack_to: int = 512
    rows_per_step: int = 2
    preference: str = "escalate"  # what DPO teaches: a key of PREFERENCES
    dpo_epochs: int = 1
    pairs_per_step: int = 8
    dpo_lr: float = 1e-5
    beta: float = 0.1
    sft_weight: float = 1.0  # RPO's α (dpo.py): without it greedy answers collapsed (README, "After SFT, DPO")
    threads: int = 1
    # "bf16" (autocast) or "fp32"; by default bf16 only where the CPU multiplies it natively
    precision: str = field(default_factory=cpu_precision)
    general_questions: int = len(GENERAL_QUESTIONS)
    max_plain_text_tokens: int = 256


def preference_pairs(chat: ChatFormat, tickets: list[Ticket], preference: Preference) -> list[Pair]:
    """Prompt = the ticket conversation; chosen = the preference's answer, rejected = the JSON SFT taught."""
    answer_only = type(chat)(chat.tokenizer, "last")
    pairs = []
    for t in tickets:
        good = {"role": "assistant", "content": preference.chosen(t)}
        bad = {"role": "assistant", "content": t.answer()}
        pairs.append(Pair(*render_pair(answer_only, t.conversation(with_answer=False), good, bad, "demo")))
    return pairs


def share(hits: torch.Tensor) -> float:
    return float(hits.float().mean())


def stage_settings(cfg: DPODemoConfig) -> dict:
    return {key: getattr(cfg, key) for key in SFT_SETTINGS} | {"plain_text_loss": PLAIN_TEXT_LOSS}


def saved_sft_stage(folder: Path, cfg: DPODemoConfig) -> dict | None:
    """The SFT stage an earlier run left in `folder`, or None when there is none; one made with other
    settings is refused (never replaced: the folder may hold a model someone wants)."""
    if not (folder / STAGE_FILE).is_file():
        return None
    stage = read_json(folder / STAGE_FILE)
    now = stage_settings(cfg)
    changed = [f"{key} {stage['settings'].get(key)!r}, now {value!r}" for key, value in now.items()
               if stage["settings"].get(key) != value]  # fmt: skip
    if changed:
        raise ConfigError(
            f"{folder} holds an SFT stage made with other settings ({'; '.join(changed)}): "
            "remove that folder to redo SFT, or give another out_dir"
        )
    return stage


def run_dpo_demo(cfg: DPODemoConfig = DPODemoConfig()) -> dict:
    if cfg.preference not in PREFERENCES:
        raise ConfigError(f"preference {cfg.preference!r} is not one of {', '.join(PREFERENCES)}")
    return with_threads(cfg.threads, lambda threads: _run(cfg, threads))


def _run(cfg: DPODemoConfig, threads: int) -> dict:
    precision = cfg.precision
    preference = PREFERENCES[cfg.preference]
    phases = Phases()
    out = Path(cfg.out_dir)
    sft_dir = Path(cfg.sft_dir) if cfg.sft_dir else out / "sft"
    stage = saved_sft_stage(sft_dir, cfg)
    torch.manual_seed(cfg.seed)
    saved, model, tokenizer, chat = open_chat_model(str(sft_dir / "model") if stage else cfg.model)
    train, heldout = make_tickets(cfg.seed, cfg.train_tickets, cfg.heldout_tickets)
    train_set = chat.render_many([t.conversation() for t in train])
    train_pairs = preference_pairs(chat, train, preference)
    heldout_pairs = preference_pairs(chat, heldout[: cfg.preference_tickets], preference)
    records = [{"prompt": t.conversation(False), "chosen": preference.chosen(t), "rejected": t.answer()} for t in train]
    write_jsonl(out / "data" / "train_sft.jsonl", [t.conversation() for t in train])
    # The pairs as `python -m minisft dpo` reads them (preference.py's prompt/chosen/rejected layout).
    (out / "data" / "train_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plain_text = alice_examples(tokenizer, cfg.max_plain_text_tokens)
    questions = GENERAL_QUESTIONS[: cfg.general_questions]
    pad = tokenizer.pad_id
    print(
        f"model: {saved.path}; {len(train)} SFT tickets = {len(train_pairs)} DPO pairs ({cfg.preference}), "
        f"{len(heldout)} held out (the first {len(heldout_pairs)} also as pairs); {precision} matmuls on "
        f"{threads} thread(s)"
    )
    phases.done("load")

    def measured(name: str) -> dict:
        """The model's general answers and plain-text loss, and but for the base its held-out task answers and score."""
        losses = {"plain_text": evaluate(model, plain_text, pad, 16, precision)}
        if name == "base":  # the base never writes the JSON: only its general knowledge is measured
            result = {"general": general_answers(model, chat, questions, precision), "losses": losses}
        else:
            result = measure(model, chat, heldout, questions, losses, precision, ANSWER_TOKENS, task_fields)
        phases.done(f"{name} measured")
        return result

    def preferred(result: dict, logps: torch.Tensor) -> dict:
        """The result with how far it shows the preference: held-out pairs ranked, greedy answers showing it."""
        shows = [preference.shows(a, t) for a, t in zip(result["answers"], heldout, strict=True)]
        return result | {"preference": share(logps[:, 0] > logps[:, 1]), "shows": share(torch.tensor(shows))}

    if stage is None:
        base = measured("base")

        # 1. SFT: the JSON as json.dumps writes it.
        steps = math.ceil(len(pack_examples(train_set, cfg.pack_to)) / cfg.rows_per_step) * cfg.sft_epochs
        sft_cfg = TrainConfig(
            steps=steps, batch_size=cfg.rows_per_step, lr=cfg.sft_lr, warmup_steps=10, eval_every=0, log_every=5,
            seed=cfg.seed, save_every=0, threads=threads, precision=precision,
        )  # fmt: skip
        (sft_dir / "metrics.jsonl").unlink(missing_ok=True)  # this run's numbers only
        train_loop(model, train_set, {}, sft_cfg, pad, sft_dir, "sft", cfg.pack_to)
        phases.done("SFT")
        sft = measured("SFT")
        save_model(sft_dir / "model", model, tokenizer, chat.name)
        stage = {"settings": stage_settings(cfg), "base": base, "sft": sft,
                 "phases": phases.rows}  # fmt: skip
        write_atomically(sft_dir / STAGE_FILE, lambda tmp: Path(tmp).write_text(json.dumps(stage)))
        print(f"saved the SFT stage in {sft_dir} (its model and results): a rerun starts from it")
    else:
        made = sum(wall for _, wall, _ in stage["phases"])
        print(
            f"reusing the SFT stage in {sft_dir}: made with these settings ({made:.0f} s then); its model and "
            "results are read back, not recomputed (remove that folder to redo SFT)"
        )

    # DPO's reference is the SFT model: its log-probs of this preference's pairs, taken once and kept.
    reference_file = sft_dir / f"reference_{cfg.preference}.json"
    if reference_file.is_file():
        reference = read_json(reference_file)
    else:
        reference = {
            "train": pair_log_probs(model, train_pairs, pad, 16, precision).tolist(),
            "heldout": pair_log_probs(model, heldout_pairs, pad, 16, precision).tolist(),
        }
        write_atomically(reference_file, lambda tmp: Path(tmp).write_text(json.dumps(reference)))
        phases.done("reference log-probs")
    sft = preferred(stage["sft"], torch.tensor(reference["heldout"]))

    # 2. DPO from the SFT model, against its stored log-probs.
    train_pairs = [replace(p, reference=tuple(r)) for p, r in zip(train_pairs, reference["train"], strict=True)]
    dpo_cfg = TrainConfig(
        steps=math.ceil(len(train_pairs) / cfg.pairs_per_step) * cfg.dpo_epochs, batch_size=cfg.pairs_per_step,
        lr=cfg.dpo_lr, warmup_steps=3, eval_every=0, log_every=5, seed=cfg.seed, save_every=0, threads=threads,
        precision=precision,
    )  # fmt: skip
    objective = DPOObjective(DPOConfig(beta=cfg.beta, sft_weight=cfg.sft_weight))
    (out / "dpo" / "metrics.jsonl").unlink(missing_ok=True)
    train_loop(model, train_pairs, {}, dpo_cfg, pad, out / "dpo", "dpo", objective=objective)
    phases.done("DPO")
    logps = pair_log_probs(model, heldout_pairs, pad, 16, precision)
    tuned = preferred(measured("DPO"), logps)
    ratios = logps - torch.tensor(reference["heldout"])  # β·(log π − log π_ref) up to β
    tuned["implicit"] = share(ratios[:, 0] > ratios[:, 1])
    write_answers(out / "answers.jsonl", heldout, sft, tuned)
    print_results(stage["base"], sft, tuned, questions, heldout, len(heldout_pairs), preference)
    print(phases.report(threads))
    result = {"config": asdict(cfg), "base": stage["base"], "sft": sft, "dpo": tuned, "phases": phases.rows}
    result["load_average"] = [phases.load_start, os.getloadavg()[0]]  # at the start and the end
    write_atomically(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    return result


def exact(answer: str, ticket: Ticket) -> bool:
    """The task's three fields right (the escalate field is the preference's, not the task's)."""
    return is_exact(task_fields(answer), ticket)


def write_answers(path: Path, heldout: list[Ticket], sft: dict, dpo: dict) -> None:
    """One line per held-out ticket: its text, the right answer, and each model's answer and whether it is right."""
    lines = []
    for i, (ticket, before, after) in enumerate(zip(heldout, sft["answers"], dpo["answers"], strict=True)):
        row = {"ticket": i, "new_phrasing": ticket.new_phrasing, "text": ticket.text, "expected": ticket.answer()}
        row |= {"sft": before, "dpo": after, "sft_exact": exact(before, ticket), "dpo_exact": exact(after, ticket)}
        lines.append(json.dumps(row) + "\n")
    write_atomically(path, lambda tmp: Path(tmp).write_text("".join(lines)))


def lost_and_won(heldout: list[Ticket], before: list[str], after: list[str]) -> tuple[int, int]:
    """How many held-out tickets were right before and wrong after, and the other way round."""
    right = [[exact(a, t) for a, t in zip(answers, heldout, strict=True)] for answers in (before, after)]
    return tuple(sum(a and not b for a, b in zip(*pair, strict=True)) for pair in (right, right[::-1]))


def print_results(
    base: dict, sft: dict, dpo: dict, questions: tuple, heldout: list[Ticket], pairs: int, preference: Preference
) -> None:
    n = len(heldout)
    rows = [
        ("held-out preference accuracy", sft["preference"], dpo["preference"],
         f"log π(chosen) > log π(rejected), {pairs} pairs"),
        ("  implicit reward accuracy", None, dpo["implicit"], "β·log π/π_ref: chosen > rejected"),
        (f"answers {preference.says}", sft["shows"], dpo["shows"], f"greedy, {n} held-out tickets"),
        ("held-out tickets, exact JSON", sft["score"]["exact"], dpo["score"]["exact"], "all 3 fields right"),
        ("  in seen phrasing", sft["score"]["exact/seen"], dpo["score"]["exact/seen"], ""),
        ("  in new phrasing", sft["score"]["exact/new"], dpo["score"]["exact/new"], ""),
        ("  valid JSON of the schema", sft["score"]["valid"], dpo["score"]["valid"], ""),
    ]  # fmt: skip
    print(f"\n{'':32}{'base':>8}{'after SFT':>12}{'after DPO':>12}   what it shows")
    for name, a, b, meaning in rows:
        first = "—" if a is None else f"{a:.1%}"
        print(f"{name:32}{'—':>8}{first:>12}{b:>12.1%}   {meaning}".rstrip())
    right = [sum(ok for _, ok in r["general"]) for r in (base, sft, dpo)]
    k = len(questions)
    print(f"{'general questions right':32}{right[0]:>5}/{k:<2}{right[1]:>9}/{k:<2}{right[2]:>9}/{k:<2}   forgetting")
    loss = [r["losses"]["plain_text"] for r in (base, sft, dpo)]
    print(f"{'plain-text loss (Alice)':32}{loss[0]:>8.3f}{loss[1]:>12.3f}{loss[2]:>12.3f}   rise = forgetting")
    lost, won = lost_and_won(heldout, sft["answers"], dpo["answers"])
    print(f"held-out tickets right after SFT and wrong after DPO: {lost}; the other way round: {won} (answers.jsonl)")
    for i in (0, 1):
        print(f"\nheld-out ticket: {heldout[i].text}")
        print(f"  after SFT: {sft['answers'][i]!r}\n  after DPO: {dpo['answers'][i]!r}")
