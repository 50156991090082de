"""Save and load a model folder: weights in safetensors, everything else in JSON.

    folder/model.safetensors     the state dict (tied embeddings stored once)
    folder/minisft.json          {"model": ModelConfig fields, "chat_format": "chatml"}
    folder/tokenizer.json        the tokenizer, and tokenizer_config.json for its special tokens

The chat format travels with the weights so chat and generation render prompts exactly as
training did. A folder is written under a temporary name, flushed to disk, then renamed: a crash
mid-save leaves the previous folder whole. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from minisft.model import ModelConfig, Transformer
from minisft.tokenizer import Tokenizer


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def write_folder(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on an empty temporary folder, flush it, then swap it in for `folder`."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def save_model(folder: str | Path, model: Transformer, tokenizer: Tokenizer, chat_format: str) -> Path:
    def write(tmp: Path) -> None:
        weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        meta = {"model": asdict(model.config), "chat_format": chat_format}
        (tmp / "minisft.json").write_text(json.dumps(meta, indent=2) + "\n")
        tokenizer.save(tmp)

    return write_folder(folder, write)


def load_model(folder: str | Path, kernels: str = "torch") -> tuple[Transformer, Tokenizer, str]:
    """-> (model on CPU, tokenizer, chat format name)."""
    folder = Path(folder)
    meta_file = folder / "minisft.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder} is not a minisft model folder (no minisft.json)")
    meta = json.loads(meta_file.read_text())
    model = Transformer(ModelConfig(**meta["model"]), kernels=kernels)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model, Tokenizer.from_file(folder), meta["chat_format"]
