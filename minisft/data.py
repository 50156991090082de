"""Read SFT records from JSONL or JSON files, in the four layouts people use, as chat turns.

    messages            {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}
    sharegpt            {"conversations": [{"from": "system"|"human"|"gpt"|"function_call"|"observation",
                                            "value": ...}, ...]}
    prompt_completion   {"prompt": ..., "completion": ...}
    alpaca              {"instruction": ..., "input": ... (optional), "output": ...}

Any record may also carry a top-level "system" string and a "tools" list: the functions offered to
the model, as JSON schemas (`{"type": "function", "function": {"name", "description",
"parameters"}}`; a bare function definition is wrapped so, and a JSON string of the list — as
LLaMA-Factory's ShareGPT files hold it — is parsed). Tool calls come as the assistant turn's
"tool_calls" (`[{"type": "function", "function": {"name", "arguments"}}]`, OpenAI and TRL; the
arguments an object or a JSON string of one) or as a ShareGPT "function_call" turn whose value is
the JSON of one call or a list of them; a call's result is a "tool" turn or an "observation".

Every record becomes a `Conversation`: a list of `{"role", "content"}` turns (plus "tool_calls" on
assistant turns that call tools) that ends with an assistant turn, with the record's tools, its
file:line, and the fields training ignores ("id", "messages[].weight": reported by `data check`).
"auto" picks the layout per record from its keys.

Files are streamed, never loaded whole. The layout of the file is sniffed from its start:
a JSON array (`[` first) is read element by element; a first line that is a lone `{` means
pretty-printed objects one after another; anything else is JSONL, one record per line.

Every problem is a `DataError("file:line: field: what is wrong")`. With `on_error="fail"` the
first one is raised; with "skip" the record is counted in `ReadStats` and reading goes on. A JSON
syntax error inside an array (or a pretty-printed file) is raised in both modes: there is no way
to find where the next record starts.
"""

from __future__ import annotations

import codecs
import json
import reprlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from minisft.chat import ROLES, RenderError

FORMATS = ("auto", "messages", "sharegpt", "prompt_completion", "alpaca")
ON_ERROR = ("fail", "skip")

# Turn-list layouts: list field, role field, content field, file role -> our role.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "function_call": "assistant"}
TURN_LISTS = {
    "messages": ("messages", "role", "content", {role: role for role in ROLES}),
    "sharegpt": ("conversations", "from", "value", SHAREGPT_ROLES | {"observation": "tool"}),
}
# The fields each layout reads; any other field holding something is reported as ignored.
RECORD_FIELDS = {"messages": {"messages"}, "sharegpt": {"conversations"}, "alpaca": {"instruction", "input", "output"}}
RECORD_FIELDS["prompt_completion"] = {"prompt", "completion"}
TURN_FIELDS = {
    "messages": {"role", "content", "tool_calls", "tool_call_id", "name"},  # a result's id and name: never rendered
    "sharegpt": {"from", "value"},
}
CHUNK_CHARS = 1 << 20  # JSON arrays are decoded this much at a time
MAX_RECORD_CHARS = 1 << 26  # a JSON record longer than this is refused rather than read to the end of the file
_repr = reprlib.Repr()  # a value shown in an error stays short, however huge or deep it is
_repr.maxstring, _repr.maxother, _repr.maxlevel = 40, 40, 2
_show = _repr.repr


class DataError(ValueError):
    """A bad record in a user's data file; the message names file, line and field.

    `kind` groups errors for the report ("invalid JSON", "empty answer", ...)."""

    def __init__(self, message: str, kind: str = "invalid record") -> None:
        super().__init__(message)
        self.kind = kind


class Conversation(list):
    """One record's turns — a list, so it goes wherever a list of turns does — and what came with
    them: `tools` (the functions offered to the model, JSON schemas), `where` (file:line) and
    `ignored` (the record's fields that hold something but that training drops)."""

    def __init__(self, turns: list[dict] = (), tools: list[dict] = (), where: str = "", ignored: list[str] = ()):
        super().__init__(turns)
        self.tools, self.where, self.ignored = list(tools), where, list(ignored)


@dataclass
class ReadStats:
    """What reading a file found: good records per layout, skipped records per kind of error."""

    per_format: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)  # the first few, to show the user

    @property
    def records(self) -> int:
        return sum(self.per_format.values())

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, err: DataError) -> None:
        self.skipped[err.kind] += 1
        if len(self.first_errors) < 10:
            self.first_errors.append(str(err))


