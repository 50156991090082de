"""Render conversations straight to token ids and loss labels — the one place labels are made.

A conversation is a list of `{"role": "system"|"user"|"assistant"|"tool", "content": str}` turns.
Tool calling, in the layout of OpenAI and TRL: an assistant turn may carry
`"tool_calls": [{"name": str, "arguments": dict | JSON str}, ...]`, a "tool" turn holds a call's
result, and the conversation may carry `.tools`, the functions offered to the model (JSON schemas,
`apply_chat_template`'s `tools`; `data.Conversation` is a list with that attribute). Tool calls are
trained like any answer; tool results, like user turns, never are. A format without tool calling
refuses such a conversation (`RenderError`) rather than drop what it cannot render.

A chat format is code, not a template: for each turn it lists its pieces — text to encode, or a special
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

import json
from dataclasses import dataclass

from minisft.labels import IGNORE_INDEX
from minisft.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("assistant", "last", "all")
Piece = str | int  # text to encode, or a token id placed as is


class RenderError(ValueError):
    """A conversation this chat format cannot render as it is. `turn` is the index of the turn at
    fault (None: the conversation's tool list); `what` says why, for data.py to put after the
    file's own field name."""

    def __init__(self, turn: int | None, what: str) -> None:
        super().__init__(f"{'tools' if turn is None else f'turn {turn}'}: {what}")
        self.turn, self.what = turn, what


def tools_of(messages: list[dict]) -> list[dict]:
    """The functions a conversation offers the model ([] for a plain list of turns)."""
    return getattr(messages, "tools", None) or []


def arguments_json(call: dict) -> str:
    """A tool call's arguments as JSON; given as JSON text, they are written as they are (as
    Qwen3's template does), so the model learns the calls the data holds."""
    return call["arguments"] if isinstance(call["arguments"], str) else to_json(call["arguments"])


def to_json(value: object, indent: int | None = None) -> str:
    """JSON as the chat templates write it with transformers' `tojson`: non-ASCII kept, keys in
    their own order, `", "` and `": "` between items."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


@dataclass(frozen=True)
class Example:
    """One training sequence: input_ids[t] predicts labels[t] (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_trained_tokens(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)

    def cut(self, max_len: int) -> Example:
        """The first max_len positions (inputs and their targets)."""
        return Example(self.input_ids[:max_len], self.labels[:max_len])


def shift(ids: list[int], trained: list[bool]) -> Example:
    """Turn a token sequence and a per-token 'is trained' mask into (input_ids, labels)."""
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids[1:], trained[1:], strict=True)]
    return Example(input_ids=ids[:-1], labels=labels)


