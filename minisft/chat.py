"""Render conversations straight to token ids and loss labels — the one place labels are made.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}` turns. A chat
format is code, not a template: for each turn it lists its pieces — text to encode, or a special
token placed by id — and says which pieces the model is trained to produce. ChatML, for example:

    <|im_start|> | user\\n | {content} | <|im_end|> | \\n            nothing trained
    <|im_start|> | assistant\\n | {content} | <|im_end|> | \\n       content and <|im_end|> trained

We build the ids piece by piece, so we always know which span is whose: no template string is
ever searched for in token ids (the "response template not found" bug), and rendered text is
never re-tokenized (the doubled-BOS bug). The end-of-turn token is trained with the answer: the
model must learn to stop.

Each text piece is encoded on its own. The formats cut their pieces where the tokenizers they
are used with split anyway (at a special token, after a newline), so the ids equal the
template's own tokenization of the whole text (tests compare them with `transformers`). The one
exception is an answer that begins with whitespace: the template's text may merge it with the
header's last newline, while we keep the header whole — which is also what generation sees,
since its prompt ends with that header.

`train_on` picks the trained turns: "assistant" (every answer, the default), "last" (only the
final answer: earlier ones are context) or "all" (every token, as in plain-text training).

Labels are shifted here, once: `labels[t]` is the token that should follow `input_ids[t]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from minisft.labels import IGNORE_INDEX
from minisft.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("assistant", "last", "all")
Piece = str | int  # text to encode, or a token id placed as is


@dataclass(frozen=True)
class Example:
    """One training sequence: input_ids[t] predicts labels[t] (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_trained_tokens(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def shift(ids: list[int], trained: list[bool]) -> Example:
    """Turn a token sequence and a per-token 'is trained' mask into (input_ids, labels)."""
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids[1:], trained[1:], strict=True)]
    return Example(input_ids=ids[:-1], labels=labels)


