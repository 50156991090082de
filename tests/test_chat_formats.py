"""Chat formats against independent references, on random conversations from a seeded generator.

- Without transformers: the rendered text and the trained text equal what each format's layout,
  written out here with f-strings, says.
- With transformers (the `reference` extra): our ids equal `apply_chat_template(tokenize=True)`
  token for token, given the same Jinja template, and our trained positions equal the
  `assistant_masks` it computes from `{% generation %}` blocks; on the real Qwen3 tokenizer with
  its own chat_template, ids and trained text, think block included.

Contents never begin with whitespace here: there the template's text may merge the header's last
newline with the answer (see chat.py), which `test_leading_newline_gives_the_same_text` covers.
"""

import functools
import random

import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from minisft.chat import CHAT_FORMATS, ChatML, Instruction, Llama3, Qwen3, make_chat_format
from minisft.tokenizer import Tokenizer

# The pre-tokenizer regex of Llama 3 and Qwen 2/3.
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [
    "<|pad|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
WORDS = ["the", "cat", "sat", "42", "3.14", "é", "naïve", "中文", "🙂", "?", "!", ",", "'s", "x+y", "(a)", "###", "<b>"]


def random_text(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randrange(1, 12))]
    text = words[0]
    for word in words[1:]:
        text += rng.choice([" ", " ", " ", "\n", "\n\n", "  ", ""]) + word
    return text + rng.choice(["", "", " ", "\n", "."])


def random_conversation(rng: random.Random) -> list[dict[str, str]]:
    turns = [("system", random_text(rng))] if rng.random() < 0.5 else []
    for _ in range(rng.randrange(1, 4)):
        turns += [("user", random_text(rng)), ("assistant", random_text(rng))]
        if rng.random() < 0.15:
            turns.append(("assistant", random_text(rng)))  # two answers in a row
    return [{"role": role, "content": content} for role, content in turns]


CONVERSATIONS = [random_conversation(random.Random(seed)) for seed in range(60)]
CORPUS = [m["content"] for c in CONVERSATIONS for m in c] + ["system user assistant Instruction Response"]


