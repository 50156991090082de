"""Nothing the user did not name is deleted or overwritten (issue 14, items 1-2): `export` writes
only into a new or empty folder, or with --overwrite only the files it writes; `train` refuses an
out_dir holding a run unless --resume or --overwrite. Each case through `main([...])`, as typed."""

import json
from pathlib import Path

import pytest
import transformers
from test_resume import write_train_files

from minisft.__main__ import main
from minisft.checkpoint import step_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

EXPORTED = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
TRAIN = "[train]\nsteps = 4\nbatch_size = 4\nsave_every = 2\neval_every = 2\nlog_every = 1\n"


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder by relative path, with its bytes: what must survive untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run (step_2, step_4, best, final) and its config."""
    folder = tmp_path_factory.mktemp("trained")
    config = write_train_files(folder, TRAIN)
    assert main(["train", "--config", str(config)]) == 0
    return folder / "run", config


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


@pytest.mark.parametrize("where", ["run itself", "a checkpoint", "unrelated files"])
def test_export_refuses_a_non_empty_folder_and_leaves_it_whole(trained, tmp_path, capsys, where):
    run_dir, _ = trained
    out = {
        "run itself": run_dir,
        "a checkpoint": run_dir / "checkpoints" / "step_2",
        "unrelated files": tmp_path / "mine",
    }[where]
    if where == "unrelated files":
        (out / "sub").mkdir(parents=True)
        (out / "notes.txt").write_text("my notes")
        (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = tree(out)
    assert main(["export", str(run_dir), str(out)]) == 2
    err = last_error(capsys)
    assert err.startswith(f"error: {out} is not empty (") and "pass --overwrite" in err, err
    assert tree(out) == before


def test_export_into_the_current_directory_is_refused(trained, tmp_path, monkeypatch, capsys):
    run_dir, _ = trained
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("three years")
    assert main(["export", str(run_dir), str(tmp_path)]) == 2
    assert "is not empty (thesis.tex)" in last_error(capsys)
    assert (tmp_path / "thesis.tex").read_text() == "three years"


def test_export_writes_a_new_or_empty_folder(trained, tmp_path):
    run_dir, _ = trained
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "hf", tmp_path / "empty"):
        assert main(["export", str(run_dir), str(out)]) == 0
        assert {p.name for p in out.iterdir()} == EXPORTED
        transformers.AutoModelForCausalLM.from_pretrained(out)  # a usable model


def test_export_overwrite_replaces_only_what_it_writes(trained, tmp_path, capsys):
    """`export RUN RUN --overwrite`: the export's five files join the run; metrics, config and
    every checkpoint stay byte for byte."""
    run_dir, _ = trained
    copy = tmp_path / "run"
    for rel, data in tree(run_dir).items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    before = tree(copy)
    (copy / "generation_config.json").write_text("{}")  # a stale file of the export's: replaced
    assert main(["export", str(copy), str(copy), "--overwrite"]) == 0
    after = tree(copy)
    assert set(after) == set(before) | EXPORTED
    assert {k: v for k, v in after.items() if k in before} == before
    assert json.loads(after["generation_config.json"])["eos_token_id"]
    assert not (copy / ".minisft-export.tmp").exists()
    transformers.AutoModelForCausalLM.from_pretrained(copy)

    # the model being read is never the output, even with --overwrite
    final = copy / "checkpoints" / "final"
    assert main(["export", str(final), str(final), "--overwrite"]) == 2
    assert last_error(capsys) == f"error: {final} is the model being exported: name another output"
    assert tree(copy) == after
    # nor is another model: its own files would be read beside (or instead of) the export's
    step_2 = copy / "checkpoints" / "step_2"
    assert main(["export", str(final), str(step_2), "--overwrite"]) == 2
    assert last_error(capsys) == (
        f"error: {step_2} holds minisft.json, trainer_state.json: loaders would read them with or instead "
        "of the export (a model is there already); export to another folder"
    )
    shards = tmp_path / "sharded"
    shards.mkdir()
    (shards / "model.safetensors.index.json").write_text("{}")
    (shards / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert main(["export", str(final), str(shards), "--overwrite"]) == 2
    assert "holds model-00001-of-00002.safetensors, model.safetensors.index.json: loaders" in last_error(capsys)
    assert tree(copy) == after


def test_export_to_a_file_that_is_not_a_gguf_is_refused(trained, tmp_path, capsys):
    run_dir, _ = trained
    (tmp_path / "out").write_text("a file")
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 2
    assert "is a file: the export writes a folder there" in last_error(capsys)
    assert (tmp_path / "out").read_text() == "a file"


def test_train_refuses_an_out_dir_holding_a_run(trained, tmp_path, capsys):
    run_dir, config = trained
    before = tree(run_dir)
    assert main(["train", "--config", str(config), "--lr", "0.5"]) == 2
    assert last_error(capsys) == (
        f"error: out_dir {run_dir} already holds a run (config.toml, metrics.jsonl, checkpoints): "
        f"continue it with --resume {run_dir}, replace it with --overwrite, or pick another --out_dir"
    )
    assert tree(run_dir) == before
    assert main(["train", "--resume", str(run_dir), "--overwrite"]) == 2
    assert "give one of them" in last_error(capsys)


def test_train_overwrite_replaces_the_run_and_only_the_run(tmp_path, capsys):
    config = write_train_files(tmp_path, TRAIN)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "README.txt").write_text("what this run is for")
    assert main(["train", "--config", str(config), "--train.steps", "6"]) == 0  # no run there yet: fine
    assert [p.name for p in step_checkpoints(run_dir / "checkpoints")] == ["step_2", "step_4", "step_6"]
    # a shorter run over it: none of the old run's checkpoints or records survive
    assert main(["train", "--config", str(config), "--overwrite"]) == 0
    assert [p.name for p in step_checkpoints(run_dir / "checkpoints")] == ["step_2", "step_4"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 4
    assert "steps = 4" in (run_dir / "config.toml").read_text()
    assert (run_dir / "README.txt").read_text() == "what this run is for"
    # a refused config deletes nothing, even with --overwrite
    before = tree(run_dir)
    assert main(["train", "--config", str(config), "--overwrite", "--data.train_file", "missing.jsonl"]) == 2
    assert tree(run_dir) == before


def test_train_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    config = write_train_files(tmp_path, TRAIN)
    (tmp_path / "afile").write_text("x")
    assert main(["train", "--config", str(config), "--out_dir", str(tmp_path / "afile")]) == 2
    assert last_error(capsys) == (
        f"error: out_dir {tmp_path / 'afile'} is a file, not a folder: name a folder for the run (--out_dir PATH)"
    )
