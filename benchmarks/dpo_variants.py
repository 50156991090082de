"""The DPO demo's DPO stage with other settings, side by side, all from one saved SFT stage.

    python -m minisft demo --model smollm2 --dpo            # first: SFT (saved in runs/demo_dpo/sft) + DPO
    python benchmarks/dpo_variants.py --run escalate_last compact ...   # these variants, then the table
    python benchmarks/dpo_variants.py                           # the table of the variants done so far

`minisft/demo_dpo.py` saves its SFT stage (the model and its measurements; the reference log-probs of
each preference's pairs beside them) in RUNS/sft; each variant here reruns only DPO from it, in
RUNS/variants/NAME (the demo's own settings are the variant "demo", read from RUNS itself), and
writes results.json and answers.jsonl there. A variant whose results.json exists is not rerun. The
table (benchmarks/results/dpo_variants.{md,json}) has, per variant: its preference
(`demo_dpo.PREFERENCES`), held-out preference accuracy, the share of greedy answers that show the
preference (the escalate flag right, or written compact), the task score (exact JSON over the held-out
tickets) and how many tickets it lost and won against the SFT model, and the forgetting (general
questions, plain-text loss on Alice), with each run's load average (the CPU may be shared: the
seconds compare loosely).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import RESULTS, cpu_facts, markdown_table, save_results  # noqa: E402
from minisft.demo_dpo import SFT_SETTINGS, STAGE_FILE, DPODemoConfig, lost_and_won, run_dpo_demo  # noqa: E402
from minisft.errors import ConfigError  # noqa: E402
from minisft.integrity import read_json  # noqa: E402
from minisft.tickets import make_tickets  # noqa: E402

# name -> the settings that differ from the demo's (DPODemoConfig)
VARIANTS: dict[str, dict] = {
    "demo": {},
    "escalate_last": {"preference": "escalate_last"},
    "escalate_last_alpha5": {"preference": "escalate_last", "sft_weight": 5.0},
    "compact": {"preference": "compact"},
    "compact_alpha2": {"preference": "compact", "sft_weight": 2.0},
    "compact_lr5e-6_alpha2": {"preference": "compact", "dpo_lr": 5e-6, "sft_weight": 2.0},
    "compact_lr7.5e-6_alpha2": {"preference": "compact", "dpo_lr": 7.5e-6, "sft_weight": 2.0},
}


def run_dir(runs: Path, name: str) -> Path:
    return runs if name == "demo" else runs / "variants" / name


def row(name: str, result: dict) -> dict:
    """One table row from a variant's results.json."""
    cfg, sft, dpo = result["config"], result["sft"], result["dpo"]
    _, heldout = make_tickets(cfg["seed"], cfg["train_tickets"], cfg["heldout_tickets"])
    lost, won = lost_and_won(heldout, sft["answers"], dpo["answers"])
    n, dpo_seconds = len(heldout), next(wall for phase, wall, _ in result["phases"] if phase == "DPO")
    general = [sum(ok for _, ok in r["general"]) for r in (sft, dpo)]
    return {
        "variant": name,
        "preference": cfg["preference"],
        "lr": cfg["dpo_lr"],
        "α (sft_weight)": cfg["sft_weight"],
        "β": cfg["beta"],
        "steps": -(-cfg["train_tickets"] // cfg["pairs_per_step"]) * cfg["dpo_epochs"],
        "preference acc.": f"{sft['preference']:.1%} → {dpo['preference']:.1%}",
        "answers showing it": f"{sft['shows']:.1%} → {dpo['shows']:.1%}",
        "exact JSON": f"{sft['score']['exact']:.1%} → {dpo['score']['exact']:.1%}",
        "tickets lost / won": f"{lost} / {won} of {n}",
        "valid JSON": f"{dpo['score']['valid']:.1%}",
        "general questions": f"{general[0]} → {general[1]}",
        "plain-text loss": f"{sft['losses']['plain_text']:.3f} → {dpo['losses']['plain_text']:.3f}",
        "DPO s": round(dpo_seconds),
        "load": "–".join(f"{x:.1f}" for x in result["load_average"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/demo_dpo", help="the demo's out_dir, its SFT stage in RUNS/sft")
    parser.add_argument("--run", nargs="*", default=[], choices=sorted(VARIANTS), help="variants to run first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default=str(RESULTS), help="folder for dpo_variants.md and .json")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    if not (runs / "sft" / STAGE_FILE).is_file():
        sys.exit(f"no SFT stage in {runs / 'sft'}: run `python -m minisft demo --model smollm2 --dpo` first")
    # The stage's own SFT settings (its model, tickets, precision, ...): the variants' DPO starts from
    # that very SFT model, and the demo's defaults for everything DPO, but for the variant's change.
    stage = read_json(runs / "sft" / STAGE_FILE)["settings"]
    # A key the stage lacks takes the demo's default, and run_dpo_demo refuses the stage, naming it.
    settings = {key: stage[key] for key in SFT_SETTINGS if key in stage}
    for name in args.run:
        out = run_dir(runs, name)
        if (out / "results.json").is_file():
            print(f"{name}: done before ({out / 'results.json'})")
            continue
        print(f"\n=== {name}: {VARIANTS[name] or 'the demo settings'}", flush=True)
        cfg = DPODemoConfig(**settings, out_dir=str(out), sft_dir=str(runs / "sft"), threads=args.threads)
        try:
            run_dpo_demo(replace(cfg, **VARIANTS[name]))
        except ConfigError as error:  # one line, as the demo's own command says it
            sys.exit(f"dpo_variants: {error}")
    done = [name for name in VARIANTS if (run_dir(runs, name) / "results.json").is_file()]
    rows = [row(name, json.loads((run_dir(runs, name) / "results.json").read_text())) for name in done]
    table = markdown_table(rows)
    print(table)
    save_results("dpo_variants", cpu_facts() | {"threads": args.threads}, rows, table, Path(args.results))


if __name__ == "__main__":
    main()
