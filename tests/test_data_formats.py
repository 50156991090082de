"""minisft.data's four record layouts, its three file layouts, the skip policy, the real files in
../shared/data/sft, and minisft.dataset's over-long policy.

Expected turns are written out by hand (or, for the real files, rebuilt from `json.load` of the
whole file), never produced by minisft itself."""

import json

import pytest

import minisft.data as data
from minisft.chat import ChatML
from minisft.data import DataError, ReadStats, read_conversations
from minisft.dataset import load_examples
from minisft.tokenizer import Tokenizer


def turns(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


LAYOUTS = {
    "messages": (
        {"messages": turns(("user", "Hi"), ("assistant", "Hello"))},
        turns(("user", "Hi"), ("assistant", "Hello")),
    ),
    "messages with a top-level system": (
        {"system": "Be brief.", "messages": turns(("user", "Hi"), ("assistant", "Hello"))},
        turns(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")),
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Q1"},
                {"from": "gpt", "value": "A1"},
                {"from": "human", "value": "Q2"},
                {"from": "gpt", "value": "A2"},
            ],
            "id": "ignored",
        },
        turns(("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")),
    ),
    "prompt_completion": ({"prompt": "2+2=", "completion": "4"}, turns(("user", "2+2="), ("assistant", "4"))),
    "alpaca": (
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        turns(("user", "Translate.\n\nchat"), ("assistant", "cat")),
    ),
    "alpaca, empty input": (
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        turns(("user", "Say hi."), ("assistant", "hi")),
    ),
    "alpaca, no input, a system": (
        {"system": "S", "instruction": "Say hi.", "output": "hi"},
        turns(("system", "S"), ("user", "Say hi."), ("assistant", "hi")),
    ),
}
LAYOUT_NAME = {
    "messages": "messages",
    "messages with a top-level system": "messages",
    "sharegpt": "sharegpt",
    "prompt_completion": "prompt_completion",
    "alpaca": "alpaca",
    "alpaca, empty input": "alpaca",
    "alpaca, no input, a system": "alpaca",
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_each_layout_is_detected_and_read(tmp_path, case):
    record, expected = LAYOUTS[case]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    for layout in ("auto", LAYOUT_NAME[case]):
        stats = ReadStats()
        assert list(read_conversations(path, layout, stats=stats)) == [expected]
        assert dict(stats.per_format) == {LAYOUT_NAME[case]: 1}


def test_mixed_layouts_in_one_file_are_counted_per_layout(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record, _ in LAYOUTS.values()))
    stats = ReadStats()
    assert list(read_conversations(path, stats=stats)) == [expected for _, expected in LAYOUTS.values()]
    assert dict(stats.per_format) == {"messages": 2, "sharegpt": 1, "prompt_completion": 1, "alpaca": 3}


def test_a_forced_layout_names_the_missing_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: instruction: expected a string, but it is missing"):
        list(read_conversations(path, "alpaca"))


LAYOUT_ERRORS = {
    "sharegpt unknown speaker": (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
        "conversations[1].from: unknown role 'bot'; expected one of "
        "('system', 'human', 'gpt', 'function_call', 'observation')",
        "unknown role",
    ),
    "sharegpt ends with human": (
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        "conversations: the conversation must end with an assistant turn",
        "no final answer",
    ),
    "sharegpt value not a string": (
        {"conversations": [{"from": "human", "value": ["q"]}, {"from": "gpt", "value": "a"}]},
        "conversations[0].value: expected a string, got ['q'] (list)",
        "wrong field",
    ),
    "alpaca empty output": (
        {"instruction": "i", "output": " \n\t"},
        "output: empty assistant turn (nothing to train on)",
        "empty answer",
    ),
    "alpaca input not a string": (
        {"instruction": "i", "input": None, "output": "o"},
        "input: expected a string, got None (NoneType)",
        "wrong field",
    ),
    "completion missing": ({"prompt": "p"}, "completion: expected a string, but it is missing", "wrong field"),
    "system not a string": (
        {"system": 3, "prompt": "p", "completion": "c"},
        "system: expected a string, got 3 (int)",
        "wrong field",
    ),
    "lone surrogate": (
        {"prompt": "p\ud800", "completion": "c"},
        "prompt: not valid Unicode (a lone surrogate escape)",
        "wrong field",
    ),
}


