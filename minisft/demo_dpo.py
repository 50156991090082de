"""SFT, then DPO, on a real model: preference tuning teaches what the SFT data never showed.

    python -m minisft demo --model smollm2 --dpo

1. SFT, as the real-model demo (`demo_real.py`) does it, shortened: SmolLM2-135M-Instruct learns to
   triage 200 support tickets into JSON written as `json.dumps` writes it, `{"category": "billing", ...}`.
2. DPO on 200 preference pairs over the same training prompts: chosen is the same JSON written
   compactly, `{"category":"billing",...}` (a fifth fewer tokens, what a log store or a token
   budget prefers), rejected the spaced form SFT taught. The SFT data never holds the compact
   form, so the SFT model prefers the spaced one — the preference is DPO's to teach.
3. Measured after SFT and after DPO, on 200 held-out tickets (half in new phrasing; the first 100
   also as pairs): held-out preference accuracy (the model's log π(compact) > log π(spaced), and
   DPO's implicit-reward accuracy), the share of greedy answers written compact, the task score
   (every field right; parsing ignores spacing), and the forgetting as the SFT demo measures it
   (general questions, plain-text loss on Alice).

The reference model is the SFT model: its log-probs are computed once before DPO (`dpo.py`). DPO
here carries RPO's SFT term on the chosen answer (`sft_weight`, α = 1) at lr 1e-5. bf16 autocast only
where the CPU multiplies bf16 natively; elsewhere fp32 (`precision`).

In parts: the SFT stage — the SFT model (OUT_DIR/sft/model), its measurements and the reference
log-probs of every pair (sft/stage.json, written last) — is saved, and a rerun with the same SFT
settings reads it back instead of redoing it, and says so: only DPO runs again. A stage made with
other SFT settings is refused, never replaced. `sft_dir` points a run at another run's stage
(`benchmarks/dpo_variants.py` runs DPO variants so). Each held-out ticket's answers after SFT and
after DPO are in OUT_DIR/answers.jsonl, the printed numbers in OUT_DIR/results.json. Measured
numbers and the variants: README, "After SFT, DPO".
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from minisft.chat import ChatFormat, render_text
from minisft.checkpoint import save_model
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
from minisft.dpo import DPOConfig, DPOObjective, pair_log_probs
from minisft.errors import ConfigError
from minisft.integrity import read_json, write_atomically
from minisft.packing import pack_examples
from minisft.preference import Pair, render_pair
from minisft.tickets import Ticket, is_exact, make_tickets
from minisft.train import TrainConfig, cpu_precision, evaluate, train_loop

STAGE_FILE = "stage.json"  # in the SFT folder, written last: the SFT stage's results, its model beside it
# The settings the SFT stage depends on: a saved stage is reused only when they all match.
SFT_SETTINGS = (
    "model", "seed", "train_tickets", "heldout_tickets", "preference_tickets", "sft_epochs", "sft_lr", "pack_to",
    "rows_per_step", "general_questions", "max_plain_text_tokens", "precision",
)  # fmt: skip


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


def share(hits: torch.Tensor) -> float:
    return float(hits.float().mean())


def saved_sft_stage(folder: Path, cfg: DPODemoConfig) -> dict | None:
    """The SFT stage an earlier run left in `folder`, or None when there is none; one made with other
    settings is refused (never replaced: the folder may hold a model someone wants)."""
    if not (folder / STAGE_FILE).is_file():
        return None
    stage = read_json(folder / STAGE_FILE)
    now = {key: getattr(cfg, key) for key in SFT_SETTINGS}
    changed = [f"{key} {stage['settings'].get(key)!r}, now {value!r}" for key, value in now.items()
               if stage["settings"].get(key) != value]  # fmt: skip
    if changed:
        raise ConfigError(
            f"{folder} holds an SFT stage made with other settings ({'; '.join(changed)}): "
            "remove that folder to redo SFT, or give another out_dir"
        )
    return stage


def run_dpo_demo(cfg: DPODemoConfig = DPODemoConfig()) -> dict:
    return with_threads(cfg.threads, lambda threads: _run(cfg, threads))


def _run(cfg: DPODemoConfig, threads: int) -> dict:
    precision = cfg.precision
    phases = Phases()
    out = Path(cfg.out_dir)
    sft_dir = Path(cfg.sft_dir) if cfg.sft_dir else out / "sft"
    stage = saved_sft_stage(sft_dir, cfg)
    torch.manual_seed(cfg.seed)
    saved, model, tokenizer, chat = open_chat_model(str(sft_dir / "model") if stage else cfg.model)
    train, heldout = make_tickets(cfg.seed, cfg.train_tickets, cfg.heldout_tickets)
    train_set = chat.render_many([t.conversation() for t in train])
    train_pairs = preference_pairs(chat, train)
    heldout_pairs = preference_pairs(chat, heldout[: cfg.preference_tickets])
    records = [{"prompt": t.conversation(False), "chosen": compact(t.answer()), "rejected": t.answer()} for t in train]
    write_jsonl(out / "data" / "train_sft.jsonl", [t.conversation() for t in train])
    # The pairs as `python -m minisft dpo` reads them (preference.py's prompt/chosen/rejected layout).
    (out / "data" / "train_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plain_text = [cut(render_text(tokenizer, p), cfg.max_plain_text_tokens) for p in alice_paragraphs()]
    questions = GENERAL_QUESTIONS[: cfg.general_questions]
    pad = tokenizer.pad_id
    print(
        f"model: {saved.path}; {len(train)} SFT tickets = {len(train_pairs)} DPO pairs, {len(heldout)} held out "
        f"(the first {len(heldout_pairs)} also as pairs); {precision} matmuls on {threads} thread(s)"
    )
    phases.done("load")

    def measured(name: str) -> tuple[dict, torch.Tensor | None]:
        """The model's results, and its (P, 2) log-probs of the held-out pairs (after SFT: DPO's reference)."""
        losses = {"plain_text": evaluate(model, plain_text, pad, 16, precision)}
        logps = None
        if name == "base":  # the base never writes the JSON: only its general knowledge is measured
            result = {"general": general_answers(model, chat, questions, precision), "losses": losses}
        else:
            result = measure(model, chat, heldout, questions, losses, precision)
            result["compact"] = share(
                torch.tensor([a == compact(a) if valid_json(a) else False for a in result["answers"]])
            )
            logps = pair_log_probs(model, heldout_pairs, pad, 16, precision)
            result["preference"] = share(logps[:, 0] > logps[:, 1])  # log π(compact) > log π(spaced)
        phases.done(f"{name} measured")
        return result, logps

    if stage is None:
        base, _ = measured("base")

        # 1. SFT: the spaced JSON.
        steps = math.ceil(len(pack_examples(train_set, cfg.pack_to)) / cfg.rows_per_step) * cfg.sft_epochs
        sft_cfg = TrainConfig(
            steps=steps, batch_size=cfg.rows_per_step, lr=cfg.sft_lr, warmup_steps=10, eval_every=0, log_every=5,
            seed=cfg.seed, save_every=0, threads=threads, precision=precision,
        )  # fmt: skip
        (sft_dir / "metrics.jsonl").unlink(missing_ok=True)  # this run's numbers only
        train_loop(model, train_set, {}, sft_cfg, pad, sft_dir, "sft", cfg.pack_to)
        phases.done("SFT")
        sft, heldout_logps = measured("SFT")
        # DPO's reference is the SFT model: its log-probs, taken once (the held-out ones just above).
        train_logps = pair_log_probs(model, train_pairs, pad, 16, precision)
        phases.done("reference log-probs")
        save_model(sft_dir / "model", model, tokenizer, chat.name)
        stage = {
            "settings": {key: getattr(cfg, key) for key in SFT_SETTINGS}, "base": base, "sft": sft,
            "reference": {"train": train_logps.tolist(), "heldout": heldout_logps.tolist()}, "phases": phases.rows,
        }  # fmt: skip
        write_atomically(sft_dir / STAGE_FILE, lambda tmp: Path(tmp).write_text(json.dumps(stage)))
        print(f"saved the SFT stage in {sft_dir} (its model, results and reference log-probs): a rerun starts from it")
    else:
        made = sum(wall for _, wall, _ in stage["phases"])
        print(
            f"reusing the SFT stage in {sft_dir}: made with these settings ({made:.0f} s then); its model, results "
            "and reference log-probs are read back, not recomputed (remove that folder to redo SFT)"
        )

    # 2. DPO from the SFT model, against its stored log-probs.
    train_pairs = [
        replace(p, reference=tuple(r)) for p, r in zip(train_pairs, stage["reference"]["train"], strict=True)
    ]
    dpo_cfg = TrainConfig(
        steps=math.ceil(len(train_pairs) / cfg.pairs_per_step) * cfg.dpo_epochs, batch_size=cfg.pairs_per_step,
        lr=cfg.dpo_lr, warmup_steps=3, eval_every=0, log_every=5, seed=cfg.seed, save_every=0, threads=threads,
        precision=precision,
    )  # fmt: skip
    objective = DPOObjective(DPOConfig(beta=cfg.beta, sft_weight=cfg.sft_weight))
    (out / "dpo" / "metrics.jsonl").unlink(missing_ok=True)
    train_loop(model, train_pairs, {}, dpo_cfg, pad, out / "dpo", "dpo", objective=objective)
    phases.done("DPO")
    tuned, logps = measured("DPO")
    ratios = logps - torch.tensor(stage["reference"]["heldout"])  # β·(log π − log π_ref) up to β
    tuned["implicit"] = share(ratios[:, 0] > ratios[:, 1])
    write_answers(out / "answers.jsonl", heldout, stage["sft"], tuned)
    print_results(stage["base"], stage["sft"], tuned, questions, heldout, len(heldout_pairs))
    print(phases.report(threads))
    result = {"config": asdict(cfg), "base": stage["base"], "sft": stage["sft"], "dpo": tuned, "phases": phases.rows}
    result["load_average"] = [phases.load_start, os.getloadavg()[0]]  # at the start and the end
    write_atomically(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    return result


def write_answers(path: Path, heldout: list[Ticket], sft: dict, dpo: dict) -> None:
    """One line per held-out ticket: its text, the right answer, and each model's answer and whether it is right."""
    lines = []
    for i, (ticket, before, after) in enumerate(zip(heldout, sft["answers"], dpo["answers"], strict=True)):
        row = {"ticket": i, "new_phrasing": ticket.new_phrasing, "text": ticket.text, "expected": ticket.answer()}
        row |= {"sft": before, "dpo": after, "sft_exact": is_exact(before, ticket)}
        row["dpo_exact"] = is_exact(after, ticket)
        lines.append(json.dumps(row) + "\n")
    write_atomically(path, lambda tmp: Path(tmp).write_text("".join(lines)))


