"""Tool calling and Llama 3.1, against the models' own chat templates rendered by transformers'
`apply_chat_template` (test-only): Qwen3's (the real tokenizer in ../shared/data), Llama 3.1's and
Qwen2.5's (tests/fixtures/chat_templates, sources named there) and the templates minisft exports.

Conversations come from a seeded generator: several tool calls in one turn, results holding JSON
and unicode, multi-turn. Our ids must equal the template's token for token, and our trained
positions must equal those found by rendering prefixes of the conversation with the template:
an answer starts where the template's generation prompt for it ends, and ends where the turn
after it would begin — never by searching the ids for a marker.
"""

import json
import random
from pathlib import Path

import pytest
from test_chat_formats import load_qwen3, ours_and_theirs, train_bpe

from minisft.__main__ import main
from minisft.chat import Llama31, make_chat_format
from minisft.data import Conversation, DataError, ReadStats, read_conversations
from minisft.dataset import load_examples
from minisft.hf import CHAT_TEMPLATES, chat_format_of

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
transformers = pytest.importorskip("transformers")

WORDS = ["Zürich", "weather", "中文", "🙂", "the", "price", "of", "42", "3.5", "naïve", "é", "ok", "it's", "<b>"]
FUNCTIONS = ["get_weather", "search", "convert_units", "lookup_price"]


def text(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, n)))


def tool(name: str, rng: random.Random) -> dict:
    properties = {"city": {"type": "string", "description": text(rng)}, "days": {"type": "integer"}}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": text(rng, 10),
            "parameters": {"type": "object", "properties": properties, "required": ["city"]},
        },
    }


def arguments(rng: random.Random, as_text: bool) -> dict | str:
    args = {"city": text(rng, 3), "days": rng.randrange(1, 9), "options": {"units": "°C", "tags": ["a", "ü"]}}
    return json.dumps(args, ensure_ascii=False) if as_text else args


def result(rng: random.Random) -> str:
    """A tool's result: JSON (non-ASCII kept or escaped) or plain text."""
    value = {"temperature": rng.randrange(-5, 30) + 0.5, "summary": text(rng), "ok": True}
    return rng.choice([json.dumps(value, ensure_ascii=False), json.dumps(value), text(rng, 12)])


def tool_conversation(seed: int, one_call: bool = False, text_args: bool = False, system: bool | None = None):
    """user -> [assistant calling tools -> their results]+ -> assistant answer [-> user -> answer]."""
    rng = random.Random(seed)
    names = rng.sample(FUNCTIONS, rng.randrange(1, 4))
    turns = [{"role": "system", "content": text(rng)}] if (rng.random() < 0.5 if system is None else system) else []
    turns.append({"role": "user", "content": text(rng, 10)})
    for _ in range(rng.randrange(1, 3)):
        calls = [
            {"type": "function", "function": {"name": rng.choice(names), "arguments": arguments(rng, text_args)}}
            for _ in range(1 if one_call else rng.randrange(1, 4))
        ]
        content = "" if one_call or rng.random() < 0.5 else text(rng)
        turns.append({"role": "assistant", "content": content, "tool_calls": calls})
        turns += [{"role": "tool", "content": result(rng)} for _ in calls]
    turns.append({"role": "assistant", "content": text(rng, 12)})
    if rng.random() < 0.3:
        turns += [{"role": "user", "content": text(rng)}, {"role": "assistant", "content": text(rng)}]
    return turns, [tool(name, rng) for name in names]


def ours(turns: list[dict], tools: list[dict]) -> Conversation:
    """The conversation as minisft's reader yields it: OpenAI's nesting undone, tools attached."""
    messages = []
    for turn in turns:
        calls = [call["function"] for call in turn.get("tool_calls", [])]
        messages.append({"role": turn["role"], "content": turn["content"], **({"tool_calls": calls} if calls else {})})
    return Conversation(messages, tools)