class ChatFormat:
    """A format lists each turn's pieces; this class turns them into ids and labels."""

    name: str
    end_of_turn: str  # the token that closes every turn: trained, and where generation stops
    tool_calling = False  # renders tools, tool_calls and tool turns

    def __init__(self, tokenizer: Tokenizer, train_on: str = "assistant") -> None:
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        self.tokenizer, self.train_on = tokenizer, train_on
        self.end_id = tokenizer.token_id(self.end_of_turn)

    def begin(self, messages: list[dict]) -> list[Piece]:
        """Pieces before the first turn (a BOS token, a system block)."""
        return []

    def turn(self, messages: list[dict], i: int) -> list[tuple[Piece, bool]]:
        """Turn i's pieces, each with whether it is trained when this turn is."""
        raise NotImplementedError

    def generation_header(self) -> list[Piece]:
        """What opens an assistant turn: the end of a generation prompt."""
        raise NotImplementedError

    def check(self, messages: list[dict]) -> None:
        """Raise RenderError if this format cannot render the conversation as it is."""
        for i, message in enumerate(messages):
            if message["role"] not in ROLES:
                raise RenderError(i, f"unknown role {message['role']!r}; expected one of {ROLES}")
        if self.tool_calling:
            return
        with_tools = sorted(name for name, cls in CHAT_FORMATS.items() if cls.tool_calling)
        refusal = f"the {self.name} chat format has no tool calling; {', '.join(with_tools)} have it"
        if tools_of(messages):
            raise RenderError(None, refusal)
        for i, message in enumerate(messages):
            if message["role"] == "tool" or message.get("tool_calls"):
                raise RenderError(i, refusal)

    def plan(self, messages: list[dict]) -> list[tuple[Piece, bool]]:
        """The whole conversation as (piece, is_trained), after the train_on policy."""
        self.check(messages)
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained_turns = set(answers[-1:] if self.train_on == "last" else answers)
        pieces = [(piece, False) for piece in self.begin(messages)]
        for i in range(len(messages)):
            pieces += [(piece, trained and i in trained_turns) for piece, trained in self.turn(messages, i)]
        if self.train_on == "all":
            pieces = [(piece, True) for piece, _ in pieces]
        return pieces

    def render(self, messages: list[dict]) -> Example:
        """A whole conversation -> Example with loss on the trained turns' content + end-of-turn."""
        return self.render_many([messages])[0]

    def render_many(self, conversations: list[list[dict]]) -> list[Example]:
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

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """Ids that ask the model for the next assistant turn (generation's input)."""
        pieces = [piece for piece, _ in self.plan(messages)] + self.generation_header()
        return [token for piece in pieces for token in self._ids(piece)]

    def _ids(self, piece: Piece) -> list[int]:
        return self.tokenizer.encode(piece) if isinstance(piece, str) else [piece]


# The Hermes convention for tool calling, as Qwen2.5 and Qwen3 write it: the functions go into the
# system turn between these two texts, one JSON object per line; calls and results are tagged.
TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


