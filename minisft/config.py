"""Run configuration: frozen dataclasses, filled from a TOML file and `--key value` flags.

    out_dir = "runs/my_sft"          # top-level keys: RunConfig's own fields
    [model]                          # one table per concern: ModelConfig, DataConfig, TrainConfig
    dim = 256
    [train]
    lr = 3e-4
    [lora]                           # LoRAConfig (lora.py): r > 0 trains adapters instead of the weights
    r = 16

On the command line a key is `--section.key value` (`--train.lr 3e-4`), or just `--key value`
when the name is unique (`--lr 3e-4`). Every mistake — an unknown key, a value of the wrong type,
a value the dataclass refuses — raises `ConfigError` with a one-line message naming the key.

The comment beside each field is its documentation, and the only one: `config_help` reads the
comments from this source (and model.py's, train.py's) for `train --help`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import json
import math
import textwrap
import tokenize
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minisft.chat import CHAT_FORMATS, TRAIN_ON
from minisft.data import FORMATS, ON_ERROR
from minisft.dataset import TOO_LONG
from minisft.dpo import DPOConfig
from minisft.errors import ConfigError
from minisft.lora import LoRAConfig
from minisft.loss import LOSS_BACKENDS
from minisft.model import ATTENTION_BACKENDS, ModelConfig
from minisft.train import TrainConfig


@dataclass(frozen=True)
class DataConfig:
    train_file: str = ""  # JSONL or a JSON array of records (layouts: see minisft/data.py)
    eval_file: str = ""  # same layouts; held-out loss is reported on it ("" = none)
    tokenizer: str = ""  # a tokenizer.json, or a folder with tokenizer.json + tokenizer_config.json
    format: str = "auto"  # record layout: auto (per record), messages, sharegpt, prompt_completion or alpaca
    chat_format: str = "chatml"  # how turns become tokens: chatml, qwen3, llama3, llama3.1, instruction
    train_on: str = "assistant"  # trained turns: assistant (every answer), last (final answer), all
    on_error: str = "fail"  # a bad record: fail (stop, naming file:line) or skip (counted, reported)
    max_seq_len: int = 512  # tokens per example (and per packed row)
    too_long: str = "drop"  # a longer example: drop it, or truncate it (both counted and reported)
    packing: bool = False  # pack whole examples into rows of max_seq_len instead of padding each
    plain_text_eval: str = ""  # plain text, one document per line: its loss (eval_loss/plain_text) shows forgetting
    cache_dir: str = "~/.cache/minisft/data"  # rendered data is cached here, keyed by content ("" = no cache)

    def __post_init__(self) -> None:
        choices = {
            "format": FORMATS,
            "chat_format": tuple(CHAT_FORMATS),
            "train_on": TRAIN_ON,
            "on_error": ON_ERROR,
            "too_long": TOO_LONG,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.max_seq_len < 2:
            raise ValueError(f"data.max_seq_len must be at least 2, got {self.max_seq_len}")


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/sft"  # metrics.jsonl, config.toml and checkpoints/ go here
    kernels: str = "auto"  # attention and loss backends at once: torch, triton, or auto (triton on CUDA, torch on CPU)
    attention: str = ""  # attention alone: torch (SDPA) or triton (flash-attention kernel); "" = as kernels
    loss: str = ""  # loss alone: torch (F.cross_entropy on full logits) or triton (fused linear + CE); "" = as kernels
    init: str = ""  # start from this model (Hugging Face or minisft folder) instead of a random one
    freeze_embeddings: bool = False  # with init: keep the token embedding (and a tied head) fixed
    freeze_layers: int = 0  # with init: keep the first N transformer layers fixed
    objective: str = "sft"  # sft (answers' token loss) or dpo (preference pairs: data files of prompt/chosen/rejected)
    model: ModelConfig = field(default_factory=ModelConfig)  # [model]: the network's shape (model.py)
    data: DataConfig = field(default_factory=DataConfig)  # [data]: files, chat format, lengths (above)
    train: TrainConfig = field(default_factory=TrainConfig)  # [train]: the optimizer and the loop (train.py)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # [lora]: low-rank adapters instead of every weight (lora.py)
    dpo: DPOConfig = field(default_factory=DPOConfig)  # [dpo]: β and the loss, with objective = "dpo" (dpo.py)

    def __post_init__(self) -> None:
        choices = ("auto", *ATTENTION_BACKENDS)
        if self.kernels not in choices:
            raise ValueError(f"kernels: unknown backend {self.kernels!r}; available here: {', '.join(choices)}")
        for part, table in (("attention", ATTENTION_BACKENDS), ("loss", LOSS_BACKENDS)):
            name = getattr(self, part)
            if name not in ("", "auto", *table):
                raise ValueError(
                    f"{part}: unknown backend {name!r}; choose auto, {', '.join(table)} or '' (as kernels)"
                )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.objective == "dpo" and self.data.packing:
            raise ValueError("data.packing is SFT's: DPO's pairs are padded, each pair's two sequences side by side")
        if self.train.base_kl:  # a pull toward the model the run starts from (base_kl.py)
            if self.objective == "dpo":
                raise ValueError("train.base_kl is SFT's: DPO already keeps to its reference model (dpo.beta)")
            if not self.init:
                raise ValueError("train.base_kl needs init: a pull toward a random model keeps nothing worth keeping")
            if self.data.train_on == "all":
                raise ValueError('train.base_kl reads the tokens SFT does not train: data.train_on = "all" leaves none')
        if self.freeze_layers < 0:
            raise ValueError(f"freeze_layers must be at least 0, got {self.freeze_layers}")
        if (self.freeze_embeddings or self.freeze_layers) and not self.init:
            raise ValueError("freeze_embeddings and freeze_layers need init: a random model has nothing worth keeping")
        lora = self.lora
        if not lora.enabled and lora != LoRAConfig():
            raise ValueError("lora.r must be at least 1 for LoRA (the [lora] keys set do nothing with r = 0)")
        if lora.enabled:
            if not self.init:
                raise ValueError("LoRA needs init: adapters on a random model have nothing worth keeping")
            if self.freeze_embeddings or self.freeze_layers:
                raise ValueError("freeze_embeddings and freeze_layers mean nothing with LoRA: the whole base is frozen")
            if self.train.fsdp:
                raise ValueError("train.fsdp with LoRA is not supported: the adapters are small, use DDP")


SECTIONS = ("model", "data", "train", "dpo", "lora")
OBJECTIVES = ("sft", "dpo")


def _fields(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys() -> dict[str, type]:
    """Every dotted key ('train.lr') and top-level key ('out_dir') with its type."""
    keys: dict[str, type] = {}
    for name, kind in _fields(RunConfig).items():
        if name in SECTIONS:
            keys.update({f"{name}.{sub}": sub_kind for sub, sub_kind in _fields(kind).items()})
        else:
            keys[name] = kind
    return keys


def _unknown(key: str, keys: dict[str, type]) -> ConfigError:
    by_name = {k.rpartition(".")[2]: k for k in keys}  # so a bare '--stepz' finds 'train.steps'
    close = difflib.get_close_matches(key, list(keys), n=1) or [
        by_name[name] for name in difflib.get_close_matches(key, list(by_name), n=1)
    ]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _convert(key: str, value: Any, kind: type) -> Any:
    """Coerce a TOML value or a command-line string to the field's type, or say why not; no float
    key has a use for nan or inf (`--lr inf` would write inf weights into every checkpoint)."""
    converted = _coerce(key, value, kind)
    if kind is float and not math.isfinite(converted):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return converted


def _coerce(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text not in ("true", "false", "1", "0"):
                raise ConfigError(f"{key}: expected true or false, got {value!r}")
            return text in ("true", "1")
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _flatten(table: dict[str, Any], path: Path) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in table.items():
        if isinstance(value, dict):
            if name not in SECTIONS:
                raise ConfigError(f"{path}: unknown table [{name}]; tables are {', '.join(SECTIONS)}")
            flat.update({f"{name}.{sub}": sub_value for sub, sub_value in value.items()})
        else:
            flat[name] = value
    return flat


def underscore_flags(args: list[str]) -> list[str]:
    """['--max-seq-len', '8', '--data.chat-format=x'] -> ['--max_seq_len', '8', '--data.chat_format=x']:
    flags are spelled as config keys are, and a hyphen in a flag's name is read as an underscore."""

    def spelled(arg: str) -> str:
        if not arg.startswith("--"):
            return arg
        name, equals, value = arg[2:].partition("=")
        return "--" + name.replace("-", "_") + equals + value

    return [spelled(arg) for arg in args]


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--train.lr', '3e-4', '--steps=10'] -> {'train.lr': '3e-4', 'train.steps': '10'}."""
    keys = _all_keys()
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        if key not in keys:
            matches = [k for k in keys if k.endswith("." + key)]
            if len(matches) != 1:
                raise ConfigError(f"ambiguous key '{key}': say one of {matches}") if matches else _unknown(key, keys)
            key = matches[0]
        overrides[key] = value
    return overrides


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- TOML file <- command-line overrides, validated by the dataclasses."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values.update(_flatten(tomllib.loads(path.read_text()), path))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
    values.update(parse_overrides(overrides or []))
    keys = _all_keys()
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    top: dict[str, Any] = {}
    for key, value in values.items():
        if key not in keys:
            raise _unknown(key, keys)
        converted = _convert(key, value, keys[key])
        section, _, name = key.rpartition(".")
        (sections[section] if section else top)[name] = converted
    try:
        built = {name: cls(**sections[name]) for name, cls in _fields(RunConfig).items() if name in SECTIONS}
        return RunConfig(**top, **built)
    except ValueError as err:  # the dataclasses' own checks name the key in their message
        raise ConfigError(str(err)) from None


