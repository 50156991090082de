"""Plot a run's train loss against its held-out losses: the overfitting picture at a glance.

    python scripts/plot_run.py RUN_DIR [--out loss.png]

Reads RUN_DIR/metrics.jsonl (lines with "train_loss", and lines with "eval_loss/<name>") and
draws one curve per series against the step. Train loss falling while a held-out loss turns
up is overfitting; a rising plain-text loss is forgetting. Needs matplotlib
(`pip install -e ".[plot]"`); minisft itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_series(metrics_file: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{"train_loss": (steps, values), "eval_loss/heldout": (...), ...} from metrics.jsonl."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for lineno, line in enumerate(metrics_file.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"error: {metrics_file}:{lineno}: invalid JSON: {err.msg}") from None
        for key, value in record.items():
            if key == "train_loss" or key.startswith("eval_loss/"):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    return series


def plot(series: dict[str, tuple[list[int], list[float]]], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (steps, values) in sorted(series.items()):
        label = "train" if name == "train_loss" else name.removeprefix("eval_loss/") + " (held-out)"
        ax.plot(steps, values, label=label, marker=None if name == "train_loss" else "o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        print(f"error: {metrics} not found; is {args.run_dir} a run folder?", file=sys.stderr)
        return 2
    series = read_series(metrics)
    if not series:
        print(f"error: {metrics} has no train_loss or eval_loss lines yet", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / "loss.png"
    plot(series, str(args.run_dir), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
