"""Command line: `python -m minisft demo`, `python -m minisft train --config FILE.toml [--key value ...]`,
`python -m minisft data check FILE [--tokenizer PATH ...]`, `python -m minisft chat MODEL [--prompt TEXT]`
and `python -m minisft export MODEL OUT` (a Hugging Face folder). `train --init PATH` fine-tunes a
pretrained model (a Hugging Face or minisft folder) instead of a random one; `train --resume RUN_DIR`
continues an interrupted run from its newest checkpoint, with the run's own config.toml. Under
`torchrun --nproc_per_node N -m minisft train ...` the run is data-parallel over N processes.

A user's mistake (config, data, paths) ends with one line on stderr naming what to fix and exit
code 2 — never a traceback. A run stopped by its NaN guard (train.max_bad_steps non-finite steps
in a row) ends the same way with exit code 3.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from minisft import distributed
from minisft.chat import CHAT_FORMATS, TRAIN_ON, ChatFormat, Example, make_chat_format, render_text
from minisft.chat_cli import add_arguments as add_chat_arguments
from minisft.chat_cli import chat_command
from minisft.checkpoint import save_model, write_model_meta
from minisft.config import ConfigError, DataConfig, RunConfig, load_config, to_toml
from minisft.data import FORMATS, DataError
from minisft.datacheck import check_file, format_report
from minisft.dataset import load_examples
from minisft.hf import CheckpointError, export_hf
from minisft.model import ATTENTION_BACKENDS, Backends, Transformer, padded_vocab_size
from minisft.pretrained import load_pretrained, start_from
from minisft.tokenizer import Tokenizer
from minisft.train import DivergedError, TrainingError, train_loop


def pick_kernels(name: str, device: torch.device) -> str:
    """'auto' means Triton on CUDA when its kernels are installed, PyTorch otherwise."""
    if name != "auto":
        return name
    return "triton" if device.type == "cuda" and "triton" in ATTENTION_BACKENDS else "torch"


def chat_format(name: str, tokenizer: Tokenizer, train_on: str) -> ChatFormat:
    try:
        return make_chat_format(name, tokenizer, train_on)
    except KeyError as err:  # the format's special tokens are not in this tokenizer
        raise ConfigError(f"chat format {name!r} does not fit this tokenizer: {err.args[0]}") from None


def load_data(path: str, chat: ChatFormat, data: DataConfig, max_seq_len: int) -> list[Example]:
    """Read, render and length-check a file as the config says; print what happened to it."""
    examples, report = load_examples(path, chat, max_seq_len, data.format, data.on_error, data.too_long, data.cache_dir)
    print(report.summary())
    if not examples:  # every record bad, too long, or cut off before its answer: nothing to train on
        raise DataError(f"no example with a trained token left in {report.summary()}")
    return examples


def load_plain_text(path: str, tokenizer: Tokenizer, max_len: int) -> list[Example]:
    """One document per non-empty line, every token trained (data.plain_text_eval: the forgetting
    curve); a longer document is cut to max_len tokens."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: no text (data.plain_text_eval wants one document per line)")
    examples = [render_text(tokenizer, line) for line in lines]
    cut = sum(len(e.input_ids) > max_len for e in examples)
    print(f"{path}: {len(examples)} plain-text documents" + (f", {cut} cut to {max_len} tokens" if cut else ""))
    return [Example(e.input_ids[:max_len], e.labels[:max_len]) for e in examples]


def resume_config(run_dir: str, config_file: str | None, overrides: list[str]) -> RunConfig:
    """`train --resume RUN_DIR`: the run's own config.toml, as it was, so the run goes on unchanged."""
    if config_file or overrides:
        given = " ".join(([f"--config {config_file}"] if config_file else []) + overrides)
        raise ConfigError(
            f"--resume continues {run_dir} with its own config.toml; drop {given} (other settings are another run)"
        )
    return replace(load_config(Path(run_dir) / "config.toml"), out_dir=run_dir)


def train_command(config: RunConfig, resume: bool = False) -> None:
    ranks = distributed.setup()
    try:
        train_run(config, ranks, resume)
        # Wait for rank 0's final save before any rank leaves: a rank tearing down its process
        # group while another still works can abort the others. (Not on errors: it could hang.)
        distributed.barrier()
    finally:
        distributed.teardown()