class ChatML(ChatFormat):
    """The ChatML format (OpenAI; used by Qwen and SmolLM): turn markers are special tokens.

    <|im_start|>{role}\\n{content}<|im_end|>\\n

    Tool calling follows the Hermes convention of Qwen2.5 (without its default system prompt) and
    Qwen3: the tool list closes the system turn (which opens the conversation when there is none);
    each call is `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` on its own line after
    the answer's text; a run of tool results is one user turn of `<tool_response>` blocks.
    """

    name = "chatml"
    end_of_turn = "<|im_end|>"
    tool_calling = True

    def __init__(self, tokenizer: Tokenizer, train_on: str = "assistant") -> None:
        super().__init__(tokenizer, train_on)
        self.start_id = tokenizer.token_id("<|im_start|>")

    def begin(self, messages: list[dict]) -> list[Piece]:
        if tools_of(messages) and messages[0]["role"] != "system":
            return [self.start_id, "system\n" + self.tools_text(messages), self.end_id, "\n"]
        return []

    @staticmethod
    def tools_text(messages: list[dict]) -> str:
        return TOOLS_HEAD + "".join("\n" + to_json(tool) for tool in tools_of(messages)) + TOOLS_TAIL

    def turn(self, messages: list[dict], i: int) -> list[tuple[Piece, bool]]:
        role, content = messages[i]["role"], messages[i]["content"]
        if role == "tool":
            return self.tool_results(messages, i)
        if role == "assistant":
            return self.answer(self.answer_body(messages, i))
        if i == 0 and role == "system" and tools_of(messages):
            text = "system\n" + content + "\n\n" + self.tools_text(messages)
            return [(self.start_id, False), (text, False), (self.end_id, False), ("\n", False)]
        return [(self.start_id, False), (f"{role}\n", False), (content, False), (self.end_id, False), ("\n", False)]

    def answer(self, body: list[Piece]) -> list[tuple[Piece, bool]]:
        """An assistant turn around its body: the body and <|im_end|> trained."""
        trained = [(piece, True) for piece in body if piece != ""]
        return [(self.start_id, False), ("assistant\n", False), *trained, (self.end_id, True), ("\n", False)]

    def answer_body(self, messages: list[dict], i: int) -> list[Piece]:
        content = messages[i]["content"]
        return [content + self.calls_text(messages[i], after_text=bool(content))]

    @staticmethod
    def calls_text(message: dict, after_text: bool) -> str:
        """The turn's tool calls, each on a line of its own."""
        text = ""
        for k, call in enumerate(message.get("tool_calls") or []):
            newline = "\n" if k or after_text else ""
            text += (
                f'{newline}<tool_call>\n{{"name": "{call["name"]}", "arguments": {arguments_json(call)}}}\n</tool_call>'
            )
        return text

    def tool_results(self, messages: list[dict], i: int) -> list[tuple[Piece, bool]]:
        """A run of tool turns is one user turn, rendered at its first turn as one text: its blocks
        are encoded together, as the template's text would be."""
        if i and messages[i - 1]["role"] == "tool":
            return []
        end = i
        while end < len(messages) and messages[end]["role"] == "tool":
            end += 1
        text = "user" + "".join(f"\n<tool_response>\n{m['content']}\n</tool_response>" for m in messages[i:end])
        return [(self.start_id, False), (text, False), (self.end_id, False), ("\n", False)]

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
    def last_query(messages: list[dict]) -> int:
        """The template's `last_query_index`: the last user turn that is not a tool response."""
        for i in range(len(messages) - 1, -1, -1):
            text = messages[i]["content"]
            if messages[i]["role"] == "user" and not (
                text.startswith("<tool_response>") and text.endswith("</tool_response>")
            ):
                return i
        return len(messages) - 1

    def answer_body(self, messages: list[dict], i: int) -> list[Piece]:
        content, reasoning = messages[i]["content"], ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        calls = self.calls_text(messages[i], after_text=bool(content))
        if i > self.last_query(messages) and (i == len(messages) - 1 or reasoning):
            thought = "\n" + reasoning.strip("\n") + "\n"
            return [self.think_id, thought, self.think_end_id, "\n\n" + content.lstrip("\n") + calls]
        return [content + calls]


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

    def begin(self, messages: list[dict]) -> list[Piece]:
        return [self.bos_id]

    def turn(self, messages: list[dict], i: int) -> list[tuple[Piece, bool]]:
        role = messages[i]["role"]
        return self.whole_turn(role, messages[i]["content"].strip(), trained=role == "assistant")

    def whole_turn(self, role: str, text: str, trained: bool) -> list[tuple[Piece, bool]]:
        """Header, text and <|eot_id|>; the text and <|eot_id|> trained if `trained`."""
        return [(piece, False) for piece in self.header(role)] + [(text, trained), (self.end_id, trained)]

    def header(self, role: str) -> list[Piece]:
        return [self.header_start, role, self.header_end, "\n\n"]

    def generation_header(self) -> list[Piece]:
        return self.header("assistant")


