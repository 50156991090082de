"""Files replaced through `integrity.write_atomically` (metrics truncation, GGUF export, the data cache,
DPO's reference log-probs) and folders through `outputs.write_into`: a write that fails keeps the old
version whole and leaves no temporary behind; a new file gets the permissions any other file would."""

import json
import os
import stat

import pytest

from minisft.bookkeeping import truncate_metrics
from minisft.errors import ConfigError
from minisft.integrity import write_atomically
from minisft.outputs import write_into


def fail_after_writing(tmp: str) -> None:
    with open(tmp, "w") as f:
        f.write("half a new ver")
    raise OSError("disk full")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "data.json"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail_after_writing)
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]
    assert target.read_text() == "old"
    write_atomically(target, lambda tmp: open(tmp, "w").write("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]
    assert target.read_text() == "new"


def test_a_written_file_has_the_mode_the_umask_gives(tmp_path):
    """mkstemp would make it 0600: a GGUF export another user (or a server) cannot read."""
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain"
        plain.write_text("x")
        write_atomically(tmp_path / "atomic", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "atomic").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    log = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo'
    path.write_text(log)
    monkeypatch.setattr("minisft.integrity.os.replace", lambda *a: fail_after_writing(a[0]))
    with pytest.raises(OSError, match="disk full"):  # a crash mid-truncation: the whole old log stays
        truncate_metrics(path, 3)
    assert path.read_text() == log
    monkeypatch.undo()
    truncate_metrics(path, 3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_failed_write_into_a_folder_leaves_its_files_and_no_staging_folder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's")
    (folder / "config.json").write_text("old")

    def write(tmp):
        (tmp / "config.json").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_into(folder, write)
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"notes.txt": "the user's", "config.json": "old"}

    (folder / "model.safetensors").mkdir()  # a folder where a file goes: refused, and the staging folder goes
    with pytest.raises(ConfigError, match="is a folder where the export writes a file"):
        write_into(folder, lambda tmp: (tmp / "model.safetensors").write_text("w"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
