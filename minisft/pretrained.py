"""Start from a saved model — a minisft checkpoint, a Hugging Face folder or a GGUF file — for SFT or chat.

    find_model_folder   a model folder or .gguf file, or the run folder around one
    SavedModel          any of them opened: the chat format at once, the weights on `load`
    load_pretrained     any layout -> (model, tokenizer, chat format or None)
    start_from          what `train --init PATH` does: load, fit the chat format, freeze

A base model's tokenizer often lacks the chat format's markers (`<|im_start|>`, `<|im_end|>`).
They are added as special tokens and the embedding (and an untied head) grows to fit, the new rows
starting at the mean embedding; they are trained and exported with the model (pitfall 14), which
is why freezing the embeddings is refused when tokens were added.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from minisft.chat import CHAT_FORMATS, ChatFormat, make_chat_format
from minisft.checkpoint import load_model, recover_folder
from minisft.errors import ConfigError
from minisft.gguf import GGUFFile, is_gguf_file
from minisft.hf import chat_format_of, is_hf_folder, load_hf
from minisft.model import Backends, ModelConfig, Transformer, padded_vocab_size
from minisft.peft_format import adapter_base, attach_lora, is_adapter_folder, read_adapter_config
from minisft.tokenizer import Tokenizer, UnknownTokenError, read_chat_template

if TYPE_CHECKING:  # only a type here: `chat` imports this module and must not load the training config
    from minisft.config import RunConfig


def find_model_folder(path: str | Path) -> Path:
    """PATH itself (a model folder or a .gguf file), or the model a run folder holds
    (`checkpoints/final`, or the demo's `model`)."""
    path = Path(path)
    if is_gguf_file(path):
        return path
    for folder in (path, path / "checkpoints" / "final", path / "model"):
        recover_folder(folder)  # a save cut off between its two renames left folder.old only
        if (folder / "minisft.json").is_file() or is_hf_folder(folder) or is_adapter_folder(folder):
            return folder
    raise FileNotFoundError(
        f"no model in {path}: expected a minisft checkpoint (minisft.json), a Hugging Face folder "
        "(config.json), a LoRA adapter (adapter_config.json), a .gguf file or a run folder with checkpoints/final"
    )


class SavedModel:
    """A model on disk, opened: its chat format is known before any weight is read, so a command
    that needs one refuses at once (a GGUF file's metadata is read here, its tensors in `load`).
    A LoRA adapter folder opens its base too: `load` gives the base with the adapters, unmerged."""

    def __init__(self, path: str | Path) -> None:
        self.path = find_model_folder(path)
        self.gguf = GGUFFile(self.path) if is_gguf_file(self.path) else None
        self.adapter = read_adapter_config(self.path) if is_adapter_folder(self.path) else None
        if self.adapter is not None:
            self.base = SavedModel(adapter_base(self.path))
            meta = self.path / "minisft.json"  # minisft's adapters record the format they were trained with
            saved = json.loads(meta.read_text())["chat_format"] if meta.is_file() else None
            self.chat_format, self.chat_template = saved or self.base.chat_format, self.base.chat_template
        elif self.gguf is not None:
            self.chat_format, self.chat_template = self.gguf.chat_format, self.gguf.chat_template
        elif (self.path / "minisft.json").is_file():
            self.chat_format = json.loads((self.path / "minisft.json").read_text())["chat_format"]
            self.chat_template = None
        else:
            self.chat_format, self.chat_template = chat_format_of(self.path), read_chat_template(self.path)

    def why_no_chat_format(self) -> str:
        """Why chat_format is None, without guessing whether the model is a base or an instruct one."""
        if self.chat_template:
            return f"{self.path} has a chat template that is none of minisft's formats ({', '.join(CHAT_FORMATS)})"
        return f"{self.path} has no chat template"

    def load(
        self, backends: Backends | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[Transformer, Tokenizer]:
        """-> (model on CPU, tokenizer)."""
        if self.adapter is not None:
            model, tokenizer = self.base.load(backends, dtype)
            attach_lora(model, self.adapter, self.base.path)
            return model, tokenizer
        if self.gguf is not None:
            return self.gguf.load(backends, dtype)
        if (self.path / "minisft.json").is_file():
            model, tokenizer, _ = load_model(self.path, backends)
            return model.to(dtype), tokenizer
        model, tokenizer, _ = load_hf(self.path, backends, dtype)
        return model, tokenizer


def load_pretrained(
    path: str | Path, backends: Backends | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Transformer, Tokenizer, str | None]:
    """-> (model on CPU, tokenizer, the chat format it was trained with, None if unknown)."""
    saved = SavedModel(path)
    return *saved.load(backends, dtype), saved.chat_format


def fit_chat_format(model: Transformer, tokenizer: Tokenizer, name: str, train_on: str) -> tuple[ChatFormat, list[int]]:
    """The chat format's renderer, after adding the special tokens it needs and the tokenizer
    lacks; the embedding grows to a multiple of 64 rows when they do not fit. -> (format, new ids)."""
    added: list[int] = []
    old_vocab = tokenizer.vocab_size
    while True:
        try:
            chat = make_chat_format(name, tokenizer, train_on)
            break
        except UnknownTokenError as err:
            added += tokenizer.add_special_tokens([err.token])
    if tokenizer.vocab_size > model.config.vocab_size:
        model.resize_vocab(padded_vocab_size(tokenizer.vocab_size))
    if added:  # rows that existed unused (the embedding's padding) start at the mean too
        model.init_embeddings_as_mean(added, rows=old_vocab)
    return chat, added


def freeze(model: Transformer, embeddings: bool, first_layers: int) -> None:
    """Stop training the token embedding (the output head too, when tied) and the first layers."""
    if first_layers > model.config.n_layers:
        raise ConfigError(f"freeze_layers={first_layers} but the model has {model.config.n_layers} layers")
    frozen = [model.embed_tokens] * embeddings + list(model.layers[:first_layers])
    for module in frozen:
        module.requires_grad_(False)


def _check_model_keys(config: RunConfig, loaded: ModelConfig, init: str) -> None:
    """[model] keys are the folder's to set; one a user set to something else is an error (equal values,
    as in the config.toml a run writes, are fine)."""
    default = ModelConfig()
    for f in fields(ModelConfig):
        asked, got = getattr(config.model, f.name), getattr(loaded, f.name)
        if asked != getattr(default, f.name) and asked != got:
            raise ConfigError(f"model.{f.name} = {asked!r}, but {init} has {got!r}: with init, the model is {init}'s")


def start_from(config: RunConfig, backends: Backends) -> tuple[Transformer, Tokenizer, ChatFormat, RunConfig]:
    """`train --init PATH`: the model and tokenizer of PATH, fitted to data.chat_format, frozen as
    the config says; -> (model on CPU, tokenizer, chat format, config with the model's shape)."""
    if config.data.tokenizer:
        raise ConfigError(f"data.tokenizer is set, but init={config.init} brings its own tokenizer: leave it empty")
    if is_adapter_folder(find_model_folder(config.init)):  # adapters on adapters: a base to start from is clearer
        raise ConfigError(
            f"init={config.init} holds LoRA adapters: pass its base as init and the adapters as lora.adapter "
            "(--adapter), or export --merge them and init from the merged folder"
        )
    model, tokenizer, saved_format = load_pretrained(config.init, backends)
    if saved_format not in (None, config.data.chat_format):
        print(
            f"note: {config.init} was trained with chat format {saved_format!r}; this run renders "
            f"{config.data.chat_format!r} (data.chat_format)",
            file=sys.stderr,
        )
    chat, added = fit_chat_format(model, tokenizer, config.data.chat_format, config.data.train_on)
    if added:
        if config.freeze_embeddings or config.lora.enabled:
            why = "LoRA (which freezes the base)" if config.lora.enabled else "freeze_embeddings"
            raise ConfigError(
                f"{why} would leave the {len(added)} tokens added for chat format "
                f"{chat.name!r} untrained: unfreeze the embeddings, or pick a format the tokenizer has"
            )
        names = ", ".join(tokenizer.backend.id_to_token(i) for i in added)
        print(f"added {names} to the tokenizer; embedding now {model.config.vocab_size} rows (new ones at the mean)")
    freeze(model, config.freeze_embeddings, config.freeze_layers)
    if config.freeze_embeddings or config.freeze_layers:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"frozen as asked: {trained / 1e6:.2f}M of {model.config.num_params() / 1e6:.2f}M parameters train")
    _check_model_keys(config, model.config, config.init)
    return model, tokenizer, chat, replace(config, model=model.config)
