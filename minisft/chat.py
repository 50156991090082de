"""Render conversations straight to token ids and loss labels — the one place labels are made.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}` turns.
ChatML writes each turn as

    <|im_start|>{role}\\n{content}<|im_end|>\\n

We build the ids turn by turn, so we always know which span is whose: no template string is
ever searched for in token ids (the "response template not found" bug), and rendered text is
never re-tokenized (the doubled-BOS bug). The assistant's content and its end-of-turn token
`<|im_end|>` are trained — the model must learn to stop — and everything else gets -100.

Labels are shifted here, once: `labels[t]` is the token that should follow `input_ids[t]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from minisft.loss import IGNORE_INDEX
from minisft.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One training sequence: input_ids[t] predicts labels[t] (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def shift(ids: list[int], trained: list[bool]) -> Example:
    """Turn a token sequence and a per-token 'is trained' mask into (input_ids, labels)."""
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids[1:], trained[1:], strict=True)]
    return Example(input_ids=ids[:-1], labels=labels)


class ChatML:
    """The ChatML format (OpenAI; used by Qwen and SmolLM): turn markers are special tokens."""

    name = "chatml"
    turn_start, turn_end = "<|im_start|>", "<|im_end|>"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.start_id = tokenizer.token_id(self.turn_start)
        self.end_id = tokenizer.token_id(self.turn_end)  # the end-of-turn token generation stops on
        self.newline = tokenizer.encode("\n")

    def header(self, role: str) -> list[int]:
        return [self.start_id, *self.tokenizer.encode(f"{role}\n")]

    def pieces(self, messages: list[dict[str, str]]):
        """Yield (token ids, is_trained) for each header, body and separator, in order."""
        for message in messages:
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
            yield self.header(role), False
            yield [*self.tokenizer.encode(content), self.end_id], role == "assistant"
            yield self.newline, False

    def render(self, messages: list[dict[str, str]]) -> Example:
        """A whole conversation -> Example with loss on assistant content + end-of-turn."""
        ids: list[int] = []
        trained: list[bool] = []
        for part, is_trained in self.pieces(messages):
            ids += part
            trained += [is_trained] * len(part)
        return shift(ids, trained)

    def render_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids that ask the model for the next assistant turn (generation's input)."""
        return [token for part, _ in self.pieces(messages) for token in part] + self.header("assistant")


def render_text(tokenizer: Tokenizer, text: str) -> Example:
    """Plain text (pre-training data): every token trained, the document closed by eos."""
    ids = [*tokenizer.encode(text), tokenizer.eos_id]
    return shift(ids, [True] * len(ids))