class Llama31(Llama3):
    """Meta Llama 3.1 Instruct (3.3 shares its template), as its chat template renders. Llama 3's
    turns, after a system turn that is always there and opens with dates:

        <|start_header_id|>system<|end_header_id|>\\n\\n
        Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n{system stripped}<|eot_id|>

    "Today Date" is the template's `date_string`, fixed here at the template's own default, so that
    training and inference (chat, and the exported template) render the same prompt whatever the
    day; Llama 3.2's template, which would write today's date, is rendered with it too.

    Tool calling as the template does it: "Environment: ipython" opens the system turn, the tool
    list (JSON, indented by 4) goes into the first user turn with instructions, an answer that calls
    a tool is `{"name": ..., "parameters": {...}}` alone, and a result is an `ipython` turn holding
    the result as a JSON string. Arguments given as JSON text are written as they are (the template
    would quote them as a string, which no tool parser reads back). The template refuses two calls in
    one turn and drops an answer's text beside a call: both are refused here (`check`), never
    rendered differently.
    """

    name = "llama3.1"
    tool_calling = True
    today = "26 Jul 2024"
    TOOLS_INTRO = (
        "Given the following functions, please respond with a JSON for a function call with its proper "
        "arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
        "value}.Do not use variables.\n\n"
    )

    def check(self, messages: list[dict]) -> None:
        super().check(messages)
        for i, message in enumerate(messages):
            calls = message.get("tool_calls") or []
            if len(calls) > 1:
                raise RenderError(i, "llama3.1 calls one tool per answer (its template refuses more): split the calls")
            if calls and message["content"].strip():
                raise RenderError(
                    i, "llama3.1 drops an answer's text beside its tool call: give the text a turn of its own"
                )
        first = 1 if messages and messages[0]["role"] == "system" else 0
        if tools_of(messages) and (first == len(messages) or messages[first]["role"] != "user"):
            raise RenderError(None, "llama3.1 puts the tool list into the first user turn, and there is none")

    def begin(self, messages: list[dict]) -> list[Piece]:
        system = messages[0]["content"].strip() if messages and messages[0]["role"] == "system" else ""
        environment = "Environment: ipython\n" if tools_of(messages) else ""
        dates = f"Cutting Knowledge Date: December 2023\nToday Date: {self.today}\n\n"
        return [self.bos_id, *self.header("system"), environment + dates + system, self.end_id]

    def turn(self, messages: list[dict], i: int) -> list[tuple[Piece, bool]]:
        message, tools = messages[i], tools_of(messages)
        role, content = message["role"], message["content"]
        first = 1 if messages[0]["role"] == "system" else 0
        if i == 0 and role == "system":
            return []  # in the system block of begin()
        if i == first and tools:
            listed = "".join(to_json(tool, indent=4) + "\n\n" for tool in tools)
            return self.whole_turn("user", self.TOOLS_INTRO + listed + content.strip(), trained=False)
        if role == "tool":  # a string is iterable to Jinja, so the template writes it as JSON
            return self.whole_turn("ipython", to_json(content), trained=False)
        if message.get("tool_calls"):
            call = message["tool_calls"][0]
            text = f'{{"name": "{call["name"]}", "parameters": {arguments_json(call)}}}'
            return self.whole_turn("assistant", text, trained=True)
        return super().turn(messages, i)


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

    def turn(self, messages: list[dict], i: int) -> list[tuple[Piece, bool]]:
        role, content = messages[i]["role"], messages[i]["content"]
        if role == "system":
            return [(f"{content}\n\n", False)]
        if role == "user":
            return [(f"### Instruction:\n{content}\n\n", False)]
        return [("### Response:\n", False), (content, True), (self.end_id, True), ("\n\n", False)]

    def generation_header(self) -> list[Piece]:
        return ["### Response:\n"]


CHAT_FORMATS = {cls.name: cls for cls in (ChatML, Qwen3, Llama3, Llama31, Instruction)}


def make_chat_format(name: str, tokenizer: Tokenizer, train_on: str = "assistant") -> ChatFormat:
    """The chat format saved with a checkpoint (by name) -> a renderer for this tokenizer."""
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {name!r}; choose one of {sorted(CHAT_FORMATS)}")
    return CHAT_FORMATS[name](tokenizer, train_on)


def render_text(tokenizer: Tokenizer, text: str) -> Example:
    """Plain text (pre-training data): every token trained, the document closed by eos."""
    ids = [*tokenizer.encode(text), tokenizer.eos_id]
    return shift(ids, [True] * len(ids))


def forgetting_text(tokenizer: Tokenizer, text: str) -> Example:
    """Held-out plain text for measuring forgetting: every token after the first is a target, and no
    end-of-text one. SFT trains the eos token itself (a chat model's eos is its end-of-turn token:
    `<|im_end|>` for SmolLM2), so that target's loss falls as the task is learnt and hides forgetting
    (after the DPO demo's SFT stage it hid a fifth of the rise of Alice's loss: README, LoRA)."""
    ids = tokenizer.encode(text)
    return shift(ids, [True] * len(ids))
