"""Read conversations from a JSONL file, one `{"messages": [{"role", "content"}, ...]}` per line.

Every problem is reported as `DataError("file:line: field: what is wrong")`, so a user can open
the file at the right line. Records are streamed: the file is never loaded whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from minisft.chat import ROLES


class DataError(ValueError):
    """A bad record in a user's data file; the message names file, line and field."""


def _check_messages(messages: object, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: messages: expected a non-empty list of turns")
    for i, turn in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {field}: expected an object with role and content")
        for key in ("role", "content"):
            if not isinstance(turn.get(key), str):
                raise DataError(f"{where}: {field}.{key}: expected a string, got {turn.get(key)!r:.40}")
        if turn["role"] not in ROLES:
            raise DataError(f"{where}: {field}.role: unknown role {turn['role']!r}; expected one of {ROLES}")
        if turn["role"] == "assistant" and not turn["content"].strip():
            raise DataError(f"{where}: {field}.content: empty assistant turn (nothing to train on)")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: messages: the conversation must end with an assistant turn")
    return messages


def read_conversations(path: str | Path) -> Iterator[list[dict[str, str]]]:
    """Yield each line's validated `messages`; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:  # bytes, so a bad byte is reported on its own line
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 (byte {err.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise DataError(f'{where}: messages: missing; expected {{"messages": [...]}}')
            yield _check_messages(record["messages"], where)
