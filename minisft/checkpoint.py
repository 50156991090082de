"""Save and load a model folder: weights in safetensors, everything else in JSON.

    folder/model.safetensors     the state dict (tied embeddings stored once)
    folder/minisft.json          {"model": ModelConfig fields, "chat_format": "chatml"}
    folder/tokenizer.json        the tokenizer, and tokenizer_config.json for its special tokens

The chat format travels with the weights so chat and generation render prompts exactly as
training did. A folder is written under a temporary name, flushed to disk, then renamed: a crash
mid-save leaves the previous folder whole (as folder.old if it fell between the two renames, which
`recover_folder` puts back when the model is next opened). Nothing here unpickles anything.

A training checkpoint (RUN_DIR/checkpoints/step_N/, and checkpoints/best) is a model folder plus
what resuming needs:

    optimizer.safetensors        AdamW's per-parameter tensors, named "state.<param index>.<key>"
    optimizer.json               its param_groups (lr, betas, ...) and any non-tensor state
    rng.safetensors              torch's CPU generator state, and each CUDA device's
    trainer_state.json           step, data-stream position, Python's RNG state, best eval loss, ...

A step_N folder appears only by the final rename, so one that exists is complete. A LoRA run
(`lora.py`) writes its adapters alone in place of model.safetensors, in PEFT's layout
(`peft_format.py`): the optimizer then holds only them too.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from minisft.errors import CheckpointError
from minisft.integrity import flush_to_disk, read_json, read_tensors
from minisft.model import Backends, ModelConfig, Transformer
from minisft.tokenizer import Tokenizer


def recover_folder(folder: str | Path) -> None:
    """A crash between `write_folder`'s two renames leaves folder.old and no folder: put it back."""
    folder = Path(folder)
    old = folder.with_name(folder.name + ".old")
    if old.is_dir() and not folder.exists():
        old.rename(folder)


def write_folder(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on an empty temporary folder, flush it, then swap it in for `folder`. At every
    moment `folder` or `folder.old` holds a whole version, old or new (`recover_folder`).

    Not `integrity.write_atomically`, the single-file version: a rename cannot replace a non-empty
    folder, so the old one steps aside first (folder.old), and the files are flushed as a set."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for path in [*tmp.iterdir(), tmp]:  # the files, then the entries naming them
        flush_to_disk(path)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():  # else an orphaned .old may be the only copy of the previous version: kept till the end
        shutil.rmtree(old, ignore_errors=True)  # a leftover: `folder` itself is the previous version
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    flush_to_disk(folder.parent)  # the renames live in the parent's entries: or a power cut may undo them
    return folder


def write_weights(folder: Path, model: Transformer, state_dict: dict | None = None) -> None:
    """model.safetensors; for a LoRA model, the adapters alone, in PEFT's layout (the base is on disk already)."""
    if hasattr(model, "lora_config"):
        from minisft.peft_format import write_adapter  # imported on use: it imports hf.py, which imports us

        return write_adapter(folder, model)
    state_dict = model.state_dict() if state_dict is None else state_dict
    weights = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
    save_file(weights, str(folder / "model.safetensors"))


def write_model_meta(folder: Path, config: ModelConfig, tokenizer: Tokenizer, chat_format: str) -> None:
    """What makes model.safetensors a usable model: its shape, its tokenizer, its chat format."""
    meta = {"model": asdict(config), "chat_format": chat_format}
    (folder / "minisft.json").write_text(json.dumps(meta, indent=2) + "\n")
    tokenizer.save(folder)


def save_model(
    folder: str | Path, model: Transformer, tokenizer: Tokenizer, chat_format: str, state_dict: dict | None = None
) -> Path:
    """state_dict: the weights to write instead of the model's own (FSDP2's, gathered whole)."""

    def write(tmp: Path) -> None:
        write_weights(tmp, model, state_dict)
        write_model_meta(tmp, model.config, tokenizer, chat_format)

    return write_folder(folder, write)


def load_model(folder: str | Path, backends: Backends | None = None) -> tuple[Transformer, Tokenizer, str]:
    """-> (model on CPU, tokenizer, chat format name)."""
    folder = Path(folder)
    meta_file = folder / "minisft.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder} is not a minisft model folder (no minisft.json)")
    meta = read_json(meta_file)
    model = Transformer(ModelConfig(**meta["model"]), backends)
    model.load_state_dict(read_tensors(folder / "model.safetensors"))
    return model, Tokenizer.from_file(folder), meta["chat_format"]


