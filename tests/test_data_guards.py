"""Data that used to pass silently or fail for nothing (issue 14, item 6): `data check` on an empty
file exits 2 as `train` refuses it; a top-level "system" beside a system message is refused, not
rendered as two system turns; a UTF-8 byte-order mark (what Windows editors write first) is read."""

import codecs
import json

import pytest

from minisft.__main__ import main
from minisft.data import DataError, read_records, to_messages

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"], ids=["empty", "whitespace"])
def test_data_check_on_a_file_without_records_exits_2(tmp_path, capsys, text):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    assert main(["data", "check", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path} holds no records (empty or whitespace only)\n"


def test_a_top_level_system_and_a_system_message_are_refused(tmp_path, capsys):
    both = {"system": "be brief", "messages": [{"role": "system", "content": "be kind"}, *CHAT["messages"]]}
    with pytest.raises(DataError, match='f.jsonl:3: system: a top-level "system" and a system message in messages'):
        to_messages(both, "f.jsonl:3")
    sharegpt = {"system": "a", "conversations": [{"from": "system", "value": "b"}, {"from": "human", "value": "c"}]}
    with pytest.raises(DataError, match="and a system message in conversations: keep one of them"):
        to_messages(sharegpt | {"conversations": [*sharegpt["conversations"], {"from": "gpt", "value": "d"}]}, "x")
    alone, _ = to_messages({"system": "be brief", **CHAT}, "f.jsonl:1")  # one of them: fine
    assert [m["role"] for m in alone] == ["system", "user", "assistant"]

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + json.dumps(both) + "\n")
    assert main(["data", "check", str(path)]) == 2
    assert "two system prompts" in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["jsonl", "json array", "json objects"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, capsys, layout):
    records = [CHAT, {"prompt": "é?", "completion": "ü"}]
    text = {
        "jsonl": "".join(json.dumps(r) + "\n" for r in records),
        "json array": json.dumps(records, indent=1),
        "json objects": "".join(json.dumps(r, indent=2) + "\n" for r in records),
    }[layout]
    plain, marked = tmp_path / "plain.json", tmp_path / "marked.json"
    plain.write_text(text)
    marked.write_bytes(codecs.BOM_UTF8 + text.encode())
    assert [r for _, r in read_records(marked)] == [r for _, r in read_records(plain)] == records
    assert main(["data", "check", str(marked)]) == 0
    out = capsys.readouterr().out
    assert "records: 2 read, 2 valid, 0 bad" in out, out
