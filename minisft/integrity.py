"""Reading files a crash, a full disk or a hand edit may have broken: one line naming the file and
what to do, never a deep traceback from safetensors or json; and writing a file so a crash cannot
break it.

    open_tensors     safe_open, a truncated or corrupt file an `UnreadableFileError`
    read_tensors     a whole safetensors file, the same way
    read_json        a JSON file, the same way
    finite_weights   whether a checkpoint's weights are all finite (a "good" checkpoint's are)
    run_state        trainer_state.json's "run" table, checked field by field
    write_atomically a file written under a temporary name, flushed, then renamed over the target
    flush_to_disk    fsync a file or a folder's entries (a rename lives in its folder's)
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from minisft.errors import CheckpointError, UnreadableFileError


@contextmanager
def open_tensors(path: str | Path) -> Iterator[Any]:
    """safe_open(path) for torch; a missing, truncated or corrupt file is an UnreadableFileError."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise UnreadableFileError(f"{path}: not a readable safetensors file ({err}): truncated or corrupt") from None
    with handle as f:
        yield f


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UnreadableFileError(f"{path}: not a readable safetensors file ({err}): truncated or corrupt") from None


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnreadableFileError(f"{path}: not readable JSON ({err})") from None


def finite_weights(folder: str | Path) -> bool:
    """Every tensor in folder/model.safetensors finite? (False for an unreadable file.) A checkpoint
    saved after a step whose loss and gradient were finite can still hold inf: an overflowing update."""
    try:
        with open_tensors(Path(folder) / "model.safetensors") as f:
            return all(bool(torch.isfinite(f.get_tensor(name)).all()) for name in f.keys())
    except UnreadableFileError:
        return False


def run_state(saved: dict, fields: dict[str, Any], state_file: Path, step: int) -> dict[str, Any]:
    """trainer_state.json's "run" table, each field as `fields` (name -> default) has it: counts are
    ints ≥ 0, the best loss a finite number or null, and the step the one the folder is named for.
    A hand-edited or garbled value is a CheckpointError naming the key."""
    run = saved.get("run")
    if not isinstance(run, dict) or set(run) != set(fields):
        raise CheckpointError(
            f"{state_file}: 'run' must hold exactly {', '.join(fields)}: restore the file, or delete its "
            "folder to resume from the checkpoint before it"
        )
    for name, value in run.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if name == "best_eval_loss":
            ok, want = value is None or (number and math.isfinite(value)), "a finite number or null"
        else:
            ok, want = number and isinstance(value, int) and value >= 0, "a whole number ≥ 0"
        if not ok:
            raise CheckpointError(
                f"{state_file}: run.{name} = {value!r} is not {want}: restore the file, or delete its folder "
                "to resume from the checkpoint before it"
            )
    if run["step"] != step:
        raise CheckpointError(
            f"{state_file}: run.step = {run['step']} but the folder is step_{step}: restore the file, or delete "
            "its folder to resume from the checkpoint before it"
        )
    return run


def flush_to_disk(path: str | Path) -> None:
    """fsync a file, or a folder (its entries: where a rename is recorded), so a power cut cannot undo it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(target: Path, write: Callable[[str], object]) -> None:
    """write(temporary path) in target's folder, flush it, then rename it to target: a reader (or a
    restart after a crash or power cut) sees the old file or the new one, never half of one. The one
    place a single file is replaced; a folder of files is `checkpoint.write_folder`'s job."""
    # Named here, created by write(): mkstemp would make the file 0600 where the user's umask says 0644.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        flush_to_disk(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    flush_to_disk(target.parent)