# ---------------------------------------------------------------- training checkpoints


def save_checkpoint(
    folder: str | Path,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    write_extra: Callable[[Path], None] | None = None,
    states: tuple[dict, dict] | None = None,
) -> Path:
    """Weights, optimizer, RNG states and trainer_state (JSON-able) -> folder, atomically.
    write_extra(tmp) adds files of the caller's (the CLI: tokenizer, chat format, config.toml).
    states: (model, optimizer) state dicts to write instead of the model's and optimizer's own
    (FSDP2's, gathered whole: `Replica.full_state`)."""
    model_state, optimizer_state = states or (model.state_dict(), optimizer.state_dict())

    def write(tmp: Path) -> None:
        write_weights(tmp, model, model_state)
        tensors, groups, scalars = _flatten_optimizer(optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps({"param_groups": groups, "state": scalars}, indent=2))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng |= {f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
        save_file(rng, str(tmp / "rng.safetensors"))
        state = trainer_state | {"python_rng": random.getstate()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        if write_extra is not None:
            write_extra(tmp)

    return write_folder(folder, write)


def load_checkpoint(
    folder: str | Path,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    load_states: Callable[[dict, dict], None] | None = None,
) -> dict:
    """Restore weights, optimizer and RNG states in place from `save_checkpoint`'s folder;
    -> the trainer state. load_states(model_state, optimizer_state), when given, loads the two
    state dicts instead of load_state_dict (FSDP2: `Replica.load_full_state`)."""
    folder = Path(folder)
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no trainer_state.json)")
    # Every file is read before anything is loaded: a checkpoint that turns out unreadable half-way
    # leaves model and optimizer as they were, for the caller to try an older one.
    state = read_json(state_file)
    adapter = hasattr(model, "lora_config")  # a LoRA run's checkpoint holds the adapters alone
    model_state = {} if adapter else read_tensors(folder / "model.safetensors")
    saved = read_json(folder / "optimizer.json")
    optimizer_tensors = read_tensors(folder / "optimizer.safetensors")
    rng = read_tensors(folder / "rng.safetensors")
    try:
        version, internal, gauss = state.pop("python_rng")  # JSON turned its tuples into lists
        python_rng = (version, tuple(internal), gauss)
        random.Random().setstate(python_rng)  # checked on a throwaway generator first
        optimizer_state = _unflatten_optimizer(optimizer_tensors, saved)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{folder}: trainer_state.json or optimizer.json is garbled ({err!r})") from None
    if load_states is not None:
        load_states(model_state, optimizer_state)
    else:
        if adapter:
            from minisft.peft_format import load_adapter_weights

            load_adapter_weights(folder, model)
        else:
            model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in rng])
    random.setstate(python_rng)
    return state


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict], dict[str, dict]]:
    """An optimizer's state_dict -> (named tensors, param_groups, non-tensor per-parameter state)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, state_dict["param_groups"], scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    state: dict[int, dict] = {int(index): dict(entries) for index, entries in saved["state"].items()}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    groups = [
        group | {"betas": tuple(group["betas"])} if "betas" in group else group for group in saved["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


STEP_FOLDER = re.compile(r"step_(\d+)")


def step_checkpoints(checkpoints: str | Path) -> list[Path]:
    """The complete step_N folders under `checkpoints`, oldest first (a *.tmp one is a torn save)."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := STEP_FOLDER.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def step_number(folder: Path) -> int:
    """checkpoints/step_12 -> 12."""
    return int(STEP_FOLDER.fullmatch(folder.name).group(1))


def prune_checkpoints(checkpoints: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` step_N folders (never `best`)."""
    for path in step_checkpoints(checkpoints)[:-keep]:
        shutil.rmtree(path)
