"""Fuzz: 1200 malformed records, from a seeded generator. Each one must give a one-line DataError
naming its file and line (on_error="fail"), or be counted as skipped ("skip") — never another
exception, never a silent pass."""

import json
import random

import pytest

from minisft.data import DataError, ReadStats, read_conversations

GOOD = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    {"instruction": "Sort.", "input": "c a b", "output": "a b c"},
    {"prompt": "2+2=", "completion": "4"},
]
JUNK = [None, 0, -1.5, True, [], {}, [[]], [None], {"a": {"b": [1]}}, float("nan")]  # never a string
# The fields each layout requires: putting junk there must fail.
REQUIRED = {
    0: [("messages",), ("messages", 0), ("messages", 0, "role"), ("messages", 1, "content")],
    1: [("conversations",), ("conversations", 1), ("conversations", 0, "from"), ("conversations", 1, "value")],
    2: [("instruction",), ("output",), ("input",)],
    3: [("prompt",), ("completion",)],
}


def wrong_type(rng: random.Random) -> bytes:
    which = rng.randrange(len(GOOD))
    record = json.loads(json.dumps(GOOD[which]))
    *parents, key = rng.choice(REQUIRED[which])
    target = record
    for parent in parents:
        target = target[parent]
    huge_role = key in ("role", "from") and rng.random() < 0.3
    target[key] = "r" * 100_000 if huge_role else rng.choice(JUNK)
    return json.dumps(record).encode()


def truncated(rng: random.Random) -> bytes:
    line = json.dumps(rng.choice(GOOD)).encode()
    return line[: rng.randrange(1, len(line) - 1)]


def invalid_utf8(rng: random.Random) -> bytes:
    line = bytearray(json.dumps(rng.choice(GOOD)).encode())
    at = rng.randrange(len(line))
    line[at:at] = bytes([rng.choice([0x80, 0xBF, 0xC3, 0xE2, 0xF0, 0xFF, 0xFE])])
    if line[at] >= 0xC0 and at + 1 < len(line):
        line[at + 1 : at + 1] = b"A"  # a lead byte followed by ASCII: never valid
    return bytes(line)


def nested_junk(rng: random.Random) -> bytes:
    depth = rng.choice([3, 50, 100_000])
    inner = "[" * depth + "]" * depth
    return rng.choice(
        [
            inner,
            '{"messages": ' + inner + "}",
            '{"messages": [{"role": "user", "content": ' + inner + "}]}",
            '{"messages": [' + '{"a":' * depth + "1" + "}" * depth + "]}",
            '{"prompt": "p", "completion": ' + "1" * rng.choice([5000, 100_000]) + "}",
        ]
    ).encode()


def odd_values(rng: random.Random) -> bytes:
    return rng.choice(
        [
            b'{"prompt": "p\\ud800", "completion": "c"}',
            b'{"prompt": "p", "completion": NaN}',
            b'{"prompt": "p", "completion": "   "}',
            b'{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
            b'{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
            b'"just a string"',
            b"12",
            b"null",
            b'{"chat": []}',
            b"{,}",
            b'{"prompt": "p", "completion": "c"',
            bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))).replace(b"\n", b"") or b"\x00",
        ]
    )


GENERATORS = [wrong_type, truncated, invalid_utf8, nested_junk, odd_values]


def malformed_lines(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    lines = [GENERATORS[i % len(GENERATORS)](rng) for i in range(n)]
    return [line for line in lines if line.strip()]  # a blank line is not a record


@pytest.fixture(scope="module")
def lines() -> list[bytes]:
    lines = malformed_lines(1200)
    assert len(lines) >= 1000
    return lines


def test_every_malformed_line_is_a_one_line_error_naming_file_and_line(tmp_path, lines):
    good = json.dumps(GOOD[3]).encode()
    path = tmp_path / "d.jsonl"
    for line in lines:
        path.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
        seen = []
        with pytest.raises(DataError) as excinfo:
            for messages in read_conversations(path):
                seen.append(messages)
        message = str(excinfo.value)
        assert message.startswith(f"{path}:2: "), (line[:80], message)
        assert "\n" not in message and len(message) < len(str(path)) + 200, message
        assert len(seen) == 1


def test_skip_mode_counts_every_malformed_line_and_keeps_every_good_one(tmp_path, lines):
    rng = random.Random(1)
    path = tmp_path / "d.jsonl"
    good_records = [rng.choice(GOOD) for _ in lines]
    pairs = zip(good_records, lines, strict=True)
    path.write_bytes(b"".join(json.dumps(g).encode() + b"\n" + bad + b"\n" for g, bad in pairs))
    stats = ReadStats()
    got = list(read_conversations(path, on_error="skip", stats=stats))
    assert stats.num_skipped == len(lines)
    assert stats.records == len(got) == len(good_records)
    assert len(stats.first_errors) == 10 and all(e.startswith(f"{path}:") for e in stats.first_errors)
    assert set(stats.skipped) <= {"invalid JSON", "invalid UTF-8", "wrong field", "unknown role", "unknown layout",
                                  "empty answer", "no final answer"}  # fmt: skip


def test_malformed_records_inside_a_json_array_never_crash(tmp_path, lines):
    path = tmp_path / "d.json"
    good = json.dumps(GOOD[0]).encode()
    for line in lines[::4]:
        path.write_bytes(b"[\n" + good + b",\n" + line + b"\n]")
        with pytest.raises(DataError) as excinfo:
            list(read_conversations(path))
        message = str(excinfo.value)
        assert message.startswith(f"{path}:") and "\n" not in message, message
