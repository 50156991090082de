"""minisft: supervised fine-tuning of language models, small enough to read.

  python -m minisft demo                                 pre-train, then SFT, a tiny model on the CPU
  python -m minisft demo --model smollm2                 SFT of SmolLM2-135M on support tickets, measured
  python -m minisft demo --model smollm2 --lora 16       the same with LoRA adapters of rank 16
  python -m minisft demo --model smollm2 --dpo           SFT, then DPO teaching a preference SFT never saw
  python -m minisft train --config FILE.toml [--section.key VALUE ...]   fine-tune (train --help: every key)
  python -m minisft train --init MODEL_DIR ...           fine-tune a pretrained model (HF, GGUF or minisft)
  python -m minisft train --init MODEL_DIR --lora.r 16   LoRA: adapters only ([lora] keys in train --help)
  python -m minisft train --init BASE --adapter DIR      continue from LoRA adapters (minisft's or PEFT's)
  python -m minisft train --resume RUN_DIR               continue a run from its newest checkpoint
  python -m minisft train ... --overwrite                replace the run out_dir holds (else refused)
  python -m minisft dpo --config FILE.toml --init SFT_RUN   preference tuning (train with objective = "dpo")
  python -m minisft dpo --init BASE --adapter SFT_ADAPTER   DPO of an SFT run's LoRA adapters (or --lora.r R: new ones)
  python -m minisft data check FILE [--tokenizer PATH]   the data's quality report
  python -m minisft chat MODEL [--prompt TEXT]           talk to a model in its own chat format
  python -m minisft export MODEL OUT [--overwrite]       write a Hugging Face folder (new or empty), or OUT.gguf
  python -m minisft export ADAPTER OUT --merge           a LoRA run's adapters merged into their base

Flags are spelled with underscores, as config keys are (--chat_format, --max_seq_len); a hyphen in a
flag's name is read as an underscore. Under `torchrun --nproc_per_node N -m minisft train ...` the run
is data-parallel over N processes. A user's mistake (config, data, paths) ends with one line on
stderr naming what to fix and exit code 2 — never a traceback; a run stopped by its NaN guard
(train.max_bad_steps non-finite steps in a row) ends the same way with exit code 3, and one
stopped by Ctrl-C with exit code 130, naming its newest checkpoint and the --resume command.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from minisft import recipe
from minisft.chat import CHAT_FORMATS, TRAIN_ON
from minisft.chat_cli import add_arguments as add_chat_arguments
from minisft.chat_cli import chat_command
from minisft.config import RunConfig, config_help, load_config, parse_overrides, underscore_flags
from minisft.data import FORMATS, DataError
from minisft.datacheck import check_file, format_report
from minisft.errors import ConfigError, DivergedError, TrainingError
from minisft.gguf import GGUF_TYPES, export_gguf
from minisft.hf import CheckpointError, export_hf
from minisft.lora import merge_lora
from minisft.outputs import check_export_target, interrupted
from minisft.pretrained import SavedModel
from minisft.tokenizer import Tokenizer


def resume_config(run_dir: str, config_file: str | None, overrides: list[str]) -> RunConfig:
    """`train --resume RUN_DIR`: the run's own config.toml, as it was, so the run goes on unchanged —
    except train.steps, which may be raised to train a finished run further."""
    others = [f"--{key} {value}" for key, value in parse_overrides(overrides).items() if key != "train.steps"]
    if config_file or others:
        given = " ".join(([f"--config {config_file}"] if config_file else []) + others)
        raise ConfigError(
            f"--resume continues {run_dir} with its own config.toml (only --steps may be raised); drop {given}"
        )
    own = load_config(Path(run_dir) / "config.toml")
    config = load_config(Path(run_dir) / "config.toml", overrides)
    if config.train.steps < own.train.steps:
        raise ConfigError(f"train.steps can only be raised on resume: {run_dir} was trained toward {own.train.steps}")
    return replace(config, out_dir=run_dir)


def data_check_command(args: argparse.Namespace) -> int:
    """Print the quality report; exit 2 when the file holds bad records (or, with --strict, warnings)."""
    chat = None
    if args.tokenizer:
        chat = recipe.chat_format(args.chat_format, Tokenizer.from_file(args.tokenizer), args.train_on)
    report = check_file(args.file, chat, args.max_seq_len, args.format)
    print(format_report(report, chat))
    if not report.read.records and not report.read.num_skipped:  # `train` refuses it too: nothing to train on
        print(f"error: {args.file} holds no records (empty or whitespace only)", file=sys.stderr)
        return 2
    if args.strict and report.num_warnings:
        print(f"error: {report.num_warnings} warnings in {args.file} (--strict)", file=sys.stderr)
        return 2
    return 2 if report.read.num_skipped else 0


def export_command(args: argparse.Namespace) -> int:
    """Refuse what can be refused before the weights load: no chat format, an OUT that is not new
    or empty (without --overwrite), the model's own folder (`outputs.py`)."""
    saved = SavedModel(args.model)
    if args.merge != (saved.adapter is not None):
        raise ConfigError(
            f"{saved.path} holds LoRA adapters: pass --merge to fold them into their base and export that"
            if saved.adapter is not None
            else f"--merge is for a LoRA adapter folder; {saved.path} is a whole model"
        )
    if saved.chat_format is None:
        raise CheckpointError(f"{saved.why_no_chat_format()}: the export needs the format it was trained with")
    to_gguf = args.out.endswith(".gguf")
    if not to_gguf and args.gguf_type:
        raise ConfigError("--gguf_type is for a .gguf output")
    check_export_target(args.out, saved.path, args.overwrite)
    model, tokenizer = saved.load()
    if args.merge:
        merge_lora(model)
    if to_gguf:
        out = export_gguf(args.out, model, tokenizer, saved.chat_format, args.gguf_type or "f16", args.overwrite)
    else:
        out = export_hf(args.out, model, tokenizer, saved.chat_format)
    print(f"exported {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m minisft", description=__doc__, formatter_class=raw)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="pre-train then SFT a tiny model on a synthetic domain, on the CPU")
    demo.add_argument("--model", help="the real-model demo instead: 'smollm2' (SmolLM2-135M-Instruct) or a model path")
    demo.add_argument("--threads", type=int, default=1, help="torch threads for --model (0: one per core)")
    demo.add_argument("--lora", type=int, default=0, metavar="R", help="with --model: LoRA of rank R, not every weight")
    demo.add_argument("--dpo", action="store_true", help="with --model: SFT, then DPO for a preference SFT never saw")
    runs = {  # the two training commands: the same config keys and flags, another objective
        "train": (
            "supervised fine-tuning from a TOML config and --section.key VALUE flags",
            "Supervised fine-tuning: a TOML config (--config), overridden by any key below as a flag.",
        ),
        "dpo": (
            "preference tuning (DPO) of a model: train with objective = 'dpo', same keys and flags",
            "DPO on prompt/chosen/rejected records (minisft/preference.py): train's keys, objective = 'dpo'.",
        ),
    }
    for name, (summary, description) in runs.items():
        command = commands.add_parser(
            name, help=summary, description=description, epilog=config_help(), formatter_class=raw
        )
        command.add_argument("--config", help="TOML file; any key below can also be given as --section.key VALUE")
        command.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint")
        replace_help = "replace the run out_dir holds (its config.toml, metrics, checkpoints)"
        command.add_argument("--overwrite", action="store_true", help=replace_help)
    data = commands.add_parser("data", help="inspect a data file").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="quality report: layouts, bad records, duplicates, lengths")
    check.add_argument("file", help="JSONL or JSON file of records")
    check.add_argument("--tokenizer", help="tokenizer.json or its folder: lengths in tokens (else characters)")
    check.add_argument("--chat_format", default="chatml", choices=sorted(CHAT_FORMATS), help="as data.chat_format")
    check.add_argument("--train_on", default="assistant", choices=TRAIN_ON, help="as data.train_on")
    check.add_argument("--format", default="auto", choices=FORMATS, help="record layout (default: per record)")
    check.add_argument("--max_seq_len", type=int, default=0, help="count records longer than this many tokens")
    check.add_argument("--strict", action="store_true", help="exit 2 on any warning too, not only on bad records")
    add_chat_arguments(commands.add_parser("chat", help="talk to a model in the terminal (or answer --prompt)"))
    export = commands.add_parser("export", help="write a model as a Hugging Face folder or a GGUF file")
    export.add_argument("model", help="a run folder, a minisft checkpoint, a Hugging Face folder or a .gguf file")
    export.add_argument("out", help="the folder to write (transformers loads it), or a .gguf file (llama.cpp)")
    export.add_argument("--gguf_type", choices=GGUF_TYPES, help="weights in a .gguf file (default f16; norms f32)")
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing .gguf file, or the files export writes in a non-empty folder",
    )
    export.add_argument("--merge", action="store_true", help="MODEL is a LoRA adapter: export base + adapters merged")
    args, rest = parser.parse_known_args(underscore_flags(sys.argv[1:] if argv is None else argv))
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
            if args.lora and (args.lora < 0 or not args.model or args.dpo):
                raise ConfigError("demo --lora R: R ≥ 1, with --model (LoRA needs a pretrained model), without --dpo")
            if args.dpo:
                from minisft.demo_dpo import DPODemoConfig, run_dpo_demo

                run_dpo_demo(DPODemoConfig(model=args.model or "smollm2", threads=args.threads))
            elif args.model:
                from minisft.demo_real import RealDemoConfig, run_real_demo

                run_real_demo(RealDemoConfig(model=args.model, threads=args.threads, lora_r=args.lora))
            else:
                from minisft.demo import run_demo

                run_demo()
        else:
            if args.command == "dpo" and not args.resume:
                rest = [*rest, "--objective", "dpo"]
            config = resume_config(args.resume, args.config, rest) if args.resume else load_config(args.config, rest)
            if args.command == "dpo" and config.objective != "dpo":
                raise ConfigError(f"{args.resume}: a run of objective {config.objective!r}; resume it with train")
            try:
                recipe.train(config=config, resume=bool(args.resume), overwrite=args.overwrite)
            except KeyboardInterrupt:  # Ctrl-C: where the run stands, and how to go on
                print(f"error: {interrupted(config.out_dir)}", file=sys.stderr)
                return 130
    except KeyboardInterrupt:
        print(f"error: {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process Ctrl-C stopped
    except DivergedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ConfigError, DataError, CheckpointError, TrainingError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
