"""The SFT (or DPO) recipe: one training run, from a RunConfig to checkpoints/final, top to bottom.

    python -m minisft train --config run.toml [--section.key value ...]   # the command line's way in
    train(config=load_config("run.toml"))                                   # the same run from Python

  1. the device, and the attention and loss backends (`kernels`, `attention`, `loss`);
  2. the model and its tokenizer: from `init` (a pretrained folder), or random at the shape of
     [model] with data.tokenizer, its vocabulary rounded up to fit the tokenizer; with [lora], the
     base frozen and adapters on its projections (checkpoints then hold the adapters alone);
  3. the data: training, held-out and plain-text files -> examples, each reported in one line;
  4. the run folder: config.toml (the resolved config, so `--resume` and readers see what ran),
     and what makes every checkpoint a model folder `chat` and `export` take;
  5. the loop (`train.py`), then checkpoints/final. With objective = "dpo" the data are preference
     pairs (`preference.py`), each given its reference log-probs before the first step, and the
     loop's objective is DPO's (`dpo.py`).

Under `torchrun` every rank runs all of it on its own share of the data; only rank 0 writes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from minisft import distributed, dpo, preference
from minisft.chat import ChatFormat, Example, forgetting_text, make_chat_format
from minisft.checkpoint import save_model, write_model_meta
from minisft.config import DataConfig, RunConfig, load_config, to_toml
from minisft.data import DataError
from minisft.dataset import load_examples
from minisft.errors import ConfigError
from minisft.model import Backends, Transformer, padded_vocab_size
from minisft.outputs import claim_run_dir, clear_run
from minisft.peft_format import attach_lora
from minisft.preference import Pair
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


def fit_attention(model: Transformer, config: RunConfig) -> None:
    """A head too wide for the Triton attention's tiles: with kernels "auto" the model takes PyTorch's
    attention instead, and says so; attention = "triton" asked for is refused, before any data is read."""
    if model.backends.attention != "triton":
        return
    from triton_kernels.attention import check_head_dim  # imported on use: triton is heavy

    try:
        check_head_dim(config.model.head_dim)
    except ValueError as err:
        if (config.attention or config.kernels) != "auto":
            raise ConfigError(str(err)) from None
        model.backends = replace(model.backends, attention="torch")
        print(f"{err.args[0].split(':')[0]}: attention=torch (kernels = 'auto')")


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


def load_pairs(path: str, chat: ChatFormat, data: DataConfig, max_seq_len: int) -> list[Pair]:
    """`load_data` for DPO's preference records (`preference.py`)."""
    pairs, report = preference.load_pairs(path, chat, max_seq_len, data.on_error, data.too_long)
    print(report.summary().replace(" examples from", " pairs from"))
    if not pairs:
        raise DataError(f"no preference pair left in {report.summary()}")
    return pairs


def load_plain_text(path: str, tokenizer: Tokenizer, max_len: int) -> list[Example]:
    """One document per non-empty line, every token a target but no end-of-text one
    (data.plain_text_eval: the forgetting curve; `forgetting_text` says why); a longer document is
    cut to max_len tokens, a one-token line (nothing to predict) skipped and named."""
    lines = [(n, line) for n, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{path}: no text (data.plain_text_eval wants one document per line)")
    numbered = [(n, forgetting_text(tokenizer, line)) for n, line in lines]
    single = [n for n, e in numbered if not e.labels]
    examples = [e for _, e in numbered if e.labels]
    if not examples:
        raise DataError(f"{path}: every line is a single token: a document needs two to predict one")
    cut = sum(len(e.input_ids) > max_len for e in examples)
    notes = [f"{cut} cut to {max_len} tokens"] * bool(cut)
    notes += [f"{len(single)} of one token skipped (line {', '.join(map(str, single[:5]))})"] * bool(single)
    print(f"{path}: {len(examples)} plain-text documents" + "".join(f", {note}" for note in notes))
    return [e.cut(max_len) for e in examples]


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


def train(*, config: RunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, float]:
    """Run the recipe; -> the loop's result (last held-out losses, skipped steps, last step).

    resume=True continues config.out_dir from its newest checkpoint (config must be the run's own).
    An out_dir already holding a run is refused, unless resume, or overwrite (which replaces that run)."""
    if not config.data.train_file or not (config.data.tokenizer or config.init):
        raise ConfigError(
            "data.train_file and data.tokenizer (or init) must be set (in the TOML file or as --data.train_file ...)"
        )
    claim_run_dir(config.out_dir, resume, overwrite)
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
        fit_attention(model, config)
        model = model.to(device)

        # 3. The data: conversations, or preference pairs for DPO.
        max_len = min(config.data.max_seq_len, config.model.max_seq_len)
        load = load_pairs if config.objective == "dpo" else load_data
        train_set = load(config.data.train_file, chat, config.data, max_len)
        eval_sets = {}  # the first one (held-out chats) picks checkpoints/best and drives early stopping
        if config.data.eval_file:
            eval_sets["heldout"] = load(config.data.eval_file, chat, config.data, max_len)
        if config.data.plain_text_eval:
            eval_sets["plain_text"] = load_plain_text(config.data.plain_text_eval, tokenizer, max_len)

        # 4. The run folder.
        out = Path(config.out_dir)
        if overwrite and ranks.is_main:  # only now: a run refused on its config or data deletes nothing
            clear_run(out)
        distributed.barrier()  # no rank writes before the old run is gone
        out.mkdir(parents=True, exist_ok=True)
        if ranks.is_main and not resume:
            (out / "config.toml").write_text(to_toml(config))
        elif ranks.is_main and (out / "config.toml").is_file():
            own = load_config(out / "config.toml")
            if own.train.steps != config.train.steps:  # --resume RUN --steps N: the next --resume reads N
                (out / "config.toml").write_text(to_toml(replace(config, out_dir=own.out_dir)))
        print(f"model: {config.model.num_params() / 1e6:.2f}M parameters on {device}, {model.backends}")

        def write_extra(folder: Path) -> None:  # makes every checkpoint a model folder `chat` and `export` take
            write_model_meta(folder, model.config, tokenizer, chat.name)
            (folder / "config.toml").write_text(to_toml(config))

        # 5. The loop, then the final model. DPO: the reference log-probs first, from the model as it starts.
        pack_to = max_len if config.data.packing and config.objective == "sft" else 0
        objective, label = None, "train"
        if config.objective == "dpo":
            sets = dpo.with_reference(
                model, {"train": train_set, **eval_sets}, out, resume, tokenizer.pad_id,
                config.train.eval_batch_size, config.train.precision, ranks.is_main,
            )  # fmt: skip
            train_set, eval_sets = sets.pop("train"), sets
            objective, label = dpo.DPOObjective(config.dpo), "dpo"
        result = train_loop(
            model, train_set, eval_sets, config.train, tokenizer.pad_id, out, label, pack_to, resume,
            write_extra, objective,
        )  # fmt: skip
        weights = distributed.full_model_state(model)  # FSDP2: gathered whole on rank 0 (every rank joins)
        if ranks.is_main:
            final = save_model(out / "checkpoints" / "final", model, tokenizer, chat.name, weights)
            print(f"saved {final}")
        # Wait for rank 0's final save before any rank leaves: a rank tearing down its process
        # group while another still works can abort the others. (Not on errors: it could hang.)
        distributed.barrier()
    finally:
        distributed.teardown()
    return result
