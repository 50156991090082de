"""ChatML rendering: the exact text, which positions are trained, the prompt, plain text.

Expectations are built here from the conversation itself (text pieces, special-token ids looked
up by name) and checked against what minisft.chat renders.
"""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from minisft.chat import ChatML, forgetting_text, render_text
from minisft.tokenizer import DEMO_SPECIAL_TOKENS, Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy.\nIt has a long history."},
]
CORPUS = [m["content"] for m in CONVERSATION] * 3 + ["system user assistant", "a b c, hello world!"]


def canonical_chatml(messages) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


@pytest.fixture(scope="module")
def demo_tok() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def plain_tok() -> Tokenizer:
    """A byte-level BPE without the demo's prefix space: its text is ChatML to the byte."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(DEMO_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend, eos_token="<|endoftext|>", pad_token="<|pad|>")


def expected_ids_and_trained(tok: Tokenizer, messages):
    """The full token sequence, and for each token whether the model is trained to produce it."""
    start, end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    ids, trained = [], []
    for m in messages:
        header = [start] + tok.encode(m["role"] + "\n")
        body = tok.encode(m["content"]) + [end]
        sep = tok.encode("\n")
        ids += header + body + sep
        trained += [False] * len(header) + [m["role"] == "assistant"] * len(body) + [False] * len(sep)
    return ids, trained


def check_render(tok: Tokenizer, messages, expected_text: str, content_text):
    example = ChatML(tok).render(messages)
    full, trained = expected_ids_and_trained(tok, messages)

    # the text: all but the last token are inputs; the last is never trained (a separator)
    assert example.input_ids == full[:-1]
    assert tok.decode(example.input_ids + [full[-1]], skip_special_tokens=False) == expected_text
    assert len(example.labels) == len(example.input_ids)

    # trained positions: t is trained iff token t+1 is assistant content or its <|im_end|>
    trained_positions = [t for t, label in enumerate(example.labels) if label != -100]
    assert trained_positions == [t for t in range(len(full) - 1) if trained[t + 1]]
    for t in trained_positions:
        assert example.labels[t] == full[t + 1]
    assert example.num_trained_tokens == len(trained_positions)

    # ...and read back as text, the trained tokens are exactly each answer followed by <|im_end|>
    trained_text = tok.decode([example.labels[t] for t in trained_positions], skip_special_tokens=False)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert trained_text == "".join(content_text(a) + "<|im_end|>" for a in answers)


def test_render_is_exact_chatml_with_a_prefix_free_tokenizer(plain_tok):
    check_render(plain_tok, CONVERSATION, canonical_chatml(CONVERSATION), lambda text: text)


def test_render_with_the_demo_tokenizer(demo_tok):
    # The demo tokenizer puts a space before the first word of every encode() call, so each
    # encoded piece (role header, content, the "\n" separator) starts with one extra space.
    def p(text):
        return text if text.startswith(" ") else " " + text

    expected = "".join(
        f"<|im_start|>{p(m['role'] + chr(10))}{p(m['content'])}<|im_end|>{p(chr(10))}" for m in CONVERSATION
    )
    assert expected.startswith("<|im_start|> system\n You are a helpful assistant.<|im_end|> \n<|im_start|> user\n")
    check_render(demo_tok, CONVERSATION, expected, p)


def test_render_with_the_real_qwen3_tokenizer(shared_data):
    tok = Tokenizer.from_file(shared_data / "tokenizers" / "qwen3")
    check_render(tok, CONVERSATION, canonical_chatml(CONVERSATION), lambda text: text)
    assert ChatML(tok).render(CONVERSATION).input_ids[0] == 151644


@pytest.mark.parametrize("fixture", ["plain_tok", "demo_tok"])
def test_render_prompt_is_the_conversation_up_to_the_last_answer(fixture, request):
    tok = request.getfixturevalue(fixture)
    chat = ChatML(tok)
    start = tok.token_id("<|im_start|>")
    prompt = chat.render_prompt(CONVERSATION[:-1])
    header = [start] + tok.encode("assistant\n")
    assert prompt[-len(header) :] == header

    full, _ = expected_ids_and_trained(tok, CONVERSATION)
    answer_at = max(i for i, token in enumerate(full) if token == start) + len(header)
    assert prompt == full[:answer_at]
    assert tok.decode(full[answer_at:], skip_special_tokens=False).startswith(
        tok.decode(tok.encode(CONVERSATION[-1]["content"])) + "<|im_end|>"
    )
    if fixture == "plain_tok":
        assert tok.decode(prompt, skip_special_tokens=False) == canonical_chatml(CONVERSATION[:-1]) + (
            "<|im_start|>assistant\n"
        )


def test_unknown_role_is_refused(demo_tok):
    with pytest.raises(ValueError, match="unknown role .bot."):
        ChatML(demo_tok).render([{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}])
    with pytest.raises(ValueError, match="unknown role .bot."):
        ChatML(demo_tok).render_prompt([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}])


def test_render_text_trains_every_token_and_ends_with_eos(demo_tok):
    text = "The capital of France is Paris."
    ids = demo_tok.encode(text)
    example = render_text(demo_tok, text)
    assert example.input_ids == ids
    assert example.labels == ids[1:] + [demo_tok.eos_id]
    assert example.labels[-1] == demo_tok.eos_id == 1
    assert -100 not in example.labels and example.num_trained_tokens == len(ids)


def test_forgetting_text_has_every_token_but_the_first_as_a_target_and_no_end_of_text(demo_tok):
    text = "The capital of France is Paris."
    ids = demo_tok.encode(text)
    example = forgetting_text(demo_tok, text)
    assert example.input_ids == ids[:-1] and example.labels == ids[1:]
    assert demo_tok.eos_id not in example.labels and example.num_trained_tokens == len(ids) - 1


def test_plain_text_eval_documents_are_read_without_an_end_of_text_target(demo_tok, tmp_path, capsys):
    """data.plain_text_eval (the forgetting curve in train): one document a line, blank lines skipped,
    every token after the first a target and no eos; cut to max_len and counted; a one-token line (nothing
    to predict) skipped and named. By hand: the lines are 11, 16 and 1 tokens; max_len 12 cuts the second."""
    from minisft.data import DataError
    from minisft.recipe import load_plain_text

    lines = ["The capital of France is Paris.", "", "A week is 7 days.", "a"]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    first, second = load_plain_text(str(tmp_path / "text.txt"), demo_tok, 12)
    ids = demo_tok.encode(lines[0])
    assert first.input_ids == ids[:-1] and first.labels == ids[1:]  # whole: 10 targets, the last a text token
    ids = demo_tok.encode(lines[2])
    assert second.input_ids == ids[:12] and second.labels == ids[1:13]
    assert "text.txt: 2 plain-text documents, 1 cut to 12 tokens, 1 of one token skipped (line 4)" in (
        capsys.readouterr().out
    )
    (tmp_path / "single.txt").write_text("a\nthe\n")
    with pytest.raises(DataError, match="single.txt: every line is a single token"):
        load_plain_text(str(tmp_path / "single.txt"), demo_tok, 12)


def test_no_special_token_is_added_by_encode_even_with_a_bos_post_processor():
    """A tokenizer whose post-processor adds <s> (like Llama's) must not give a rendered
    conversation any BOS: encode() is called without special tokens."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = Tokenizer(backend, eos_token="</s>", pad_token="<pad>", bos_token="<s>")
    assert tok.bos_id == 0
    assert backend.encode("hello").ids[0] == 0  # the post-processor is live: the test can fail
    assert 0 not in tok.encode("hello")
    example = ChatML(tok).render(CONVERSATION)
    assert tok.bos_id not in example.input_ids + example.labels
    assert 0 not in ChatML(tok).render_prompt(CONVERSATION[:-1])