@pytest.mark.parametrize("case", list(LAYOUT_ERRORS))
def test_layout_errors_name_line_and_field_and_are_counted_when_skipped(tmp_path, case):
    record, needle, kind = LAYOUT_ERRORS[case]
    good = {"prompt": "p", "completion": "c"}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError) as excinfo:
        list(read_conversations(path))
    assert str(excinfo.value) == f"{path}:2: {needle}"
    assert excinfo.value.kind == kind
    stats = ReadStats()
    assert len(list(read_conversations(path, on_error="skip", stats=stats))) == 2
    assert (stats.records, dict(stats.skipped), stats.first_errors) == (2, {kind: 1}, [f"{path}:2: {needle}"])


# ---------------------------------------------------------------- file layouts


RECORDS = [
    {"instruction": "A", "output": "1"},
    {"prompt": "B", "completion": "2"},
    {"messages": turns(("user", "C"), ("assistant", "3 ✓"))},
]
EXPECTED = [turns(("user", "A"), ("assistant", "1")), turns(("user", "B"), ("assistant", "2")), RECORDS[2]["messages"]]


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])  # tiny chunks make every record span several reads
def test_json_array_is_streamed_with_line_numbers(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(data, "CHUNK_CHARS", chunk)
    path = tmp_path / "d.json"
    path.write_text("\n" + json.dumps(RECORDS, indent=2, ensure_ascii=False) + "\n")
    assert data.file_layout(path) == "json array"
    assert list(read_conversations(path)) == EXPECTED
    # the third record starts on the line json.dumps put it on
    starts = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line == "  {"]
    bad = RECORDS[:2] + [{"messages": turns(("user", "C"), ("bot", "x"))}]
    path.write_text("\n" + json.dumps(bad, indent=2) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:{starts[2]}: messages\[1\].role: unknown role 'bot'"):
        list(read_conversations(path))


def test_pretty_printed_objects_one_after_another(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps(r, indent=2) for r in RECORDS) + "\n")
    assert data.file_layout(path) == "json objects"
    assert list(read_conversations(path)) == EXPECTED


@pytest.mark.parametrize(
    "text, line, needle",
    [
        ('[\n{"prompt": "p", "completion": "c"}\n', 3, "expected ',' or ']'"),
        ('[\n{"prompt": "p", "completion": "c"},\n{"prompt": \n', 4, "invalid JSON: Expecting value"),
        ('[{"prompt": "p", "completion": "c"}] x', 1, "text after the closing ']'"),
        ('[\n{"prompt": "p", "completion": "c"}\n{"prompt": "q"}]', 3, "expected ',' or ']'"),
    ],
)
def test_broken_json_array_is_a_clear_error_in_both_modes(tmp_path, text, line, needle):
    path = tmp_path / "d.json"
    path.write_text(text)
    for on_error in ("fail", "skip"):
        with pytest.raises(DataError, match=rf"^{path}:{line}: .*{needle}"):
            list(read_conversations(path, on_error=on_error))


def test_invalid_utf8_in_a_json_array_names_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"prompt": "p", "completion": "c"},\n{"prompt": "\xff", "completion": "c"}]')
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8"):
        list(read_conversations(path))


def test_a_record_in_an_array_may_be_skipped_but_not_a_syntax_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "p"}, {"prompt": "p", "completion": "c"}, 5]))
    stats = ReadStats()
    assert list(read_conversations(path, on_error="skip", stats=stats)) == [turns(("user", "p"), ("assistant", "c"))]
    assert dict(stats.skipped) == {"wrong field": 2}