def toml_value(value: Any) -> str:
    """A str, bool, int or float written as TOML writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        # A JSON string is a TOML basic string, once non-ASCII is kept as is (TOML has no
        # surrogate-pair escapes) and DEL, which JSON leaves bare, is escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(value)


def to_toml(config: RunConfig) -> str:
    """The config as a TOML file that `load_config` reads back to the same object."""

    def line(name: str, value: Any) -> str:
        return f"{name} = {toml_value(value)}"

    lines = [line(f.name, getattr(config, f.name)) for f in dataclasses.fields(config) if f.name not in SECTIONS]
    for section in SECTIONS:
        part = getattr(config, section)
        lines += ["", f"[{section}]"] + [line(f.name, getattr(part, f.name)) for f in dataclasses.fields(part)]
    return "\n".join(lines) + "\n"


def field_comments(cls: type) -> dict[str, str]:
    """Each field of a dataclass -> its comment in the class's source: the comment that ends the
    field's line, or else the comment lines right above it ("" when it has none)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {  # line number -> comment text
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):  # a comment-only line
            above.insert(0, comments[line])
            line -= 1
        found[node.target.id] = comments.get(node.end_lineno) or " ".join(above)
    return found


def config_help(width: int = 110) -> str:
    """Every config key with its type, default (as TOML writes it) and comment, for `train --help`."""
    defaults = RunConfig()
    tables = [("", RunConfig, defaults)] + [
        (name, type(getattr(defaults, name)), getattr(defaults, name)) for name in SECTIONS
    ]
    text = [
        "config keys: a TOML file (--config) holds the top-level keys, then the tables [model], [data],",
        "[train], [dpo] and [lora]; on the command line a key is --section.key VALUE, or --key VALUE when the name",
        "is unique.",
    ]
    for section, cls, values in tables:
        text.append(f"\n[{section}]" if section else "")
        comments = field_comments(cls)
        for name, kind in _fields(cls).items():
            if name in SECTIONS:
                continue
            key = f"{section}.{name}" if section else name
            flag = f"  --{key} {kind.__name__.upper()} = {toml_value(getattr(values, name))}"
            lines = textwrap.wrap(comments[name], width - HELP_COLUMN) or [""]
            if len(flag) >= HELP_COLUMN:  # a long default: the comment starts on the next line
                text.append(flag)
                flag = ""
            text.append(flag.ljust(HELP_COLUMN) + lines[0])
            text += [" " * HELP_COLUMN + line for line in lines[1:]]
    return "\n".join(text)


HELP_COLUMN = 46  # where config_help's comments start