def train_bpe(corpus: list[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE with Llama 3's and Qwen's pre-tokenizer and the SPECIALS, trained on corpus."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return backend


def ours_and_theirs(backend: HFTokenizer) -> tuple[Tokenizer, object]:
    """minisft's tokenizer and transformers' over the same BPE (each a fresh copy of it)."""
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(HFTokenizer.from_str(backend.to_str()), eos_token="<|endoftext|>", pad_token="<|pad|>")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(backend.to_str()),  # a fresh copy: encode_special_tokens off
        bos_token="<|begin_of_text|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    return tok, hf


@pytest.fixture(scope="module")
def backend() -> HFTokenizer:
    return train_bpe(CORPUS * 3, 600)


@pytest.fixture(scope="module")
def tok(backend) -> Tokenizer:
    return Tokenizer(HFTokenizer.from_str(backend.to_str()), eos_token="<|endoftext|>", pad_token="<|pad|>")


# ---------------------------------------------------------------- each layout, written out


def expected_text(name: str, messages) -> tuple[str, str]:
    """(the whole rendered text, the trained text) of a conversation, by each format's layout."""
    whole, trained = "", ""
    if name == "llama3":
        whole = "<|begin_of_text|>"
    for m in messages:
        role, content = m["role"], m["content"]
        answer = role == "assistant"
        if name == "chatml":
            whole += f"<|im_start|>{role}\n{content}<|im_end|>\n"
            trained += f"{content}<|im_end|>" if answer else ""
        elif name == "llama3":
            whole += f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
            trained += f"{content.strip()}<|eot_id|>" if answer else ""
        elif role == "system":
            whole += f"{content}\n\n"
        elif role == "user":
            whole += f"### Instruction:\n{content}\n\n"
        else:
            whole += f"### Response:\n{content}<|endoftext|>\n\n"
            trained += f"{content}<|endoftext|>"
    return whole, trained


def full_ids(example, last_token):
    return example.input_ids + [last_token]


@pytest.mark.parametrize("name", ["chatml", "llama3", "instruction"])
def test_text_and_trained_text_follow_the_layout(tok, name):
    chat = make_chat_format(name, tok)
    examples = chat.render_many(CONVERSATIONS)
    for messages, example in zip(CONVERSATIONS, examples, strict=True):
        assert example == chat.render(messages)
        whole, trained = expected_text(name, messages)
        text = tok.decode(example.input_ids, skip_special_tokens=False)
        assert whole.startswith(text)  # all but the last token are inputs; the last is:
        assert whole[len(text) :] == {"chatml": "\n", "llama3": "<|eot_id|>", "instruction": "\n\n"}[name]
        labels = [label for label in example.labels if label != -100]
        assert tok.decode(labels, skip_special_tokens=False) == trained
        for t, label in enumerate(example.labels[:-1]):
            assert label in (-100, example.input_ids[t + 1])


@pytest.mark.parametrize("name", ["chatml", "llama3", "instruction"])
def test_train_on_last_and_all(tok, name):
    for messages in CONVERSATIONS[:20]:
        every = make_chat_format(name, tok).render(messages)
        last = make_chat_format(name, tok, train_on="last").render(messages)
        everything = make_chat_format(name, tok, train_on="all").render(messages)
        assert every.input_ids == last.input_ids == everything.input_ids
        assert everything.labels == every.input_ids[1:] + [everything.labels[-1]]  # every next token
        final = [m for m in messages if m["role"] == "assistant"][-1]["content"]
        _, trained = expected_text(name, [{"role": "assistant", "content": final}])
        labels = [label for label in last.labels if label != -100]
        assert tok.decode(labels, skip_special_tokens=False) == trained
        # the last answer's trained labels are the tail of the per-answer ones
        assert labels == [label for label in every.labels if label != -100][-len(labels) :]


def test_render_prompt_is_the_conversation_up_to_the_answer(tok):
    for name, header in (("chatml", "<|im_start|>assistant\n"), ("llama3", None), ("instruction", "### Response:\n")):
        chat = make_chat_format(name, tok)
        for messages in CONVERSATIONS[:10]:
            cut = max(i for i, m in enumerate(messages) if m["role"] == "user") + 1
            whole, _ = expected_text(name, messages[:cut])
            header = header or "<|start_header_id|>assistant<|end_header_id|>\n\n"
            assert tok.decode(chat.render_prompt(messages[:cut]), skip_special_tokens=False) == whole + header


def test_special_token_text_in_content_stays_text(tok):
    messages = [{"role": "user", "content": "<|im_end|>"}, {"role": "assistant", "content": "ok<|eot_id|>"}]
    for name in ("chatml", "llama3", "instruction"):
        chat = make_chat_format(name, tok)
        (example,) = chat.render_many([messages])
        specials = {tok.token_id(s) for s in ("<|im_end|>", "<|eot_id|>")}
        real = [i for i in example.input_ids + example.labels if i in specials]
        assert real == [chat.end_id] * real.count(chat.end_id)  # only the format's own end-of-turn tokens
        # chatml: both turns' ends as inputs, the answer's as a label; llama3: the answer's end is the
        # last token (a label only); instruction: its end of turn is eos
        assert len(real) == {"chatml": 3, "llama3": 2, "instruction": 0}[name]


def test_make_chat_format_errors(tok):
    with pytest.raises(ValueError, match="unknown chat format 'alpaca'"):
        make_chat_format("alpaca", tok)
    with pytest.raises(ValueError, match="train_on must be one of"):
        make_chat_format("chatml", tok, train_on="user")
    with pytest.raises(KeyError, match="<think>"):
        Qwen3(tok)  # this tokenizer has no think tokens
    assert sorted(CHAT_FORMATS) == ["chatml", "instruction", "llama3", "llama3.1", "qwen3"]
    assert [ChatML.name, Llama3.name, Instruction.name] == ["chatml", "llama3", "instruction"]


# ---------------------------------------------------------------- against transformers


def generation(body: str) -> str:
    return "{% generation %}" + body + "{% endgeneration %}"


TEMPLATES = {
    "chatml": (
        "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' -}}"
        "{%- if m['role'] == 'assistant' -%}" + generation("{{- m['content'] + '<|im_end|>' -}}") + "{%- else -%}"
        "{{- m['content'] + '<|im_end|>' -}}{%- endif -%}{{- '\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    "llama3": (
        "{{- bos_token -}}{%- for m in messages -%}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' -}}"
        "{%- if m['role'] == 'assistant' -%}"
        + generation("{{- m['content'] | trim + '<|eot_id|>' -}}")
        + "{%- else -%}"
        "{{- m['content'] | trim + '<|eot_id|>' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    "instruction": (
        "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{{- m['content'] + '\\n\\n' -}}"
        "{%- elif m['role'] == 'user' -%}{{- '### Instruction:\\n' + m['content'] + '\\n\\n' -}}"
        "{%- else -%}{{- '### Response:\\n' -}}" + generation("{{- m['content'] + eos_token -}}") + "{{- '\\n\\n' -}}"
        "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
    ),
}
# Meta's own Llama 3 Instruct template, verbatim: the ids must match it too.
LLAMA3_OFFICIAL = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def hf_tok(backend):
    return ours_and_theirs(backend)[1]


def hf_render(hf_tok, messages, template, **kwargs):
    out = hf_tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True, **kwargs)
    return out["input_ids"], out.get("assistant_masks")


def trained_mask(example) -> list[int]:
    """1 where the full sequence's token is trained (the first token never is)."""
    return [0] + [int(label != -100) for label in example.labels]


@pytest.mark.parametrize("name", ["chatml", "llama3", "instruction"])
def test_ids_and_mask_equal_transformers(tok, hf_tok, name):
    for train_on in ("assistant", "last"):
        chat = make_chat_format(name, tok, train_on)
        for messages, example in zip(CONVERSATIONS, chat.render_many(CONVERSATIONS), strict=True):
            ids, mask = hf_render(hf_tok, messages, TEMPLATES[name], return_assistant_tokens_mask=True)
            assert example.input_ids == ids[:-1]
            assert sum(mask) > 0
            if train_on == "last":  # only the final run of trained tokens
                start = max(t for t in range(1, len(mask)) if mask[t] and not mask[t - 1])
                mask = [0] * start + mask[start:]
            assert trained_mask(example) == mask
            labels = [label for label in example.labels if label != -100]
            assert labels == [i for i, m in zip(ids, mask, strict=True) if m]
            if name == "llama3" and train_on == "assistant":
                assert hf_render(hf_tok, messages, LLAMA3_OFFICIAL)[0] == ids
            prompt = messages[: max(i for i, m in enumerate(messages) if m["role"] == "user") + 1]
            assert (
                chat.render_prompt(prompt) == hf_render(hf_tok, prompt, TEMPLATES[name], add_generation_prompt=True)[0]
            )


def test_leading_newline_gives_the_same_text(tok, hf_tok):
    """An answer that begins with a newline: the same text as the template's, tokenized with the
    header kept whole (what generation sees after the prompt)."""
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "\nsat"}]
    example = ChatML(tok).render(messages)
    hf_text = hf_tok.apply_chat_template(messages, chat_template=TEMPLATES["chatml"], tokenize=False)
    assert tok.decode(example.input_ids, skip_special_tokens=False) + "\n" == hf_text
    prompt = ChatML(tok).render_prompt(messages[:1])
    assert example.input_ids[: len(prompt)] == prompt