def lost_and_won(heldout: list[Ticket], before: list[str], after: list[str]) -> tuple[int, int]:
    """How many held-out tickets were right before and wrong after, and the other way round."""
    right = [[is_exact(a, t) for a, t in zip(answers, heldout, strict=True)] for answers in (before, after)]
    return tuple(sum(a and not b for a, b in zip(*pair, strict=True)) for pair in (right, right[::-1]))


def valid_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def print_results(base: dict, sft: dict, dpo: dict, questions: tuple, heldout: list[Ticket], pairs: int) -> None:
    n = len(heldout)
    rows = [
        (
            "held-out preference accuracy",
            sft["preference"],
            dpo["preference"],
            f"log π(compact) > log π(spaced), {pairs} pairs",
        ),
        ("  implicit reward accuracy", None, dpo["implicit"], "β·log π/π_ref: chosen > rejected"),
        ("answers written compact", sft["compact"], dpo["compact"], f"greedy, {n} held-out tickets"),
        ("held-out tickets, exact JSON", sft["score"]["exact"], dpo["score"]["exact"], "all 3 fields right"),
        ("  in seen phrasing", sft["score"]["exact/seen"], dpo["score"]["exact/seen"], ""),
        ("  in new phrasing", sft["score"]["exact/new"], dpo["score"]["exact/new"], ""),
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
    lost, won = lost_and_won(heldout, sft["answers"], dpo["answers"])
    print(f"held-out tickets right after SFT and wrong after DPO: {lost}; the other way round: {won} (answers.jsonl)")
    for i in (0, 1):
        print(f"\nheld-out ticket: {heldout[i].text}")
        print(f"  after SFT: {sft['answers'][i]!r}\n  after DPO: {dpo['answers'][i]!r}")
