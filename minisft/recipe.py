"""The SFT recipe: one training run, from a RunConfig to checkpoints/final, top to bottom.

    python -m minisft train --config run.toml [--section.key value ...]   # the command line's way in
    train(config=load_config("run.toml"))                                   # the same run from Python

  1. the device, and the attention and loss backends (`kernels`, `attention`, `loss`);
  2. the model and its tokenizer: from `init` (a pretrained folder), or random at the shape of
     [model] with data.tokenizer, its vocabulary rounded up to fit the tokenizer; with [lora], the
     base frozen and adapters on its projections (checkpoints then hold the adapters alone);
  3. the data: training, held-out and plain-text files -> examples, each reported in one line;
  4. the run folder: config.toml (the resolved config, so `--resume` and readers see what ran),
     and what makes every checkpoint a model folder `chat` and `export` take;
  5. the loop (`train.py`), then checkpoints/final.

Under `torchrun` every rank runs all of it on its own share of the data; only rank 0 writes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from minisft import distributed
from minisft.chat import ChatFormat, Example, make_chat_format, render_text
from minisft.checkpoint import save_model, write_model_meta
from minisft.config import DataConfig, RunConfig, to_toml
from minisft.data import DataError
from minisft.dataset import load_examples
from minisft.errors import ConfigError
from minisft.model import Backends, Transformer, padded_vocab_size
from minisft.peft_format import attach_lora
from minisft.pretrained import find_model_folder, start_from
from minisft.tokenizer import Tokenizer
from minisft.train import train_loop


def pick_backends(config: RunConfig, device: torch.device) -> Backends:
    """`kernels` names both backends, `attention` and `loss` each one instead. "auto" is Triton on
    CUDA and PyTorch elsewhere: on a CPU the Triton kernels only run in the (slow) interpreter."""

    def pick(name: str) -> str:
        name = name or config.kernels
        if name != "auto":
            return name
        return "triton" if device.type == "cuda" else "torch"

    return Backends(attention=pick(config.attention), loss=pick(config.loss))


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


def new_model(config: RunConfig, backends: Backends) -> tuple[Transformer, Tokenizer, ChatFormat, RunConfig]:
    """A random model at [model]'s shape for data.tokenizer; -> (model, tokenizer, chat format, the
    config with model.vocab_size raised to fit the tokenizer, if it had to be)."""
    tokenizer = Tokenizer.from_file(config.data.tokenizer)
    chat = chat_format(config.data.chat_format, tokenizer, config.data.train_on)
    if config.model.vocab_size < tokenizer.vocab_size:
        rounded = padded_vocab_size(tokenizer.vocab_size)
        print(f"model.vocab_size {config.model.vocab_size} < tokenizer's {tokenizer.vocab_size}: using {rounded}")
        config = replace(config, model=replace(config.model, vocab_size=rounded))
    torch.manual_seed(config.train.seed)
    return Transformer(config.model, backends), tokenizer, chat, config


def train(*, config: RunConfig, resume: bool = False) -> dict[str, float]:
    """Run the recipe; -> the loop's result (last held-out losses, skipped steps, last step).

    resume=True continues config.out_dir from its newest checkpoint (config must be the run's own)."""
    if not config.data.train_file or not (config.data.tokenizer or config.init):
        raise ConfigError(
            "data.train_file and data.tokenizer (or init) must be set (in the TOML file or as --data.train_file ...)"
        )
    ranks = distributed.setup()
    try:
        # 1. Where, and with which kernels.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backends = pick_backends(config, device)

        # 2. The model and its tokenizer.
        if config.init:  # the model, its shape and its tokenizer come from the folder
            model, tokenizer, chat, config = start_from(config, backends)
        else:
            model, tokenizer, chat, config = new_model(config, backends)
        if config.lora.enabled:  # the base frozen, low-rank adapters on its projections (lora.py)
            torch.manual_seed(config.train.seed)  # the adapters' random A: one seed, one start
            config = replace(config, lora=attach_lora(model, config.lora, find_model_folder(config.init)))
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"LoRA r={config.lora.r} on {config.lora.targets}: {trained:,} parameters train")
        model = model.to(device)

        # 3. The data.
        max_len = min(config.data.max_seq_len, config.model.max_seq_len)
        train_set = load_data(config.data.train_file, chat, config.data, max_len)
        eval_sets = {}  # the first one (held-out chats) picks checkpoints/best and drives early stopping
        if config.data.eval_file:
            eval_sets["heldout"] = load_data(config.data.eval_file, chat, config.data, max_len)
        if config.data.plain_text_eval:
            eval_sets["plain_text"] = load_plain_text(config.data.plain_text_eval, tokenizer, max_len)

        # 4. The run folder.
        out = Path(config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if ranks.is_main and not resume:
            (out / "config.toml").write_text(to_toml(config))
        print(f"model: {config.model.num_params() / 1e6:.2f}M parameters on {device}, {model.backends}")

        def write_extra(folder: Path) -> None:  # makes every checkpoint a model folder `chat` and `export` take
            write_model_meta(folder, model.config, tokenizer, chat.name)
            (folder / "config.toml").write_text(to_toml(config))

        # 5. The loop, then the final model.
        pack_to = max_len if config.data.packing else 0
        result = train_loop(
            model, train_set, eval_sets, config.train, tokenizer.pad_id, out, "train", pack_to, resume, write_extra
        )
        if ranks.is_main:
            final = save_model(out / "checkpoints" / "final", model, tokenizer, chat.name)
            print(f"saved {final}")
        # Wait for rank 0's final save before any rank leaves: a rank tearing down its process
        # group while another still works can abort the others. (Not on errors: it could hang.)
        distributed.barrier()
    finally:
        distributed.teardown()
    return result
