"""The tokenized-data cache (minisft/data_cache.py): hits, misses, damaged entries, the report."""

import json

import pytest

from minisft import data_cache
from minisft.chat import ChatML
from minisft.config import DataConfig, load_config
from minisft.dataset import load_examples
from minisft.tokenizer import Tokenizer

RECORDS = [
    {"prompt": "What is the capital of France?", "completion": "Paris."},
    {"instruction": "Name a colour.", "output": "Blue."},
    {"prompt": "Say nothing", "completion": "   "},  # an empty answer: skipped with on_error=skip
]


@pytest.fixture(scope="module")
def chat() -> ChatML:
    return ChatML(Tokenizer.train_bpe([json.dumps(r) for r in RECORDS] * 3, vocab_size=300))


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_a_hit_gives_back_the_same_examples_and_report(chat, data, tmp_path):
    cache = tmp_path / "cache"
    first, report = load_examples(data, chat, 64, on_error="skip", cache_dir=cache)
    again, cached = load_examples(data, chat, 64, on_error="skip", cache_dir=cache)
    assert again == first and len(first) == 2
    assert cached.read == report.read and cached.read.num_skipped == 1
    assert cached.cached.endswith(".json") and report.cached == ""
    sidecar = json.loads(open(cached.cached).read())
    assert sidecar["key"]["file_sha256"] == data_cache.file_sha256(data) and sidecar["report"]["examples"] == 2


def test_a_moved_file_is_a_hit_reported_under_its_new_name(chat, data, tmp_path):
    cache = tmp_path / "cache"
    load_examples(data, chat, 64, on_error="skip", cache_dir=cache)
    moved = tmp_path / "elsewhere.jsonl"
    data.rename(moved)
    _, report = load_examples(moved, chat, 64, on_error="skip", cache_dir=cache)
    assert report.cached and report.path == str(moved)
    assert report.read.first_errors[0].startswith(f"{moved}:3: ")


def test_a_damaged_or_half_written_entry_is_a_miss(chat, data, tmp_path):
    cache = tmp_path / "cache"
    first, _ = load_examples(data, chat, 64, on_error="skip", cache_dir=cache)
    (tensors,) = cache.glob("*.safetensors")
    tensors.write_bytes(b"not a safetensors file")
    again, report = load_examples(data, chat, 64, on_error="skip", cache_dir=cache)
    assert again == first and report.cached == ""  # rendered again, and the entry rewritten
    (sidecar,) = cache.glob("*.json")
    sidecar.unlink()  # a crash between the two writes leaves no sidecar: no entry
    assert load_examples(data, chat, 64, on_error="skip", cache_dir=cache)[1].cached == ""
    assert not list(cache.glob("*.tmp"))  # temporary files are renamed away


def test_no_cache_dir_writes_nothing_and_a_failed_load_caches_nothing(chat, data, tmp_path):
    cache = tmp_path / "cache"
    assert load_examples(data, chat, 64, on_error="skip")[1].cached == ""
    with pytest.raises(ValueError, match="empty assistant turn"):
        load_examples(data, chat, 64, on_error="fail", cache_dir=cache)
    assert not cache.exists() or not list(cache.iterdir())


def test_the_cache_dir_config_key(chat, data, tmp_path, capsys):
    from minisft.recipe import load_data

    assert DataConfig().cache_dir == "~/.cache/minisft/data"
    config = load_config(overrides=["--data.cache_dir", str(tmp_path / "c"), "--on_error", "skip"])
    load_data(str(data), chat, config.data, 64)
    load_data(str(data), chat, config.data, 64)
    first, second = capsys.readouterr().out.splitlines()
    assert "tokens read from the cache" not in first
    assert second.startswith(first) and "tokens read from the cache" in second
