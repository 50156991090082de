"""Where a command may write: nothing the user did not name is deleted or overwritten.

    check_export_target   `export MODEL OUT`: OUT is new or empty, or --overwrite replaces only
                          the files the export writes (never OUT's other files, never the model read)
    write_into            write a folder's files there: a new folder whole (`write_folder`), an
                          existing one file by file, each renamed over its old version
    claim_run_dir         `train`: an out_dir that already holds a run is refused unless --resume
                          (continue it) or --overwrite (replace it: only what a run writes goes)
    interrupted           what a run stopped by Ctrl-C left: its newest checkpoint, the command to go on

Every refusal is a one-line error naming the folder and the flag that would make it go ahead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from minisft.checkpoint import step_checkpoints, write_folder
from minisft.errors import ConfigError
from minisft.integrity import flush_to_disk

# What a run writes into its out_dir: found there, the folder holds a run; --overwrite removes these only.
RUN_FILES = ("config.toml", "metrics.jsonl", "checkpoints", "reference_logps.json")  # the last: DPO's (dpo.py)


def _listing(folder: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# Files a loader reads with, or instead of, what export writes (shards and their index, pickled
# weights, a separate chat template, a minisft checkpoint's own files): left beside a new export
# they would change what OUT loads as, so --overwrite refuses a folder holding one.
SHADOWING = (
    "minisft.json", "trainer_state.json", "model.safetensors.index.json", "model-*.safetensors",
    "pytorch_model*.bin", "chat_template.jinja", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
)  # fmt: skip


def check_export_target(out: str | Path, source: str | Path, overwrite: bool) -> None:
    """Refuse an OUT that is a file where a folder is written (or the other way round), the model
    being read, or a non-empty folder without --overwrite."""
    out, source = Path(out), Path(source)
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise ConfigError(f"{out} is the model being exported: name another output")
    to_file = out.suffix == ".gguf"
    if out.is_dir() and to_file:
        raise ConfigError(f"{out} is a folder: a .gguf export writes a file; name a new .gguf file")
    if out.exists() and not out.is_dir() and not to_file:
        raise ConfigError(f"{out} is a file: the export writes a folder there; name a new or empty folder")
    if to_file:
        if out.exists() and not overwrite:
            raise ConfigError(f"{out} exists: pass --overwrite to replace it")
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"{out} is not empty ({_listing(out)}): export writes only into a new or empty folder; "
            "name another, or pass --overwrite to replace the files it writes (its other files stay)"
        )
    elif out.is_dir() and (found := sorted({p.name for pattern in SHADOWING for p in out.glob(pattern)})):
        raise ConfigError(
            f"{out} holds {', '.join(found)}: loaders would read them with or instead of the export "
            "(a model is there already); export to another folder"
        )


def write_into(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) on an empty temporary folder, then move its files into `folder`: a new or empty
    folder is swapped in whole; into a non-empty one each file is renamed over its namesake, and the
    folder's other files stay as they were."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        if folder.is_dir():
            folder.rmdir()  # empty: `write_folder` renames the new one into its place
        return write_folder(folder, write)
    # Not `integrity.write_atomically` per file: `write` makes a whole folder's files in one call. The
    # staging folder is inside: the parent may be read-only or another disk (no rename across disks).
    tmp = folder / ".minisft-export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for path in sorted(tmp.iterdir()):
            target = folder / path.name
            if target.is_dir() and not target.is_symlink():
                raise ConfigError(f"{target} is a folder where the export writes a file: move it away first")
            flush_to_disk(path)
            os.replace(path, target)  # one file at a time, each atomically
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export leaves nothing of its own in the user's folder
    flush_to_disk(folder)
    return folder


def claim_run_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse an out_dir that is a file, or one holding a run unless --resume or --overwrite is given.
    Nothing is deleted here: `clear_run` does that, once the new run has loaded its model and data."""
    out = Path(out_dir)
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file, not a folder: name a folder for the run (--out_dir PATH)")
    if resume or overwrite or not out.is_dir():
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
        raise ConfigError(
            f"out_dir {out} already holds a run ({', '.join(found)}): continue it with --resume {out}, "
            "replace it with --overwrite, or pick another --out_dir"
        )


def clear_run(out_dir: str | Path) -> None:
    """--overwrite: remove what a previous run wrote into out_dir (and only that)."""
    out = Path(out_dir)
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def interrupted(out_dir: str | Path) -> str:
    """The line a run stopped by Ctrl-C ends with."""
    found = step_checkpoints(Path(out_dir) / "checkpoints")
    if not found:
        return f"interrupted before any checkpoint was saved in {out_dir}: start again (with --overwrite)"
    go_on = f"python -m minisft train --resume {out_dir}"
    return f"interrupted; the newest checkpoint is {found[-1]}: continue with `{go_on}`"