# ---------------------------------------------------------------- the real files


def test_every_real_file_loads(shared_data):
    folder = shared_data / "sft"
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["alpaca_en_demo.json", "messages_train.jsonl", "sharegpt_conversation.json"]

    alpaca = json.loads((folder / "alpaca_en_demo.json").read_text())
    expected = [
        turns(
            ("user", r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else "")), ("assistant", r["output"])
        )
        for r in alpaca
    ]
    assert list(read_conversations(folder / "alpaca_en_demo.json", "alpaca")) == expected
    assert len(expected) == 999

    sharegpt = json.loads((folder / "sharegpt_conversation.json").read_text())["conversations"]
    roles = {"human": "user", "gpt": "assistant"}
    (got,) = read_conversations(folder / "sharegpt_conversation.json")
    assert got == [{"role": roles[t["from"]], "content": t["value"]} for t in sharegpt]

    # One record of this public file has an empty answer: refused by default, skipped and
    # reported on request.
    path = folder / "messages_train.jsonl"
    lines = path.read_text().splitlines()
    empty = [
        i + 1 for i, line in enumerate(lines) if any(not t["content"].strip() for t in json.loads(line)["messages"])
    ]
    assert empty == [202]
    with pytest.raises(DataError, match=rf"^{path}:202: messages\[1\].content: empty assistant turn"):
        list(read_conversations(path))
    stats = ReadStats()
    got = list(read_conversations(path, on_error="skip", stats=stats))
    assert got == [json.loads(line)["messages"] for i, line in enumerate(lines) if i + 1 != 202]
    assert (stats.records, dict(stats.skipped)) == (256, {"empty answer": 1})


# ---------------------------------------------------------------- over-long policy


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(["one two three four five six seven eight", "user assistant"], vocab_size=300)


def test_over_long_examples_are_dropped_or_truncated_and_reported(tmp_path, tok):
    chat = ChatML(tok)
    short = turns(("user", "one"), ("assistant", "two"))
    long_answer = turns(("user", "one"), ("assistant", " ".join(["eight"] * 30)))
    long_prompt = turns(("user", " ".join(["seven"] * 40)), ("assistant", "two"))
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (short, long_answer, long_prompt)))
    full = [chat.render(m) for m in (short, long_answer, long_prompt)]
    n_short = len(full[0].input_ids)
    limit = 20
    assert n_short <= limit < len(full[1].input_ids)
    prompt_len = full[1].labels.index(next(label for label in full[1].labels if label != -100))
    assert prompt_len < limit  # the long answer starts inside the limit ...
    assert full[2].labels.index(next(label for label in full[2].labels if label != -100)) >= limit  # ... this one not

    examples, report = load_examples(path, chat, limit, too_long="drop")
    assert examples == [full[0]]
    assert (report.dropped_too_long, report.truncated, report.answer_cut_off) == (2, 0, 0)
    assert "2 dropped as longer than 20 tokens" in report.summary()

    examples, report = load_examples(path, chat, limit, too_long="truncate")
    assert examples == [full[0], type(full[1])(full[1].input_ids[:limit], full[1].labels[:limit])]
    assert examples[1].num_trained_tokens == limit - prompt_len
    assert (report.dropped_too_long, report.truncated, report.answer_cut_off) == (0, 1, 1)
    assert "1 left out: truncation cut off their whole answer" in report.summary()


def test_load_examples_counts_skipped_records(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "one", "completion": "two"}\nnot json\n{"prompt": "one"}\n')
    examples, report = load_examples(path, ChatML(tok), 64, on_error="skip")
    assert examples == [ChatML(tok).render(turns(("user", "one"), ("assistant", "two")))]
    assert dict(report.read.skipped) == {"invalid JSON": 1, "wrong field": 1}
    assert "2 bad records skipped (1 invalid JSON, 1 wrong field)" in report.summary()
