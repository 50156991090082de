"""Command line: `python -m minisft demo` and `python -m minisft train --config FILE.toml [--key value ...]`.

A user's mistake (config, data, paths) ends with one line on stderr naming what to fix and exit
code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from minisft.chat import ChatML
from minisft.checkpoint import save_model
from minisft.config import ConfigError, RunConfig, load_config, to_toml
from minisft.data import DataError, read_conversations
from minisft.model import ATTENTION_BACKENDS, Transformer
from minisft.tokenizer import Tokenizer
from minisft.train import train_loop


def pick_kernels(name: str, device: torch.device) -> str:
    """'auto' means Triton on CUDA when its kernels are installed, PyTorch otherwise."""
    if name != "auto":
        return name
    return "triton" if device.type == "cuda" and "triton" in ATTENTION_BACKENDS else "torch"


def load_examples(path: str, chat: ChatML, max_seq_len: int) -> list:
    """Render every conversation; drop (and report) those longer than max_seq_len."""
    examples, too_long = [], 0
    for messages in read_conversations(path):
        example = chat.render(messages)
        if len(example.input_ids) > max_seq_len:
            too_long += 1
        else:
            examples.append(example)
    print(
        f"{path}: {len(examples)} conversations"
        + (f", {too_long} dropped as longer than {max_seq_len} tokens" if too_long else "")
    )
    if not examples:
        raise DataError(f"{path}: no usable conversations")
    return examples


def train_command(config: RunConfig) -> None:
    if not config.data.train_file or not config.data.tokenizer:
        raise ConfigError(
            "data.train_file and data.tokenizer must be set (in the TOML file or as --data.train_file ...)"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.from_file(config.data.tokenizer)
    chat = ChatML(tokenizer)
    if config.model.vocab_size < tokenizer.vocab_size:
        rounded = -(-tokenizer.vocab_size // 64) * 64  # a multiple of 64 keeps the head matmul aligned
        print(f"model.vocab_size {config.model.vocab_size} < tokenizer's {tokenizer.vocab_size}: using {rounded}")
        config = replace(config, model=replace(config.model, vocab_size=rounded))
    max_len = min(config.data.max_seq_len, config.model.max_seq_len)
    train_set = load_examples(config.data.train_file, chat, max_len)
    eval_sets = {"heldout": load_examples(config.data.eval_file, chat, max_len)} if config.data.eval_file else {}

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(config))
    torch.manual_seed(config.train.seed)
    model = Transformer(config.model, kernels=pick_kernels(config.kernels, device)).to(device)
    print(f"model: {config.model.num_params() / 1e6:.2f}M parameters on {device}, kernels={model.kernels}")
    train_loop(model, train_set, eval_sets, config.train, tokenizer.pad_id, out)
    final = save_model(out / "checkpoints" / "final", model, tokenizer, chat.name)
    print(f"saved {final}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minisft", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="pre-train then SFT a tiny model on a synthetic domain (CPU, ~2 min)")
    train = commands.add_parser("train", help="supervised fine-tuning from a TOML config")
    train.add_argument("--config", help="TOML file; any key can also be given as --section.key value")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "demo":
            if rest:
                raise ConfigError(f"demo takes no options, got {' '.join(rest)}")
            from minisft.demo import run_demo

            run_demo()
        else:
            train_command(load_config(args.config, rest))
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