# ---------------------------------------------------------------- one record -> turns


def detect_format(record: dict) -> str | None:
    """The layout a record's keys announce, or None."""
    for name, key in (("messages", "messages"), ("sharegpt", "conversations")):
        if key in record:
            return name
    if "instruction" in record:
        return "alpaca"
    if "prompt" in record:
        return "prompt_completion"
    return None


def _string(value: object, where: str, name: str, present: bool = True) -> str:
    if not isinstance(value, str):
        what = f"got {_show(value)} ({type(value).__name__})" if present else "but it is missing"
        raise DataError(f"{where}: {name}: expected a string, {what}", "wrong field")
    if not value.isascii():
        try:
            value.encode("utf-8")  # a lone surrogate ("\ud800") parses as JSON but no tokenizer takes it
        except UnicodeEncodeError:
            raise DataError(f"{where}: {name}: not valid Unicode (a lone surrogate escape)", "wrong field") from None
    return value


def _field(record: dict, key: str, where: str) -> str:
    return _string(record.get(key), where, key, present=key in record)


def _json_text(text: str, where: str, name: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise DataError(f"{where}: {name}: not valid JSON ({_why(err)})", "wrong field") from None


def _tool_calls(calls: object, where: str, name: str) -> list[dict]:
    """-> [{"name", "arguments"}]: OpenAI's nesting under "function" undone, arguments checked."""
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: {name}: expected a non-empty list of tool calls", "wrong field")
    out = []
    for k, call in enumerate(calls):
        field_name = f"{name}[{k}]"
        if isinstance(call, dict) and "function" in call:
            call, field_name = call["function"], f"{field_name}.function"
        if not isinstance(call, dict):
            raise DataError(f"{where}: {field_name}: expected an object with name and arguments", "wrong field")
        function = _string(call.get("name"), where, f"{field_name}.name", present="name" in call)
        arguments = call.get("arguments")
        # A JSON string is kept as written (the templates write it as is) once it is one object.
        parsed = _json_text(arguments, where, f"{field_name}.arguments") if isinstance(arguments, str) else arguments
        if not isinstance(parsed, dict):
            what = f"got {_show(arguments)}" if "arguments" in call else "but it is missing"
            raise DataError(f"{where}: {field_name}.arguments: expected an object or its JSON, {what}", "wrong field")
        out.append({"name": function, "arguments": arguments})
    return out


def _tools(tools: object, where: str) -> list[dict]:
    """The record's "tools" -> a list of {"type": "function", "function": {...}} schemas."""
    if isinstance(tools, str):  # LLaMA-Factory's ShareGPT files hold the list as a JSON string
        tools = _json_text(tools, where, "tools") if tools.strip() else []
    if not isinstance(tools, list):
        raise DataError(f"{where}: tools: expected a list of tool definitions, got {_show(tools)}", "wrong field")
    out = []
    for k, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}: tools[{k}]: expected a function definition with a name", "wrong field")
        out.append(tool if "function" in tool else {"type": "function", "function": tool})
    return out


def _holds_something(value: object) -> bool:
    return value not in (None, "", [], {})


def _turn_list(record: dict, where: str, layout: str, ignored: list[str]) -> list[tuple[str, str, str, list]]:
    """-> [(role, content, the turn's field name in the file, its tool calls)]."""
    list_key, role_key, content_key, roles = TURN_LISTS[layout]
    turns = record.get(list_key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {list_key}: expected a non-empty list of turns", "wrong field")
    out = []
    for i, turn in enumerate(turns):
        name = f"{list_key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {name}: expected an object with {role_key} and {content_key}", "wrong field")
        role = _string(turn.get(role_key), where, f"{name}.{role_key}", present=role_key in turn)
        if role not in roles:
            raise DataError(
                f"{where}: {name}.{role_key}: unknown role {_show(role)}; expected one of {tuple(roles)}",
                "unknown role",
            )
        calls = []
        if role == "function_call":  # ShareGPT: the value is the JSON of a call, or of a list of calls
            value = _string(turn.get(content_key), where, f"{name}.{content_key}", present=content_key in turn)
            parsed = _json_text(value, where, f"{name}.{content_key}")
            calls = _tool_calls(parsed if isinstance(parsed, list) else [parsed], where, f"{name}.{content_key}")
            content = ""
        else:
            if _holds_something(turn.get("tool_calls")):  # OpenAI writes "tool_calls": null when there are none
                if role != "assistant":
                    raise DataError(f"{where}: {name}.tool_calls: only assistant turns call tools", "wrong field")
                calls = _tool_calls(turn["tool_calls"], where, f"{name}.tool_calls")
            if calls and turn.get(content_key) is None:
                content = ""  # a turn that only calls tools has no text
            else:
                content = _string(turn.get(content_key), where, f"{name}.{content_key}", present=content_key in turn)
        ignored += [
            f"{list_key}[].{k}" for k, v in turn.items() if k not in TURN_FIELDS[layout] and _holds_something(v)
        ]
        out.append((roles[role], content, name, calls))
    return out