class ChatFormat:
    """A format lists each turn's pieces; this class turns them into ids and labels."""

    name: str
    end_of_turn: str  # the token that closes every turn: trained, and where generation stops

    def __init__(self, tokenizer: Tokenizer, train_on: str = "assistant") -> None:
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        self.tokenizer, self.train_on = tokenizer, train_on
        self.end_id = tokenizer.token_id(self.end_of_turn)

    def begin(self) -> list[Piece]:
        """Pieces before the first turn (a BOS token)."""
        return []

    def turn(self, messages: list[dict[str, str]], i: int) -> list[tuple[Piece, bool]]:
        """Turn i's pieces, each with whether it is trained when this turn is."""
        raise NotImplementedError

    def generation_header(self) -> list[Piece]:
        """What opens an assistant turn: the end of a generation prompt."""
        raise NotImplementedError

    def plan(self, messages: list[dict[str, str]]) -> list[tuple[Piece, bool]]:
        """The whole conversation as (piece, is_trained), after the train_on policy."""
        for message in messages:
            if message["role"] not in ROLES:
                raise ValueError(f"unknown role {message['role']!r}; expected one of {ROLES}")
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained_turns = set(answers[-1:] if self.train_on == "last" else answers)
        pieces = [(piece, False) for piece in self.begin()]
        for i in range(len(messages)):
            pieces += [(piece, trained and i in trained_turns) for piece, trained in self.turn(messages, i)]
        if self.train_on == "all":
            pieces = [(piece, True) for piece, _ in pieces]
        return pieces

    def render(self, messages: list[dict[str, str]]) -> Example:
        """A whole conversation -> Example with loss on the trained turns' content + end-of-turn."""
        return self.render_many([messages])[0]

    def render_many(self, conversations: list[list[dict[str, str]]]) -> list[Example]:
        """Many conversations at once: each distinct text is encoded once, in one parallel batch."""
        plans = [self.plan(messages) for messages in conversations]
        texts = list({piece for plan in plans for piece, _ in plan if isinstance(piece, str)})
        # The backend's batch encode runs on every core; it honours encode_special_tokens like encode().
        encodings = self.tokenizer.backend.encode_batch(texts, add_special_tokens=False)
        encoded = {text: encoding.ids for text, encoding in zip(texts, encodings, strict=True)}
        examples = []
        for plan in plans:
            ids: list[int] = []
            trained: list[bool] = []
            for piece, is_trained in plan:
                part = encoded[piece] if isinstance(piece, str) else [piece]
                ids += part
                trained += [is_trained] * len(part)
            examples.append(shift(ids, trained))
        return examples

    def render_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Ids that ask the model for the next assistant turn (generation's input)."""
        pieces = [piece for piece, _ in self.plan(messages)] + self.generation_header()
        return [token for piece in pieces for token in self._ids(piece)]

    def _ids(self, piece: Piece) -> list[int]:
        return self.tokenizer.encode(piece) if isinstance(piece, str) else [piece]


class ChatML(ChatFormat):
    """The ChatML format (OpenAI; used by Qwen and SmolLM): turn markers are special tokens.

    <|im_start|>{role}\\n{content}<|im_end|>\\n
    """

    name = "chatml"
    end_of_turn = "<|im_end|>"

    def __init__(self, tokenizer: Tokenizer, train_on: str = "assistant") -> None:
        super().__init__(tokenizer, train_on)
        self.start_id = tokenizer.token_id("<|im_start|>")

    def turn(self, messages: list[dict[str, str]], i: int) -> list[tuple[Piece, bool]]:
        role, content = messages[i]["role"], messages[i]["content"]
        answer = role == "assistant"
        return [(self.start_id, False), (f"{role}\n", False), (content, answer), (self.end_id, answer), ("\n", False)]

    def generation_header(self) -> list[Piece]:
        return [self.start_id, "assistant\n"]


class Qwen3(ChatML):
    """ChatML as Qwen3's own `chat_template` renders it (tokenizer_config.json, read line by line).

    Assistant turns after the last user turn that close the conversation (or carry reasoning)
    open with a think block; for a plain answer it is empty:

        <|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n{content}<|im_end|>\\n

    so a prompt rendered alone is not a prefix of the whole conversation. The block is trained
    with the answer: the template's generation prompt stops at `assistant\\n`, so the model must
    produce the block itself. Reasoning written inline as `<think>...</think>` is kept in those
    turns and dropped from earlier ones, as the template does.
    """

    name = "qwen3"

    def __init__(self, tokenizer: Tokenizer, train_on: str = "assistant") -> None:
        super().__init__(tokenizer, train_on)
        self.think_id, self.think_end_id = tokenizer.token_id("<think>"), tokenizer.token_id("</think>")

    @staticmethod
    def last_query(messages: list[dict[str, str]]) -> int:
        """The template's `last_query_index`: the last user turn that is not a tool response."""
        for i in range(len(messages) - 1, -1, -1):
            text = messages[i]["content"]
            if messages[i]["role"] == "user" and not (
                text.startswith("<tool_response>") and text.endswith("</tool_response>")
            ):
                return i
        return len(messages) - 1

    def turn(self, messages: list[dict[str, str]], i: int) -> list[tuple[Piece, bool]]:
        if messages[i]["role"] != "assistant":
            return super().turn(messages, i)
        content, reasoning = messages[i]["content"], ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        if i > self.last_query(messages) and (i == len(messages) - 1 or reasoning):
            thought = "\n" + reasoning.strip("\n") + "\n"
            body = [self.think_id, thought, self.think_end_id, "\n\n" + content.lstrip("\n")]
        else:
            body = [content]
        return [
            (self.start_id, False),
            ("assistant\n", False),
            *[(piece, True) for piece in body],
            (self.end_id, True),
            ("\n", False),
        ]


class Llama3(ChatFormat):
    """Meta Llama 3 (Instruct): BOS, then per turn

        <|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>

    Its template strips each turn's content (Jinja `| trim`), so the trained text is stripped too.
    """

    name = "llama3"
    end_of_turn = "<|eot_id|>"

    def __init__(self, tokenizer: Tokenizer, train_on: str = "assistant") -> None:
        super().__init__(tokenizer, train_on)
        self.bos_id = tokenizer.token_id("<|begin_of_text|>")
        self.header_start = tokenizer.token_id("<|start_header_id|>")
        self.header_end = tokenizer.token_id("<|end_header_id|>")

    def begin(self) -> list[Piece]:
        return [self.bos_id]

    def turn(self, messages: list[dict[str, str]], i: int) -> list[tuple[Piece, bool]]:
        role = messages[i]["role"]
        answer = role == "assistant"
        return [(piece, False) for piece in self.header(role)] + [
            (messages[i]["content"].strip(), answer),
            (self.end_id, answer),
        ]

    def header(self, role: str) -> list[Piece]:
        return [self.header_start, role, self.header_end, "\n\n"]

    def generation_header(self) -> list[Piece]:
        return self.header("assistant")


class Instruction(ChatFormat):
    """Plain text for base models without chat tokens (the Alpaca layout); answers end with eos.

    {system}\\n\\n
    ### Instruction:\\n{user}\\n\\n
    ### Response:\\n{assistant}<eos>\\n\\n
    """

    name = "instruction"

    def __init__(self, tokenizer: Tokenizer, train_on: str = "assistant") -> None:
        self.end_of_turn = tokenizer.eos_token
        super().__init__(tokenizer, train_on)

    def turn(self, messages: list[dict[str, str]], i: int) -> list[tuple[Piece, bool]]:
        role, content = messages[i]["role"], messages[i]["content"]
        if role == "system":
            return [(f"{content}\n\n", False)]
        if role == "user":
            return [(f"### Instruction:\n{content}\n\n", False)]
        return [("### Response:\n", False), (content, True), (self.end_id, True), ("\n\n", False)]

    def generation_header(self) -> list[Piece]:
        return ["### Response:\n"]


CHAT_FORMATS = {cls.name: cls for cls in (ChatML, Qwen3, Llama3, Instruction)}


def make_chat_format(name: str, tokenizer: Tokenizer, train_on: str = "assistant") -> ChatFormat:
    """The chat format saved with a checkpoint (by name) -> a renderer for this tokenizer."""
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {name!r}; choose one of {sorted(CHAT_FORMATS)}")
    return CHAT_FORMATS[name](tokenizer, train_on)


def render_text(tokenizer: Tokenizer, text: str) -> Example:
    """Plain text (pre-training data): every token trained, the document closed by eos."""
    ids = [*tokenizer.encode(text), tokenizer.eos_id]
    return shift(ids, [True] * len(ids))
