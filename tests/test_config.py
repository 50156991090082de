"""minisft.config: TOML + command-line overrides, round trip, and one-line errors naming the key."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minisft.config import ConfigError, DataConfig, RunConfig, load_config, parse_overrides, to_toml
from minisft.model import ModelConfig
from minisft.train import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

TOML = """\
out_dir = "runs/test"
kernels = "torch"

[model]
dim = 64
n_layers = 2
rope_theta = 500    # an int where a float is expected is fine

[train]
lr = 0.5
steps = 3
"""


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file():
    assert load_config() == RunConfig()


def test_toml_plus_overrides(tmp_path):
    path = write(tmp_path, TOML)
    config = load_config(path, ["--train.lr", "0.01", "--steps", "7", "--model.tie_embeddings=false"])
    assert config.out_dir == "runs/test" and config.kernels == "torch"
    assert config.model.dim == 64 and type(config.model.dim) is int
    assert config.model.n_layers == 2
    assert config.model.rope_theta == 500.0 and type(config.model.rope_theta) is float
    assert config.train.lr == 0.01 and type(config.train.lr) is float  # the command line wins over the file
    assert config.train.steps == 7 and type(config.train.steps) is int
    assert config.model.tie_embeddings is False
    # untouched keys keep their defaults
    assert config.model.n_heads == ModelConfig().n_heads and config.train.seed == TrainConfig().seed
    assert config.data == DataConfig()


@pytest.mark.parametrize("text, value", [("true", True), ("FALSE", False), ("1", True), ("0", False)])
def test_bool_spellings(text, value):
    assert load_config(None, ["--model.tie_embeddings", text]).model.tie_embeddings is value


def test_parse_overrides_resolves_unique_suffixes():
    assert parse_overrides(["--lr", "3e-4", "--train.steps=10", "--dim", "64"]) == {
        "train.lr": "3e-4",
        "train.steps": "10",
        "model.dim": "64",
    }


def test_to_toml_round_trips(tmp_path):
    config = RunConfig(
        out_dir='runs/with "quotes" \\ and é',
        kernels="torch",
        model=ModelConfig(
            vocab_size=300,
            dim=48,
            n_layers=3,
            n_heads=6,
            n_kv_heads=3,
            ffn_dim=96,
            rope_theta=123456.5,
            norm_eps=1e-6,
            tie_embeddings=False,
        ),
        data=DataConfig(train_file="a.jsonl", eval_file="", tokenizer="tok/", max_seq_len=77),
        train=TrainConfig(steps=11, lr=3e-4, min_lr_ratio=0.0, grad_clip=0.0, weight_decay=0.05, seed=9),
    )
    loaded = load_config(write(tmp_path, to_toml(config)))
    assert loaded == config
    for section in ("model", "data", "train"):
        for f in dataclasses.fields(getattr(config, section)):
            assert type(getattr(loaded, section).__dict__[f.name]) is type(getattr(config, section).__dict__[f.name])


def test_to_toml_round_trips_non_bmp_characters(tmp_path):
    config = RunConfig(out_dir="runs/🙂")
    assert load_config(write(tmp_path, to_toml(config))) == config


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "text, needles",
    [
        ("[train]\nlrr = 0.1\n", ["'train.lrr'", "did you mean 'train.lr'"]),
        ("out_dirr = 'x'\n", ["'out_dirr'", "did you mean 'out_dir'"]),
        ("[optim]\nlr = 0.1\n", ["[optim]", "model, data, train"]),
        ("[train]\nsteps = 'abc'\n", ["train.steps", "expected int", "'abc'"]),
        ("[train]\nsteps = 1.5\n", ["train.steps", "expected int", "1.5"]),
        ("[train]\nsteps = true\n", ["train.steps", "expected int", "True"]),
        ("[model]\ntie_embeddings = 'yes'\n", ["model.tie_embeddings", "expected true or false", "'yes'"]),
        ("[data]\ntrain_file = 3\n", ["data.train_file", "expected str"]),
        ("[train\nlr = 0.1\n", ["invalid TOML"]),
        ("[train]\nsteps = 0\n", ["train.steps must be at least 1, got 0"]),
    ],
)
def test_file_errors_name_the_key(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = one_line_error(excinfo)
    for needle in needles:
        assert needle in message
    if "invalid TOML" in needles:
        assert str(path) in message


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--train.lrr", "0.1"], ["'train.lrr'", "did you mean 'train.lr'"]),
        (["--nosuchkey", "1"], ["'nosuchkey'"]),
        (["--train.steps", "abc"], ["train.steps", "expected int", "'abc'"]),
        (["--model.tie_embeddings", "flase"], ["model.tie_embeddings", "expected true or false", "'flase'"]),
        (["--train.lr"], ["--train.lr needs a value"]),
        (["train.lr", "0.1"], ["expected --key value", "'train.lr'"]),
        (["--max_seq_len", "64"], ["ambiguous key 'max_seq_len'", "model.max_seq_len", "data.max_seq_len"]),
        (["--train.steps", "0"], ["train.steps must be at least 1, got 0"]),
        (["--train.lr", "-1"], ["train.lr must be positive"]),
        (["--model.dim", "30"], ["model.dim=30 must be divisible by model.n_heads=4"]),
        (["--stepz", "3"], ["'stepz'", "did you mean 'train.steps'"]),
        (["--kernels", "cuda"], ["kernels: unknown backend 'cuda'", "auto, torch"]),
    ],
)
def test_command_line_errors_name_the_key(args, needles):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, args)
    message = one_line_error(excinfo)
    for needle in needles:
        assert needle in message


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"config file not found: {tmp_path / 'nope.toml'}")):
        load_config(tmp_path / "nope.toml")


def test_zero_kv_heads_is_a_config_error():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_config(None, ["--model.n_kv_heads", "0"])


def test_cli_bad_key_is_one_line_on_stderr_and_exit_code_2(tmp_path):
    path = write(tmp_path, "[train]\nlrr = 0.1\n", name="bad.toml")
    result = subprocess.run(
        [sys.executable, "-m", "minisft", "train", "--config", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n")
    assert result.stderr.startswith("error: ")
    assert "'train.lrr'" in result.stderr and "did you mean 'train.lr'" in result.stderr
    assert result.stdout == ""


def test_chat_does_not_import_the_training_stack():
    """`python -m minisft chat` loads a model and a tokenizer; the config, the loop and DDP stay out."""
    code = "import sys, minisft.chat_cli; print(sorted(m for m in sys.modules if m.startswith('minisft')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for module in ("minisft.config", "minisft.train", "minisft.distributed", "minisft.recipe"):
        assert f"'{module}'" not in result.stdout
    assert "'minisft.errors'" in result.stdout


def test_kernels_names_both_backends_and_attention_or_loss_override_it(tmp_path):
    import torch

    from minisft.model import Backends
    from minisft.recipe import pick_backends

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_backends(load_config(), cpu) == Backends("torch", "torch")  # auto: the kernels need a GPU
    assert pick_backends(load_config(), cuda) == Backends("triton", "triton")
    assert pick_backends(load_config(None, ["--loss", "triton"]), cpu) == Backends("torch", "triton")
    assert pick_backends(load_config(None, ["--kernels", "triton", "--attention", "torch"]), cpu) == Backends(
        "torch", "triton"
    )
    old = load_config(write(tmp_path, 'kernels = "torch"\n'))  # a config.toml written before the split
    assert pick_backends(old, cuda) == Backends("torch", "torch")
    with pytest.raises(ConfigError, match="loss: unknown backend 'liger'"):
        load_config(None, ["--loss", "liger"])


def test_train_help_lists_every_key_with_its_type_default_and_comment(capsys):
    from minisft.__main__ import main
    from minisft.config import _all_keys, field_comments

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    keys = _all_keys()
    assert len(keys) > 50
    for key, kind in keys.items():
        assert f"--{key} {kind.__name__.upper()} = " in out, key
    assert "--train.lr FLOAT = 0.001" in out and "peak learning rate" in out
    assert '--data.cache_dir STR = "~/.cache/minisft/data"' in out
    # The comment above a field counts too (rope_scaling's), and no key is left without one.
    assert "RoPE scaling, as a pretrained checkpoint's config.json names it" in out
    for cls in (RunConfig, ModelConfig, DataConfig, TrainConfig):
        assert all(field_comments(cls).values()), [n for n, c in field_comments(cls).items() if not c]


def test_a_hyphen_in_a_flag_reads_as_an_underscore():
    from minisft.config import underscore_flags

    assert underscore_flags(["--max-seq-len", "8", "--data.chat-format=llama3", "-h", "a-b"]) == [
        "--max_seq_len", "8", "--data.chat_format=llama3", "-h", "a-b"
    ]  # fmt: skip
    assert load_config(None, underscore_flags(["--train.grad-accum", "4"])).train.grad_accum == 4