def train_run(config: RunConfig, ranks: distributed.Ranks, resume: bool) -> None:
    if not config.data.train_file or not (config.data.tokenizer or config.init):
        raise ConfigError(
            "data.train_file and data.tokenizer (or init) must be set (in the TOML file or as --data.train_file ...)"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernels = pick_kernels(config.kernels, device)
    if config.init:  # the model, its shape and its tokenizer come from the folder
        model, tokenizer, chat, config = start_from(config, Backends(kernels, kernels))
    else:
        tokenizer = Tokenizer.from_file(config.data.tokenizer)
        chat = chat_format(config.data.chat_format, tokenizer, config.data.train_on)
        if config.model.vocab_size < tokenizer.vocab_size:
            rounded = padded_vocab_size(tokenizer.vocab_size)
            print(f"model.vocab_size {config.model.vocab_size} < tokenizer's {tokenizer.vocab_size}: using {rounded}")
            config = replace(config, model=replace(config.model, vocab_size=rounded))
        torch.manual_seed(config.train.seed)
        model = Transformer(config.model, Backends(kernels, kernels))
    model = model.to(device)
    max_len = min(config.data.max_seq_len, config.model.max_seq_len)
    train_set = load_data(config.data.train_file, chat, config.data, max_len)
    eval_sets = {}  # the first one (held-out chats) picks checkpoints/best and drives early stopping
    if config.data.eval_file:
        eval_sets["heldout"] = load_data(config.data.eval_file, chat, config.data, max_len)
    if config.data.plain_text_eval:
        eval_sets["plain_text"] = load_plain_text(config.data.plain_text_eval, tokenizer, max_len)

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ranks.is_main and not resume:
        (out / "config.toml").write_text(to_toml(config))
    print(f"model: {config.model.num_params() / 1e6:.2f}M parameters on {device}, {model.backends}")

    def write_extra(folder: Path) -> None:  # makes every checkpoint a model folder `chat` and `export` take
        write_model_meta(folder, model.config, tokenizer, chat.name)
        (folder / "config.toml").write_text(to_toml(config))

    pack_to = max_len if config.data.packing else 0
    train_loop(model, train_set, eval_sets, config.train, tokenizer.pad_id, out, "train", pack_to, resume, write_extra)
    if ranks.is_main:
        final = save_model(out / "checkpoints" / "final", model, tokenizer, chat.name)
        print(f"saved {final}")


def data_check_command(args: argparse.Namespace) -> int:
    """Print the quality report; exit 2 when the file holds bad records."""
    chat = None
    if args.tokenizer:
        chat = chat_format(args.chat_format, Tokenizer.from_file(args.tokenizer), args.train_on)
    report = check_file(args.file, chat, args.max_seq_len, args.format)
    print(format_report(report, chat))
    return 2 if report.read.num_skipped else 0


def export_command(args: argparse.Namespace) -> int:
    model, tokenizer, chat_format = load_pretrained(args.model)
    if chat_format is None:
        raise CheckpointError(f"{args.model} has no chat format to export with (a base model?)")
    print(f"exported {export_hf(args.out, model, tokenizer, chat_format)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minisft", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="pre-train then SFT a tiny model on a synthetic domain (CPU, ~2 min)")
    train = commands.add_parser("train", help="supervised fine-tuning from a TOML config")
    train.add_argument("--config", help="TOML file; any key can also be given as --section.key value")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint")
    data = commands.add_parser("data", help="inspect a data file").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="quality report: layouts, bad records, duplicates, lengths")
    check.add_argument("file", help="JSONL or JSON file of records")
    check.add_argument("--tokenizer", help="tokenizer.json or its folder: lengths in tokens (else characters)")
    check.add_argument("--chat-format", default="chatml", choices=sorted(CHAT_FORMATS))
    check.add_argument("--train-on", default="assistant", choices=TRAIN_ON)
    check.add_argument("--format", default="auto", choices=FORMATS, help="record layout (default: per record)")
    check.add_argument("--max-seq-len", type=int, default=0, help="count records longer than this many tokens")
    add_chat_arguments(commands.add_parser("chat", help="talk to a model in the terminal (or answer --prompt)"))
    export = commands.add_parser("export", help="write a model as a Hugging Face folder (transformers loads it)")
    export.add_argument("model", help="a run folder or a minisft checkpoint")
    export.add_argument("out", help="the folder to write")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "data":
            if rest:
                raise ConfigError(f"data check: unknown options {' '.join(rest)}")
            return data_check_command(args)
        if args.command in ("chat", "export"):
            if rest:
                raise ConfigError(f"{args.command}: unknown options {' '.join(rest)}")
            return chat_command(args) if args.command == "chat" else export_command(args)
        if args.command == "demo":
            if rest:
                raise ConfigError(f"demo takes no options, got {' '.join(rest)}")
            from minisft.demo import run_demo

            run_demo()
        else:
            config = resume_config(args.resume, args.config, rest) if args.resume else load_config(args.config, rest)
            train_command(config, resume=bool(args.resume))
    except DivergedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ConfigError, DataError, CheckpointError, TrainingError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
