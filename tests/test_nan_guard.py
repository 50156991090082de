"""The NaN guard: a non-finite loss or gradient norm never reaches the weights; a run that keeps
producing them stops cleanly, naming its last good checkpoint."""

import json

import pytest
import torch
from test_resume import TRAIN, records, write_train_files
from test_train_parts import tiny_model

from minisft.checkpoint import step_checkpoints
from minisft.errors import DivergedError
from minisft.train import TrainConfig, train_loop

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = TrainConfig(steps=10, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=0, log_every=1, save_every=2)


def poison(model, steps: set[int]) -> dict:
    """Make the loss NaN at these training steps (one forward per step: no eval, no accumulation);
    -> a dict that receives a copy of the weights as they were at the first poisoned step."""
    seen = {"forwards": 0}

    def hook(module, args, output):
        seen["forwards"] += 1
        if seen["forwards"] in steps:
            seen.setdefault("weights", {k: v.clone() for k, v in model.state_dict().items()})
            return output * float("nan")
        return output

    model.norm.register_forward_hook(hook)
    return seen


def test_one_bad_step_is_skipped_and_logged(tmp_path, capsys):
    model = tiny_model(vocab_size=16, max_seq_len=32)
    poison(model, {3})
    result = train_loop(model, TRAIN, {}, CFG, 0, tmp_path)
    assert result["last_step"] == 10
    lines = records(tmp_path)
    assert {"step": 3, "skipped": "non-finite loss and grad_norm"} in lines
    assert [r["step"] for r in lines if "train_loss" in r] == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert "step 3 skipped: non-finite loss and grad_norm (1 in a row)" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_steps_in_a_row_stop_the_run_with_the_last_good_checkpoint(tmp_path):
    model = tiny_model(vocab_size=16, max_seq_len=32)
    seen = poison(model, set(range(6, 100)))
    with pytest.raises(DivergedError, match=r"3 steps in a row had a non-finite loss and grad_norm \(last: step 8\)"):
        train_loop(model, TRAIN, {}, CFG, 0, tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, seen["weights"][name]), name  # the skipped steps never touched a weight
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in step_checkpoints(checkpoints)][-1] == "step_6"  # bad steps don't change the weights
    assert json.loads((checkpoints / "step_6" / "trainer_state.json").read_text())["run"]["bad_steps"] == 1
    skipped = [r["step"] for r in records(tmp_path) if "skipped" in r]
    assert skipped == [6, 7, 8]


def test_train_command_reports_divergence_in_one_line_with_exit_code_3(tmp_path, capsys):
    from minisft.__main__ import main

    config = write_train_files(tmp_path, "[train]\nsteps = 8\nbatch_size = 4\nsave_every = 1\nmax_bad_steps = 2\n")
    assert main(["train", "--config", str(config), "--lr", "1e30", "--warmup_steps", "0"]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: training diverged: 2 steps in a row") and "the last good checkpoint is" in err
    assert not (tmp_path / "run" / "checkpoints" / "final").exists()