def reference_trained_positions(render, turns: list[dict], untrained_tail: int) -> set[int]:
    """Trained positions of the whole rendering, found by rendering prefixes. Answer i starts where
    the generation prompt after turns[:i] ends; it ends where a user turn appended after it would
    begin, less the template's untrained tail after the end-of-turn token ("\\n" in ChatML). A
    user turn after it also keeps Qwen3 from adding the think block a final answer gets."""
    extra = {"role": "user", "content": "x"}
    extra_len = len(render([extra, extra])) - len(render([extra]))
    whole = render(turns)
    trained = set()
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start = len(render(turns[:i], add_generation_prompt=True))
        end = len(whole) if i == len(turns) - 1 else len(render([*turns[: i + 1], extra])) - extra_len
        trained |= set(range(start, end - untrained_tail))
    return trained


def prompt_end(turns: list[dict]) -> int:
    """Where the last answer begins: the turns before it are the prompt generation is given."""
    return max(i for i, turn in enumerate(turns) if turn["role"] != "assistant") + 1


def our_trained_positions(example) -> set[int]:
    return {t + 1 for t, label in enumerate(example.labels) if label != -100}


# ---------------------------------------------------------------- a small tokenizer for ChatML and Llama 3.1


@pytest.fixture(scope="module")
def tok_and_hf():
    corpus = [json.dumps(tool_conversation(seed), ensure_ascii=False) for seed in range(40)]
    return ours_and_theirs(train_bpe(corpus * 2, 900))


def renderer(hf, template: str | None, tools: list[dict], **fixed):
    def render(turns, add_generation_prompt=False):
        kwargs = dict(tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=True, **fixed)
        return hf.apply_chat_template(turns, chat_template=template, return_dict=True, **kwargs)["input_ids"]

    return render


def assert_equal_to_template(chat, render, turns, tools, untrained_tail):
    conversation = ours(turns, tools)
    example = chat.render(conversation)
    whole = render(turns)
    assert example.input_ids == whole[:-1]
    assert example.labels[-1] == (whole[-1] if untrained_tail == 0 else -100)
    assert our_trained_positions(example) == reference_trained_positions(render, turns, untrained_tail)
    prompt_at = prompt_end(turns)
    assert chat.render_prompt(Conversation(conversation[:prompt_at], tools)) == render(
        turns[:prompt_at], add_generation_prompt=True
    )


# ---------------------------------------------------------------- Qwen3: its own template, the real tokenizer


@pytest.fixture
def qwen3(shared_data):
    return load_qwen3(shared_data / "tokenizers" / "qwen3")


@pytest.mark.parametrize("text_args", [False, True], ids=["object arguments", "JSON-text arguments"])
def test_qwen3_tool_calls_equal_its_template(qwen3, text_args):
    tok, hf = qwen3
    chat = make_chat_format("qwen3", tok)
    several = 0
    for seed in range(25):
        turns, tools = tool_conversation(seed, text_args=text_args)
        several += any(len(t.get("tool_calls", [])) > 1 for t in turns)
        assert_equal_to_template(chat, renderer(hf, None, tools), turns, tools, untrained_tail=1)
    assert several >= 5  # several calls in one turn, often
    # tool results are never trained, calls always are: the trained text holds every call, no result
    turns, tools = tool_conversation(3)
    trained = tok.decode([t for t in chat.render(ours(turns, tools)).labels if t != -100], skip_special_tokens=False)
    assert trained.count("<tool_call>") == sum(len(t.get("tool_calls", [])) for t in turns)
    assert "<tool_response>" not in trained and all(t["content"] not in trained for t in turns if t["role"] == "tool")


# ---------------------------------------------------------------- ChatML with the Hermes / Qwen2.5 convention


def test_chatml_tool_calls_equal_qwen25s_template_and_qwen3s_prompt(tok_and_hf, qwen3):
    """Qwen2.5's template, verbatim, where it has no default system prompt to add (a system turn is
    given; its arguments are objects); without a system turn, the prompt Qwen3's template writes."""
    tok, hf = tok_and_hf
    qwen25 = (TEMPLATES / "qwen2.5.jinja").read_text()
    chat = make_chat_format("chatml", tok)
    for seed in range(25):
        turns, tools = tool_conversation(seed, system=True)
        assert_equal_to_template(chat, renderer(hf, qwen25, tools), turns, tools, untrained_tail=1)
    qwen3_tok, qwen3_hf = qwen3
    chat = make_chat_format("chatml", qwen3_tok)
    for seed in range(25):
        turns, tools = tool_conversation(seed, text_args=seed % 2 == 1, system=False)
        cut = prompt_end(turns)
        prompt = renderer(qwen3_hf, None, tools)(turns[:cut], add_generation_prompt=True)
        assert chat.render_prompt(Conversation(ours(turns, tools)[:cut], tools)) == prompt