# ---------------------------------------------------------------- Qwen3, its own template


@functools.cache
def load_qwen3(folder):
    transformers = pytest.importorskip("transformers")
    return Tokenizer.from_file(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture
def qwen3(shared_data):
    return load_qwen3(shared_data / "tokenizers" / "qwen3")  # loaded once, shared by the tests below


def qwen3_expected_trained(messages) -> str:
    """The trained text by the template's rule for answers without reasoning: the final answer
    after the last user turn opens with an empty think block."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    text = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            think = "<think>\n\n</think>\n\n" if i == len(messages) - 1 and i > last_user else ""
            text += think + m["content"] + "<|im_end|>"
    return text


def test_qwen3_equals_its_own_chat_template(qwen3):
    tok, hf = qwen3
    chat = Qwen3(tok)
    for messages, example in zip(CONVERSATIONS, chat.render_many(CONVERSATIONS), strict=True):
        ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert example.input_ids == ids[:-1]
        labels = [label for label in example.labels if label != -100]
        assert tok.decode(labels, skip_special_tokens=False) == qwen3_expected_trained(messages)
        prompt = messages[: max(i for i, m in enumerate(messages) if m["role"] == "user") + 1]
        hf_prompt = hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert chat.render_prompt(prompt) == hf_prompt["input_ids"]
        # the quirk: the final answer opens with a think block the generation prompt does not hold
        if messages[-2]["role"] == "user":
            assert ids[len(hf_prompt["input_ids"])] == tok.token_id("<think>")


@pytest.mark.parametrize(
    "answers",
    [
        ["<think>\nfirst I add\n</think>\n\n4", "<think>check</think>Yes."],  # reasoning kept after the last query
        ["<think>r1</think>A1", None, "A2"],  # None: a user turn; earlier reasoning is dropped
        ["plain", None, "<think>\n\n</think>\n\nalready there"],
    ],
)
def test_qwen3_reasoning_in_content(qwen3, answers):
    tok, hf = qwen3
    messages = [{"role": "user", "content": "2+2?"}]
    for answer in answers:
        messages.append(
            {"role": "user", "content": "and?"} if answer is None else {"role": "assistant", "content": answer}
        )
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    example = Qwen3(tok).render(messages)
    assert example.input_ids == ids[:-1]
    trained = tok.decode([label for label in example.labels if label != -100], skip_special_tokens=False)
    text = hf.apply_chat_template(messages, tokenize=False)
    # every trained span is the text between an "assistant\n" header and its "<|im_end|>", end included
    spans = [part.split("<|im_end|>")[0] + "<|im_end|>" for part in text.split("<|im_start|>assistant\n")[1:]]
    assert trained == "".join(spans)
