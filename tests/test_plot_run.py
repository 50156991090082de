"""scripts/plot_run.py: the series it reads from metrics.jsonl, and the PNG it writes."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import plot_run  # noqa: E402


def write_metrics(run_dir: Path) -> None:
    records = [
        {"step": 10, "train_loss": 2.0, "lr": 1e-3},
        {"step": 20, "train_loss": 1.5, "lr": 1e-3},
        {"step": 20, "eval_loss/heldout": 1.7, "eval_loss/plain_text": 3.0},
        {"step": 20, "skipped": "no trained tokens in this step's batches"},
        {"step": 30, "train_loss": 1.2, "lr": 1e-3},
        {"step": 30, "eval_loss/heldout": 1.8},
    ]
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_reads_train_and_every_heldout_series(tmp_path):
    write_metrics(tmp_path / "run")
    series = plot_run.read_series(tmp_path / "run" / "metrics.jsonl")
    assert series == {
        "train_loss": ([10, 20, 30], [2.0, 1.5, 1.2]),
        "eval_loss/heldout": ([20, 30], [1.7, 1.8]),
        "eval_loss/plain_text": ([20], [3.0]),
    }


def test_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "run")
    assert plot_run.main([str(tmp_path / "run")]) == 0
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_missing_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert plot_run.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
