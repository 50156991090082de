"""A thin wrapper over Hugging Face `tokenizers`: load a `tokenizer.json`, or train a small
byte-level BPE on the fly, and know the special tokens (bos / eos / pad, chat-turn markers).

`encode` never adds special tokens. Special tokens enter a sequence only where `chat.py` puts
them by id, so a rendered conversation can never gain a second BOS (the `<s><s>` bug).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

# The built-in demo's special tokens. The pad token is its own token, never eos: a collator
# that masks "every pad id" would otherwise mask the real end of every answer too.
DEMO_SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")


def read_chat_template(folder: Path) -> str | None:
    """A Hugging Face folder's chat template: `chat_template.jinja` (the layout transformers writes
    today), else the `chat_template` entry of tokenizer_config.json (older folders; a list of named
    templates there gives the "default" one)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config_file = folder / "tokenizer_config.json"
    template = json.loads(config_file.read_text()).get("chat_template") if config_file.is_file() else None
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    return template or None


class UnknownTokenError(KeyError):
    """A token (a chat format's marker, say) that the vocabulary lacks; `.token` names it."""

    def __init__(self, token: str) -> None:
        super().__init__(f"token {token!r} is not in the tokenizer's vocabulary")
        self.token = token


class Tokenizer:
    def __init__(self, backend: HFTokenizer, eos_token: str, pad_token: str, bos_token: str | None = None) -> None:
        self.backend = backend
        # A literal "<|im_end|>" inside a user's text stays text: only chat.py places special tokens,
        # by id, so data can neither fake a turn boundary nor end an answer early.
        self.backend.encode_special_tokens = True
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template: str | None = None  # a Hugging Face tokenizer's own, kept for export
        if pad_token == eos_token:
            raise ValueError(
                f"pad token {pad_token!r} equals the eos token: pick a distinct pad token so the "
                "end of every answer stays trained"
            )
        self.bos_id = None if bos_token is None else self.token_id(bos_token)
        self.eos_id = self.token_id(eos_token)
        self.pad_id = self.token_id(pad_token)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (a file, or a folder holding it and `tokenizer_config.json`)."""
        path = Path(path)
        folder, json_file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
        if not json_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {json_file}")
        backend = HFTokenizer.from_file(str(json_file))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}

        def special(key: str) -> str | None:
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value  # both layouts exist

        eos = special("eos_token")
        if eos is None:
            raise ValueError(f"{config_file}: no eos_token; minisft needs one to know where answers end")
        tokenizer = cls.with_pad(backend, eos, special("pad_token"), special("bos_token"))
        tokenizer.chat_template = read_chat_template(folder)
        return tokenizer

    @classmethod
    def with_pad(cls, backend: HFTokenizer, eos: str, pad: str | None, bos: str | None) -> Tokenizer:
        """A tokenizer whose pad token is `pad`, or its first spare special token when `pad` is
        missing or equals eos (many checkpoints pad with eos: pitfall 1)."""
        if pad is None or pad == eos:
            spare = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
            spare = [token for token in spare if token not in (eos, bos)]
            if not spare:
                raise ValueError("the tokenizer has no pad token and no spare special token to pad with")
            pad = spare[0]
        return cls(backend, eos_token=eos, pad_token=pad, bos_token=bos)

    @classmethod
    def train_bpe(
        cls, texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = DEMO_SPECIAL_TOKENS
    ) -> Tokenizer:
        """Train a byte-level BPE. Digits are split one per token so numbers stay legible, and a
        space is put before the first word (as Llama's tokenizer does) so a word is the same
        token at the start of a turn as in the middle of a sentence."""
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.ByteLevel(add_prefix_space=True), pre_tokenizers.Digits(individual_digits=True)]
        )
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        pad, eos = special_tokens[0], special_tokens[1]
        return cls(backend, eos_token=eos, pad_token=pad)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise UnknownTokenError(token)
        return token_id

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add tokens the vocabulary lacks (a chat format's markers); -> the ids of the new ones."""
        new = [token for token in tokens if self.backend.token_to_id(token) is None]
        self.backend.add_special_tokens(new)
        return [self.token_id(token) for token in new]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` naming the special tokens."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
