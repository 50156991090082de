"""`python -m minisft chat MODEL`: talk to a model in the terminal.

Prompts are rendered with the chat format saved with the model (a minisft checkpoint's
minisft.json, an exported folder's tokenizer_config.json, an exported GGUF's metadata), so the
model sees at inference exactly the layout it was trained on (pitfall 7). A model minisft did not
train gets the format its chat template writes (ChatML, Qwen3 or Llama 3); without a template, or
with one of another kind, `--chat_format` must name one — decided before the weights load.
Each answer stops at the format's end-of-turn token or at eos.
"""

from __future__ import annotations

import argparse
import sys

import torch

from minisft.chat import CHAT_FORMATS, make_chat_format
from minisft.errors import ConfigError
from minisft.generate import generate
from minisft.pretrained import SavedModel
from minisft.tokenizer import UnknownTokenError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a run folder, a minisft checkpoint, a Hugging Face model folder or a .gguf file")
    parser.add_argument("--prompt", help="answer this one message and exit (no interactive session)")
    parser.add_argument("--system", help="a system message to start the conversation with")
    parser.add_argument("--chat_format", choices=sorted(CHAT_FORMATS), help="override the model's saved format")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    parser.add_argument("--top_p", type=float, default=1.0, help="sample from the smallest set with this mass")
    parser.add_argument("--seed", type=int, default=0)


def chat_command(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    saved = SavedModel(args.model)
    name = args.chat_format or saved.chat_format
    if name is None:
        raise ConfigError(f"{saved.why_no_chat_format()}: pick one with --chat_format")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 halves the memory of a big model
    model, tokenizer = saved.load(dtype=dtype)
    try:
        chat = make_chat_format(name, tokenizer)
    except UnknownTokenError as err:
        raise ConfigError(f"chat format {name!r} does not fit {saved.path}'s tokenizer: {err.args[0]}") from None
    model = model.to(device).eval()
    stop_ids = {chat.end_id, tokenizer.eos_id}
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def reply(text: str) -> str:
        messages.append({"role": "user", "content": text})
        prompt = chat.render_prompt(messages)
        seed = args.seed + len(messages)  # a fresh draw each turn, the same conversation each run
        ids = generate(model, [prompt], args.max_new_tokens, stop_ids, args.temperature, args.top_p, seed)[0]
        answer = tokenizer.decode(ids).strip()
        messages.append({"role": "assistant", "content": answer})
        return answer

    if args.prompt is not None:
        try:
            print(reply(args.prompt))
        except ValueError as err:  # a bad sampling setting, or a prompt longer than the model's context
            raise ConfigError(str(err)) from None
        return 0
    print(f"chatting with {saved.path} (chat format {name}); an empty line or Ctrl-D ends, /reset starts over")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not text:
            return 0
        if text == "/reset":
            del messages[1 if args.system else 0 :]
            continue
        try:
            print(f"model> {reply(text)}")
        except ValueError as err:  # the conversation outgrew the model's context
            messages.pop()
            print(f"error: {err}; /reset starts over", file=sys.stderr)