def to_messages(record: object, where: str, layout: str = "auto", check=None) -> tuple[Conversation, str]:
    """One parsed record -> (validated Conversation, its layout). Raises DataError naming the field.

    check: a chat format's `check`; a RenderError from it becomes a DataError naming the turn."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__} {_show(record)}", "wrong field")
    if layout == "auto":
        detected = detect_format(record)
        if detected is None:
            raise DataError(
                f'{where}: unknown layout: expected a "messages", "conversations", "instruction" or "prompt" '
                f"field, found {_show(sorted(record))}",
                "unknown layout",
            )
        layout = detected
    ignored = [key for key, value in record.items() if key not in RECORD_FIELDS[layout] | {"system", "tools"}]
    ignored = [key for key in ignored if _holds_something(record[key])]
    if layout in TURN_LISTS:
        turns = _turn_list(record, where, layout, ignored)
    elif layout == "alpaca":
        instruction, answer = _field(record, "instruction", where), _field(record, "output", where)
        extra = _field(record, "input", where) if "input" in record else ""
        # The input (the text the instruction is about) follows the instruction in the same user turn.
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        turns = [("user", user, "instruction", []), ("assistant", answer, "output", [])]
    else:
        turns = [("user", _field(record, "prompt", where), "prompt", [])]
        turns.append(("assistant", _field(record, "completion", where), "completion", []))
    if "system" in record:
        # Both would render two system turns, and which one the user meant is not ours to guess.
        if any(role == "system" for role, *_ in turns):
            key = TURN_LISTS[layout][0]
            raise DataError(
                f'{where}: system: a top-level "system" and a system message in {key}: keep one of them',
                "two system prompts",
            )
        turns.insert(0, ("system", _field(record, "system", where), "system", []))
    tools = _tools(record["tools"], where) if "tools" in record else []
    for role, content, name, calls in turns:
        if role == "assistant" and not content.strip() and not calls:
            name += f".{TURN_LISTS[layout][2]}" if layout in TURN_LISTS else ""
            raise DataError(f"{where}: {name}: empty assistant turn (nothing to train on)", "empty answer")
    if turns[-1][0] != "assistant":
        list_key = TURN_LISTS[layout][0]
        raise DataError(f"{where}: {list_key}: the conversation must end with an assistant turn", "no final answer")
    messages = [
        {"role": role, "content": content, **({"tool_calls": calls} if calls else {})}
        for role, content, _, calls in turns
    ]
    conversation = Conversation(messages, tools, where, ignored)
    if check is not None:
        try:
            check(conversation)
        except RenderError as err:
            name = "tools" if err.turn is None else turns[err.turn][2]
            raise DataError(f"{where}: {name}: {err.what}", "unrenderable") from None
    return conversation, layout


# ---------------------------------------------------------------- files -> parsed records


def _jsonl(f, path: Path) -> Iterator[tuple[str, object]]:
    """(where, parsed line) per non-blank line; a line that does not parse yields its DataError."""
    for lineno, raw in enumerate(f, 1):  # bytes, so a bad byte is reported on its own line
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield where, DataError(f"{where}: not valid UTF-8 (byte {err.start + 1} of the line)", "invalid UTF-8")
            continue
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            yield where, DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})", "invalid JSON")
        except (ValueError, RecursionError) as err:  # an integer of 5000 digits, nesting 100k deep
            yield where, DataError(f"{where}: invalid JSON: {_why(err)}", "invalid JSON")


def _why(err: Exception) -> str:
    return "nested too deeply" if isinstance(err, RecursionError) else str(err).split("\n")[0]


class _JsonStream:
    """Decode JSON values one at a time from a byte file, tracking the line of each."""

    def __init__(self, f, path: Path) -> None:
        self.f, self.path = f, path
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False  # self.line is the line of buf[pos]

    def error(self, at: int, message: str, kind: str = "invalid JSON") -> DataError:
        line = self.line + self.buf.count("\n", self.pos, at)
        column = at - self.buf.rfind("\n", 0, at)
        return DataError(f"{self.path}:{line}: {message} (column {column})", kind)

    def fill(self, at_least: int) -> None:
        self.buf, self.pos = self.buf[self.pos :], 0
        data = self.f.read(max(at_least, CHUNK_CHARS))
        try:
            self.buf += self.utf8.decode(data, final=not data)
        except UnicodeDecodeError as err:
            line = self.line + self.buf.count("\n") + err.object[: err.start].count(b"\n")
            raise DataError(f"{self.path}:{line}: not valid UTF-8", "invalid UTF-8") from None
        self.eof = not data

    def peek(self) -> str:
        """Skip whitespace; the next character, or "" at the end of the file."""
        while True:
            end = self.pos
            while end < len(self.buf) and self.buf[end] in " \t\r\n":
                end += 1
            self.line += self.buf.count("\n", self.pos, end)
            self.pos = end
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos : self.pos + 1]
            self.fill(CHUNK_CHARS)

    def take(self, char: str, what: str) -> None:
        if self.peek() != char:
            raise self.error(self.pos, f"invalid JSON: expected {what}")
        self.pos += 1

    def value(self) -> object:
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # at the buffer's end a number may go on
                    break
            except json.JSONDecodeError as err:
                if self.eof or len(self.buf) - self.pos > MAX_RECORD_CHARS:
                    raise self.error(err.pos, f"invalid JSON: {err.msg}") from None
            except (ValueError, RecursionError) as err:
                raise self.error(self.pos, f"invalid JSON: {_why(err)}") from None
            # Read at least as much again: a long record is decoded O(1) times, not once per chunk.
            self.fill(len(self.buf) - self.pos)
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end
        return value


def _json_values(f, path: Path, array: bool) -> Iterator[tuple[str, object]]:
    stream = _JsonStream(f, path)
    if array:
        stream.take("[", "'['")
        if stream.peek() == "]":
            stream.pos += 1
        else:
            while True:
                stream.peek()
                where = f"{path}:{stream.line}"
                yield where, stream.value()
                if stream.peek() == ",":
                    stream.pos += 1
                    continue
                stream.take("]", "',' or ']' after a record")
                break
        if stream.peek():
            raise stream.error(stream.pos, "invalid JSON: text after the closing ']'")
    else:
        while stream.peek():
            where = f"{path}:{stream.line}"
            yield where, stream.value()


def file_layout(path: str | Path) -> str:
    """'json array', 'json objects' (pretty-printed, one after another) or 'jsonl'."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"["):
        return "json array"
    return "json objects" if head.split(b"\n", 1)[0].strip() == b"{" else "jsonl"


def read_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """(file:line, parsed record) for every record of the file, in order; a record that does not
    parse comes as its DataError, so a caller can go on past it (inside a JSON array a syntax
    error is raised instead: the next record's start cannot be found)."""
    path = Path(path)
    kind = file_layout(path)
    with open(path, "rb") as f:
        if f.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:  # the mark Windows editors put first
            f.seek(0)
        yield from _jsonl(f, path) if kind == "jsonl" else _json_values(f, path, array=kind == "json array")


def read_conversations(
    path: str | Path, layout: str = "auto", on_error: str = "fail", stats: ReadStats | None = None, check=None
) -> Iterator[Conversation]:
    """Yield each record's validated turns; count layouts and skipped records in `stats`.

    check: a chat format's `check`, so a record the format cannot render is a bad record here,
    named by file, line and field, rather than an error deep in rendering."""
    if layout not in FORMATS or on_error not in ON_ERROR:
        raise ValueError(f"layout must be one of {FORMATS} and on_error one of {ON_ERROR}")
    stats = ReadStats() if stats is None else stats
    for where, record in read_records(path):
        try:
            if isinstance(record, DataError):
                raise record
            messages, found = to_messages(record, where, layout, check)
        except DataError as err:
            if on_error == "fail":
                raise
            stats.skip(err)
            continue
        stats.per_format[found] += 1
        yield messages
