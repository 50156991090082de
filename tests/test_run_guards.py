"""Bad input and broken files end in one line (issue 14, items 4, 5 and 7), typed as a user types
them: a non-finite learning rate, a checkpoint with inf weights called "good", a truncated newest
checkpoint on --resume (the one before it is used, and the console says so), a truncated --init
model, a hand-edited trainer_state.json, Ctrl-C in the middle of a run, and raising train.steps
to train a finished run further."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_no_overwrite import TRAIN, last_error, tree
from test_resume import write_train_files

import minisft.train
from minisft.__main__ import main
from minisft.checkpoint import step_checkpoints
from minisft.train import TrainConfig, learning_rate

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def trained_run(folder: Path, *extra: str) -> tuple[Path, Path]:
    config = write_train_files(folder, TRAIN)
    assert main(["train", "--config", str(config), *extra]) == 0
    return folder / "run", config


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_learning_rate_is_refused_in_one_line(tmp_path, capsys, value):
    config = write_train_files(tmp_path, TRAIN)
    assert main(["train", "--config", str(config), "--lr", value]) == 2
    assert capsys.readouterr().err == f"error: train.lr: expected a finite number, got '{value}'\n"
    assert not (tmp_path / "run").exists()


def test_the_last_good_checkpoint_has_finite_weights(tmp_path, capsys, monkeypatch):
    """Step 2's loss and gradient are finite but its update overflows (as a huge lr does): step_2
    holds inf weights. The NaN guard then stops the run at step 4 and must name step_1, not step_3."""
    real = minisft.train.make_optimizer

    def make_optimizer(model, cfg):
        optimizer, steps = real(model, cfg), iter(range(1, 10**6))
        step = optimizer.step

        def overflowing_step(*args, **kwargs):
            result = step(*args, **kwargs)
            if next(steps) == 2:
                with torch.no_grad():
                    model.embed_tokens.weight.fill_(float("inf"))
            return result

        optimizer.step = overflowing_step
        return optimizer

    monkeypatch.setattr(minisft.train, "make_optimizer", make_optimizer)
    config = write_train_files(tmp_path, "[train]\nsteps = 8\nbatch_size = 4\nsave_every = 1\nmax_bad_steps = 2\n")
    assert main(["train", "--config", str(config), "--keep_checkpoints", "9", "--warmup_steps", "0"]) == 3
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in step_checkpoints(checkpoints)] == ["step_1", "step_2", "step_3"]
    err = last_error(capsys)
    assert err.startswith("error: training diverged: 2 steps in a row had a non-finite loss")
    assert f"the last good checkpoint is {checkpoints / 'step_1'};" in err, err


def test_resume_falls_back_from_a_truncated_newest_checkpoint_and_says_so(tmp_path, capsys):
    run_dir, _ = trained_run(tmp_path)
    checkpoints = run_dir / "checkpoints"
    truncate(checkpoints / "step_4" / "model.safetensors")
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert (
        f"note: {checkpoints / 'step_4' / 'model.safetensors'}: not a readable safetensors file (Error while "
        "deserializing header: incomplete metadata, file not fully covered): truncated or corrupt; resuming from "
        "the checkpoint before it\n"
    ) in err
    assert f"resuming from {checkpoints / 'step_2'} (step 2)" in err
    assert [r["step"] for r in metrics(run_dir) if "train_loss" in r] == [1, 2, 3, 4]  # 3 and 4 redone, once
    assert step_checkpoints(checkpoints)[-1].name == "step_4"
    # the redone step_4 is whole again: it loads as a model
    assert main(["chat", str(checkpoints / "step_4"), "--prompt", "sort a c b", "--max_new_tokens", "2"]) == 0

    # every checkpoint unreadable: one line, nothing written
    for folder in step_checkpoints(checkpoints):
        truncate(folder / "optimizer.safetensors")
    before = tree(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = last_error(capsys)
    assert err.startswith(f"error: {checkpoints / 'step_2' / 'optimizer.safetensors'}: not a readable safetensors")
    assert err.endswith("; and no older checkpoint is left to resume from")
    assert tree(run_dir) == before


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s["run"].update(step="oops"), "run.step = 'oops' is not a whole number ≥ 0"),
        (lambda s: s["run"].update(step=-1), "run.step = -1 is not a whole number ≥ 0"),
        (lambda s: s["run"].update(step=2), "run.step = 2 but the folder is step_4"),
        (lambda s: s["run"].update(micro_batches=1.5), "run.micro_batches = 1.5 is not a whole number ≥ 0"),
        (lambda s: s["run"].pop("bad_steps"), "'run' must hold exactly step, micro_batches"),
        (lambda s: s["run"].update(best_eval_loss="low"), "run.best_eval_loss = 'low' is not a finite number or null"),
        (lambda s: s["train_config"].update(lrr=1), "'train_config' must hold [train] keys"),
        (lambda s: s["train_config"].update(steps="4"), "'train_config' must hold [train] keys"),
        (lambda s: s.update(python_rng=[3]), "trainer_state.json or optimizer.json is garbled"),
    ],
    ids=[
        "step-oops",
        "step-minus-1",
        "step-other",
        "float-count",
        "missing-key",
        "best-loss",
        "unknown",
        "steps",
        "rng",
    ],  # noqa: E501
)
def test_a_hand_edited_trainer_state_is_one_line_and_overwrites_nothing(tmp_path, capsys, edit, message):
    run_dir, _ = trained_run(tmp_path)
    state_file = run_dir / "checkpoints" / "step_4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    edit(state)
    state_file.write_text(json.dumps(state))
    before = tree(run_dir)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert tree(run_dir) == before  # step_2, step_4 and the metrics as they were


def test_a_garbled_trainer_state_json_falls_back_to_the_checkpoint_before(tmp_path, capsys):
    run_dir, _ = trained_run(tmp_path)
    truncate(run_dir / "checkpoints" / "step_4" / "trainer_state.json")
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert "trainer_state.json: not readable JSON" in err and "resuming from the checkpoint before it" in err


@pytest.mark.parametrize("layout", ["minisft", "hugging face"])
def test_init_from_a_truncated_model_safetensors_is_one_line(tmp_path, capsys, layout):
    run_dir, _ = trained_run(tmp_path)
    model = run_dir / "checkpoints" / "final"
    if layout == "hugging face":
        assert main(["export", str(model), str(tmp_path / "hf")]) == 0
        model = tmp_path / "hf"
    truncate(model / "model.safetensors")
    capsys.readouterr()
    args = ["train", "--init", str(model), "--data.train_file", str(tmp_path / "train.jsonl")]
    assert main([*args, "--out_dir", str(tmp_path / "tuned"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {model / 'model.safetensors'}: not a readable"), err
    assert err.endswith("truncated or corrupt\n")


def test_resume_may_raise_train_steps_and_the_schedule_stretches(tmp_path, capsys):
    run_dir, _ = trained_run(tmp_path, "--warmup_steps", "1")
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--steps", "3"]) == 2
    assert last_error(capsys) == f"error: train.steps can only be raised on resume: {run_dir} was trained toward 4"
    assert main(["train", "--resume", str(run_dir), "--steps", "6", "--lr", "1"]) == 2
    assert "(only --steps may be raised); drop --train.lr 1" in last_error(capsys)

    assert main(["train", "--resume", str(run_dir), "--steps", "6"]) == 0
    err = capsys.readouterr().err
    assert "note: train.steps raised from 4 to 6: the learning rate follows the schedule of a 6-step run" in err
    records = [r for r in metrics(run_dir) if "train_loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    cfg = TrainConfig(steps=6, warmup_steps=1)
    longer = [learning_rate(step - 1, cfg) for step in (5, 6)]
    assert [r["lr"] for r in records[4:]] == pytest.approx(longer, rel=1e-12)
    assert records[3]["lr"] == pytest.approx(learning_rate(3, TrainConfig(steps=4, warmup_steps=1)), rel=1e-12)
    assert "steps = 6" in (run_dir / "config.toml").read_text()
    assert main(["train", "--resume", str(run_dir)]) == 0  # finished at 6: nothing left, and no refusal
    assert [r["step"] for r in metrics(run_dir) if "train_loss" in r] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_during_training_ends_in_one_line_naming_the_checkpoint(tmp_path):
    config = write_train_files(tmp_path, "[train]\nsteps = 100000\nbatch_size = 4\nsave_every = 2\neval_every = 0\n")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "minisft", "train", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )  # SIGINT reaches the run even when pytest was started with it ignored: see tests/conftest.py
        try:
            interrupt_after_first_checkpoint(process, run_dir)
        finally:
            process.kill()  # never a 100000-step run left behind, whatever failed above
            process.wait()
    err = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    newest = step_checkpoints(run_dir / "checkpoints")[-1]
    assert err.splitlines()[-1] == (
        f"error: interrupted; the newest checkpoint is {newest}: continue with "
        f"`python -m minisft train --resume {run_dir}`"
    )


def interrupt_after_first_checkpoint(process: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 300
    # Any checkpoint, not step_2: a step of this model takes milliseconds, and older checkpoints are
    # rotated out, so step_2 can come and go between two looks on a loaded machine.
    while not step_checkpoints(run_dir / "checkpoints"):
        assert process.poll() is None, (run_dir.parent / "stderr.txt").read_text()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=180)  # generous: a loaded CI machine, not a benchmark