# ---------------------------------------------------------------- Llama 3.1: Meta's template


def test_llama31_equals_metas_template_with_and_without_tools(tok_and_hf):
    tok, hf = tok_and_hf
    official = (TEMPLATES / "llama3.1.jinja").read_text()
    chat = make_chat_format("llama3.1", tok)
    for seed in range(25):
        turns, tools = tool_conversation(seed, one_call=True)
        assert_equal_to_template(chat, renderer(hf, official, tools), turns, tools, untrained_tail=0)
        plain = [t for t in turns if t["role"] != "tool" and "tool_calls" not in t]  # no tool at all
        assert_equal_to_template(chat, renderer(hf, official, []), plain, [], untrained_tail=0)
    text = hf.apply_chat_template(plain, chat_template=official, tokenize=False)
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" in text
    # Llama 3.2's template writes today's date; minisft fixes it at the template's default
    llama32 = (TEMPLATES / "llama3.2.jinja").read_text()
    assert chat.render(plain).input_ids == renderer(hf, llama32, [], date_string="26 Jul 2024")(plain)[:-1]


def test_llama31_refuses_what_its_template_would_refuse_or_drop(tmp_path, tok_and_hf):
    tok, _ = tok_and_hf
    calls = [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
    cases = {
        "two calls": ([{"role": "assistant", "content": "", "tool_calls": calls * 2}], "calls one tool per answer"),
        "text beside a call": ([{"role": "assistant", "content": "Let me see.", "tool_calls": calls}], "drops an"),
    }
    for turns, message in cases.values():
        record = {"messages": [{"role": "user", "content": "q"}, *turns, {"role": "tool", "content": "1"}]}
        record["messages"].append({"role": "assistant", "content": "done"})
        path = tmp_path / "d.jsonl"
        good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=rf"^{path}:2: messages\[1\]: llama3.1 {message}"):
            load_examples(path, Llama31(tok), 512, on_error="fail", layout="messages")


@pytest.mark.parametrize("name", ["llama3", "instruction"])
def test_a_format_without_tool_calling_refuses_tool_data_never_drops_it(tmp_path, tok_and_hf, name):
    tok, _ = tok_and_hf
    chat = make_chat_format(name, tok)
    turns, tools = tool_conversation(1)
    records = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": tools},
        {"messages": turns},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=rf"^{path}:1: tools: the {name} chat format has no tool calling; chatml"):
        load_examples(path, chat, 512)
    examples, report = load_examples(path, chat, 512, on_error="skip")
    assert len(examples) == 1 and report.read.skipped == {"unrenderable": 2}
    first_call = next(i for i, t in enumerate(turns) if "tool_calls" in t)
    assert report.read.first_errors[1].startswith(f"{path}:2: messages[{first_call}]: the {name} chat format")


# ---------------------------------------------------------------- the templates minisft exports


@pytest.mark.parametrize("name", ["chatml", "llama3.1"])
def test_exported_template_renders_tool_conversations_as_the_format_does(tok_and_hf, name):
    tok, hf = tok_and_hf
    chat = make_chat_format(name, tok)
    for seed in range(20):
        turns, tools = tool_conversation(seed, one_call=name == "llama3.1", text_args=seed % 3 == 0)
        for tools_given in (tools, []):
            kept = turns if tools_given else [t for t in turns if t["role"] != "tool" and "tool_calls" not in t]
            render = renderer(hf, CHAT_TEMPLATES[name], tools_given)
            assert chat.render(ours(kept, tools_given)).input_ids == render(kept)[:-1]
            cut = prompt_end(kept)
            prompt = Conversation(ours(kept, tools_given)[:cut], tools_given)
            assert chat.render_prompt(prompt) == render(kept[:cut], add_generation_prompt=True)


