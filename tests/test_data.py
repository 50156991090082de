"""minisft.data: JSONL conversations in, one DataError naming file:line and field per bad record.

The other layouts, JSON files and the skip policy: test_data_formats.py; malformed input: test_data_fuzz.py."""

import json

import pytest

from minisft.data import DataError, read_conversations

GOOD = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}
GOOD2 = {
    "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6 ✓"},
    ]
}


def test_reads_valid_file_and_skips_blank_lines(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n   \n" + json.dumps(GOOD2, ensure_ascii=False) + "\n\n")
    assert list(read_conversations(path)) == [GOOD["messages"], GOOD2["messages"]]


def test_last_line_without_newline(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(GOOD))
    assert list(read_conversations(path)) == [GOOD["messages"]]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(read_conversations(tmp_path / "absent.jsonl"))


def turns(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


BAD_RECORDS = {
    "invalid json": ('{"messages": [', "invalid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object, got list [1, 2]"),
    "no known layout": (json.dumps({"conversation": []}), 'unknown layout: expected a "messages"'),
    "messages not a list": (json.dumps({"messages": "hi"}), "messages: expected a non-empty list"),
    "empty messages": (json.dumps({"messages": []}), "messages: expected a non-empty list"),
    "turn not an object": (json.dumps({"messages": ["hi"]}), "messages[0]: expected an object"),
    "turn missing content": (
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}),
        "messages[0].content: expected a string",
    ),
    "turn missing role": (json.dumps({"messages": [{"content": "x"}]}), "messages[0].role: expected a string"),
    "content not a string": (
        json.dumps({"messages": turns(("user", "q"), ("assistant", 42))}),
        "messages[1].content: expected a string, got 42",
    ),
    "unknown role": (
        json.dumps({"messages": turns(("user", "q"), ("bot", "a"))}),
        "messages[1].role: unknown role 'bot'",
    ),
    "empty assistant content": (
        json.dumps({"messages": turns(("user", "q"), ("assistant", "  \n"))}),
        "messages[1].content: empty assistant turn",
    ),
    "ends with user": (
        json.dumps({"messages": turns(("user", "q"), ("assistant", "a"), ("user", "q2"))}),
        "messages: the conversation must end with an assistant turn",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_names_file_line_and_field(tmp_path, case):
    bad, needle = BAD_RECORDS[case]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + bad + "\n" + json.dumps(GOOD) + "\n")  # the bad record is line 3
    seen = []
    with pytest.raises(DataError) as excinfo:
        for messages in read_conversations(path):
            seen.append(messages)
    message = str(excinfo.value)
    assert message.startswith(f"{path}:3: ")
    assert needle in message
    assert "\n" not in message
    assert seen == [GOOD["messages"]]  # records before the bad line were read


def test_invalid_utf8_on_the_first_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"messages": "\xff\xfe"}\n' + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(DataError, match="not valid UTF-8") as excinfo:
        list(read_conversations(path))
    assert str(excinfo.value).startswith(f"{path}:1: ")


def test_invalid_utf8_on_a_later_line_names_that_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() * 2 + b'{"messages": "\xff\xfe"}\n')
    seen = []
    with pytest.raises(DataError, match="not valid UTF-8") as excinfo:
        for messages in read_conversations(path):
            seen.append(messages)
    assert str(excinfo.value).startswith(f"{path}:3: ")
    assert len(seen) == 2
