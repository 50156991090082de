"""minisft.tokenizer: the demo BPE's round trip, special tokens, save/load, and the real Qwen3 file."""

import json
import re

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from minisft.tokenizer import DEMO_SPECIAL_TOKENS, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How's it going? Numbers like 2024 and 3.14 appear too.",
    "café, déjà vu, naïve — 中文字符 and emoji 🙂👍",
    "line one\nline two\ttabbed",
] * 4


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS, vocab_size=300)


def with_prefix_space(text: str) -> str:
    """The demo tokenizer's documented contract: one space is put before the first word, and decoding
    keeps it (byte-level BPE decodes every byte it encoded)."""
    return text if text.startswith(" ") else " " + text


def test_train_bpe_special_tokens_and_size(tok):
    assert tok.vocab_size == 300
    assert [tok.token_id(t) for t in DEMO_SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<|pad|>", "<|endoftext|>", None)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, None)
    with pytest.raises(KeyError, match="not in the tokenizer's vocabulary"):
        tok.token_id("<|nope|>")


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "Hello, world! How's it going?",
        "café déjà vu naïve",
        "中文字符",
        "emoji 🙂👍 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "line one\nline two\ttab",
        " starts with a space",
        "  two leading spaces",
        "trailing spaces  ",
        "\ttab first",
    ],
)
def test_round_trip_keeps_every_byte_plus_one_prefix_space(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == with_prefix_space(text)
    assert tok.decode(ids, skip_special_tokens=False) == with_prefix_space(text)
    assert not set(ids) & {0, 1, 2, 3}  # ordinary text never yields special ids


@pytest.mark.parametrize("text", ["2024", "abc 123 def", "pi is 3.14", "x1y2"])
def test_round_trip_with_digits(tok, text):
    assert tok.decode(tok.encode(text)) == with_prefix_space(text)


def test_digits_are_one_per_token(tok):
    pieces = [tok.backend.id_to_token(i) for i in tok.encode("year 2024 and 31415")]
    digit_counts = [sum(ch.isdigit() for ch in piece) for piece in pieces]
    assert sum(digit_counts) == 9 and max(digit_counts) == 1


def test_pad_equal_to_eos_is_refused(tok):
    with pytest.raises(ValueError, match=re.escape("pad token '<|endoftext|>' equals the eos token")):
        Tokenizer(tok.backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_save_then_load_gives_the_same_tokenizer(tok, tmp_path):
    tok.save(tmp_path / "tk")
    config = json.loads((tmp_path / "tk" / "tokenizer_config.json").read_text())
    assert config == {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    for source in (tmp_path / "tk", tmp_path / "tk" / "tokenizer.json"):  # a folder, or the file in it
        loaded = Tokenizer.from_file(source)
        assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == (tok.eos_token, tok.pad_token, None)
        assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
        for text in CORPUS[:4] + ["unseen wörds 🙂"]:
            assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(tok.encode("hello there")) == " hello there"


def test_from_file_with_pad_equal_to_eos_picks_a_spare_special_token(tok, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|endoftext|>"})
    )  # both layouts exist
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.eos_token == "<|endoftext|>"
    assert loaded.pad_token == "<|pad|>"  # the first special token that is neither eos nor bos


def test_from_file_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no eos_token"):
        Tokenizer.from_file(tmp_path)  # no tokenizer_config.json: no eos


def test_a_tokenizer_without_spare_special_token_cannot_pad(tmp_path):
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.add_special_tokens(["</s>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="no pad token and no spare special token"):
        Tokenizer.from_file(tmp_path)


def test_real_qwen3_tokenizer(shared_data):
    folder = shared_data / "tokenizers" / "qwen3"
    tok = Tokenizer.from_file(folder)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert tok.vocab_size == 151669

    # the ids, read straight from tokenizer.json
    raw = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    added = {entry["content"]: entry["id"] for entry in raw["added_tokens"]}
    assert added["<|im_start|>"] == 151644 and added["<|im_end|>"] == 151645
    assert tok.token_id("<|im_start|>") == 151644
    assert tok.eos_id == 151645 and tok.pad_id == added["<|endoftext|>"] == 151643

    backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    for text in ("Hello world", " Hello  world 12345 é中文🙂\n"):
        assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text  # Qwen3 adds no prefix space: lossless
    assert tok.encode("Hello world") == [9707, 1879]