def test_llama_3_0_and_3_1_are_told_apart_by_their_templates(tmp_path):
    from test_chat_formats import LLAMA3_OFFICIAL

    for template, expected in (
        (LLAMA3_OFFICIAL, "llama3"),
        ((TEMPLATES / "llama3.1.jinja").read_text(), "llama3.1"),
        ((TEMPLATES / "llama3.2.jinja").read_text(), "llama3.1"),
        ((TEMPLATES / "qwen2.5.jinja").read_text(), "chatml"),
        (CHAT_TEMPLATES["llama3.1"], "llama3.1"),
    ):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        assert chat_format_of(tmp_path) == expected


# ---------------------------------------------------------------- the ShareGPT tool layout


def sharegpt_record(turns: list[dict], tools: list[dict]) -> dict:
    """LLaMA-Factory's layout: function_call / observation turns, tools as a JSON string of bare
    function definitions."""
    speaker = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
    conversations = []
    for turn in turns:
        if turn.get("tool_calls"):
            calls = [c["function"] for c in turn["tool_calls"]]
            value = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            conversations.append({"from": "function_call", "value": value})
        else:
            conversations.append({"from": speaker[turn["role"]], "value": turn["content"]})
    return {"conversations": conversations, "tools": json.dumps([t["function"] for t in tools], ensure_ascii=False)}


def test_sharegpt_function_call_and_observation_render_as_the_openai_layout(tmp_path, qwen3):
    tok, hf = qwen3
    chat = make_chat_format("qwen3", tok)
    records, expected = [], []
    for seed in range(10):
        turns, tools = tool_conversation(seed, system=False)
        turns = [dict(t, content="") if t.get("tool_calls") else t for t in turns]  # ShareGPT calls have no text
        records.append(sharegpt_record(turns, tools))
        expected.append(renderer(hf, None, tools)(turns))
    path = tmp_path / "glaive.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    stats = ReadStats()
    conversations = list(read_conversations(path, stats=stats, check=chat.check))
    assert stats.per_format == {"sharegpt": 10} and not stats.num_skipped
    for conversation, ids in zip(conversations, expected, strict=True):
        assert chat.render(conversation).input_ids == ids[:-1]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"conversations": [{"from": "function_call", "value": "{oops"}]},
         r"conversations\[0\]\.value: not valid JSON"),
        ({"messages": [{"role": "user", "content": "q", "tool_calls": [{"name": "f", "arguments": {}}]}]},
         r"messages\[0\]\.tool_calls: only assistant turns call tools"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
         r"messages\[0\]\.tool_calls\[0\]\.function\.arguments: expected an object or its JSON"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"arguments": {}}]}]},
         r"messages\[0\]\.tool_calls\[0\]\.name: expected a string, but it is missing"),
        ({"prompt": "p", "completion": "c", "tools": [{"description": "no name"}]},
         r"tools\[0\]: expected a function definition with a name"),
        ({"prompt": "p", "completion": "c", "tools": "[{"}, r"tools: not valid JSON"),
    ],
)  # fmt: skip
def test_bad_tool_data_names_file_line_and_field(tmp_path, record, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:1: {message}"):
        list(read_conversations(path))


def test_train_command_on_tool_data_with_a_format_without_tools_is_a_one_line_error(tmp_path, tok_and_hf, capsys):
    tok, _ = tok_and_hf
    tok.save(tmp_path / "tok")
    turns, tools = tool_conversation(2)
    (tmp_path / "t.jsonl").write_text(json.dumps({"messages": turns, "tools": tools}) + "\n")
    args = ["train", "--data.train_file", str(tmp_path / "t.jsonl"), "--data.tokenizer", str(tmp_path / "tok")]
    assert main([*args, "--data.chat_format", "llama3", "--data.cache_dir", ""]) == 2
    err = capsys.readouterr().err
    refusal = "the llama3 chat format has no tool calling; chatml, llama3.1, qwen3 have it"
    assert err == f"error: {tmp_path / 't.jsonl'}:1: tools: {refusal}\n"
