"""Hugging Face folders as transformers writes them today: the chat template in chat_template.jinja,
the chat format told from the template's text, and decided before any weight is read.

The folders are written by transformers itself (test-only reference): `save_pretrained` of a tiny
random Llama and of a fast tokenizer carrying the template.
"""

import json

import pytest
from test_hf import hf_model

from minisft.hf import chat_format_of_template, export_hf
from minisft.pretrained import SavedModel
from minisft.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

# SmolLM2-Instruct's own template: ChatML with a default system turn.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's layout, as its instruct models' templates write it.
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Mistral's [INST] layout: none of minisft's formats.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.train_bpe(["hello world, the user and the assistant"] * 4, vocab_size=300)
    tok.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>"])
    return tok


def save_today(folder, tokenizer: Tokenizer, template: str | None):
    """A model folder as transformers saves one now: the template goes to chat_template.jinja."""
    hf_model("llama", vocab_size=320).save_pretrained(folder)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token
    )
    hf_tok.chat_template = template
    hf_tok.save_pretrained(folder)
    return folder


def test_the_template_is_read_from_chat_template_jinja(tokenizer, tmp_path, capsys):
    from minisft.__main__ import main

    folder = save_today(tmp_path / "model", tokenizer, SMOLLM2)
    assert (folder / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    saved = SavedModel(folder)
    assert (saved.chat_format, saved.chat_template) == ("chatml", SMOLLM2)
    model, tok = saved.load()
    assert tok.chat_template == SMOLLM2
    assert main(["chat", str(folder), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    # The export carries the template minisft renders, and the format's name.
    export_hf(tmp_path / "out", model, tok, saved.chat_format)
    exported = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert exported["minisft_chat_format"] == "chatml" and "<|im_start|>" in exported["chat_template"]


@pytest.mark.parametrize(
    "template, chat_format", [(SMOLLM2, "chatml"), (LLAMA3, "llama3"), (MISTRAL, None), ("", None), (None, None)]
)
def test_the_chat_format_is_told_from_the_template_text(template, chat_format):
    assert chat_format_of_template(template) == chat_format


def test_qwen3s_own_template_is_qwen3(shared_data):
    config = json.loads((shared_data / "tokenizers" / "qwen3" / "tokenizer_config.json").read_text())
    assert chat_format_of_template(config["chat_template"]) == "qwen3"


@pytest.mark.parametrize(
    "template, why",
    [
        (
            MISTRAL,
            "has a chat template that is none of minisft's formats (chatml, qwen3, llama3, llama3.1, instruction)",
        ),
        (None, "has no chat template"),
    ],
)
def test_chat_and_export_refuse_before_the_weights_load(tokenizer, tmp_path, monkeypatch, capsys, template, why):
    """No format, no chat: said at once (the weights are never read), and without calling the model
    'a base model' — an instruct model with an unfamiliar template is not one."""
    from minisft.__main__ import main

    folder = save_today(tmp_path / "model", tokenizer, template)
    monkeypatch.setattr("minisft.pretrained.load_hf", lambda *a: pytest.fail("weights loaded before the refusal"))
    capsys.readouterr()
    assert main(["chat", str(folder), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == f"error: {folder} {why}: pick one with --chat_format\n"
    assert main(["export", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {folder} {why}: the export needs the format it was trained with\n"
    assert "base model" not in err and not (tmp_path / "out").exists()
    # Named on the command line, the format is used: the weights load and the model answers.
    monkeypatch.undo()
    assert main(["chat", str(folder), "--prompt", "hi", "--chat-format", "chatml", "--max-new-tokens", "2"]) == 0
