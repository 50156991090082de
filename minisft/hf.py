"""Load and export Hugging Face checkpoints of the Llama family: Llama, Mistral, Qwen2 and Qwen3.

A Hugging Face model folder holds

    config.json                          architecture, sizes, RoPE settings, tied embeddings
    model.safetensors                    the weights, or shards listed in model.safetensors.index.json
    tokenizer.json, tokenizer_config.json  the tokenizer and its special tokens (eos, pad, bos)
    generation_config.json               the ids `generate` stops on

The four architectures are one network with options: Mistral is Llama with a sliding attention
window, Qwen2 is Llama with biases on the q/k/v projections, Qwen3 is Llama with an RMSNorm on each
head's queries and keys (q_norm, k_norm) and often a head width other than hidden_size / heads.
minisft's parameter names are Llama's without the "model." prefix, so loading is a rename plus
checks: every tensor is read on its own through safetensors (never pickle), its shape checked
against config.json, then cast.

Export writes the same layout as LlamaForCausalLM — or Qwen2ForCausalLM when the projections have
biases, Qwen3ForCausalLM when the heads have q/k norms — which transformers, vLLM and llama.cpp all
read (a Mistral model comes back as Llama: the same network, its window already folded into
max_position_embeddings). The chat format minisft trained with goes along: as a chat template, and
as the stop token in generation_config.json, so the model stops after its answer (pitfall 1).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from minisft.chat import TOOLS_HEAD, TOOLS_TAIL, Llama31, make_chat_format
from minisft.errors import CheckpointError
from minisft.integrity import open_tensors
from minisft.model import Backends, ModelConfig, Transformer
from minisft.outputs import write_into
from minisft.tokenizer import Tokenizer, read_chat_template

# Architecture -> the model_type config.json gives with it.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# Chat format (chat.py) -> a Jinja template rendering it the same way, for the tools that read
# tokenizer_config.json's chat_template (transformers' apply_chat_template, vLLM), tool calls
# included. The qwen3 format is Qwen3's own template, which a Qwen3 tokenizer brings along
# (Tokenizer.chat_template). Texts go in as JSON strings, which Jinja reads back unchanged.
_CALL = (  # one tool call, OpenAI's nesting undone; arguments given as JSON text are written as they are
    "{%- set call = call.function if call.function is defined else call %}"
    "{%- set arguments = call.arguments if call.arguments is string else call.arguments | tojson %}"
)
CHAT_TEMPLATES = {
    "chatml": (
        "{%- if tools %}{{ '<|im_start|>system\\n' }}"
        "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
        "{{- " + json.dumps(TOOLS_HEAD) + " }}{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}"
        "{{- " + json.dumps(TOOLS_TAIL) + " + '<|im_end|>\\n' }}{% endif %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'tool' %}"
        "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
        "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
        "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
        "{%- elif not (tools and loop.first and message['role'] == 'system') %}"
        "{%- set content = message['content'] or '' %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + content }}"
        "{%- for call in message.tool_calls or [] %}"
        + _CALL
        + "{%- if content or not loop.first %}{{ '\\n' }}{% endif %}"
        "{{- '<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' + arguments + '}\\n</tool_call>' }}"
        "{%- endfor %}{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "llama3.1": (  # the date fixed, as chat.Llama31 renders it
        "{%- set first = 1 if messages and messages[0]['role'] == 'system' else 0 %}"
        "{{- '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n' }}"
        "{%- if tools %}{{ 'Environment: ipython\\n' }}{% endif %}"
        "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: " + Llama31.today + "\\n\\n' }}"
        "{%- if first %}{{ messages[0]['content'] | trim }}{% endif %}{{ '<|eot_id|>' }}"
        "{%- for message in messages[first:] %}"
        "{%- if tools and loop.first %}"
        "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' + " + json.dumps(Llama31.TOOLS_INTRO) + " }}"
        "{%- for tool in tools %}{{ tool | tojson(indent=4) + '\\n\\n' }}{% endfor %}"
        "{{- message['content'] | trim + '<|eot_id|>' }}"
        "{%- elif message['role'] == 'tool' %}"
        "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] | tojson + '<|eot_id|>' }}"
        "{%- elif message.tool_calls %}{% set call = message.tool_calls[0] %}"
        + _CALL
        + '{{- \'<|start_header_id|>assistant<|end_header_id|>\\n\\n{"name": "\' + call.name + \'", "parameters": \''
        " + arguments + '}<|eot_id|>' }}"
        "{%- else %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "instruction": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


def is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


# ---------------------------------------------------------------- config.json <-> ModelConfig


def _architecture(hf: dict, where: Path) -> str:
    names = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not names and model_type in ARCHITECTURES.values():
        return model_type
    found = names[0] if names else f"model_type {model_type!r}"
    raise CheckpointError(f"{where}: unsupported architecture {found}; minisft loads {', '.join(ARCHITECTURES)}")


def _rope(hf: dict, where: Path) -> dict:
    """RoPE settings, from either layout: transformers 5's `rope_parameters` or `rope_theta` +
    `rope_scaling` (older checkpoints, and what export writes)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(value, dict) for value in params.values()):
        raise CheckpointError(f"{where}: RoPE settings per layer type are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    rope = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{where}: partial rotary embeddings (partial_rotary_factor) are not supported")
    if kind == "linear":
        rope |= {"rope_scaling": "linear", "rope_factor": float(params["factor"])}
    elif kind == "llama3":
        rope |= {
            "rope_scaling": "llama3",
            "rope_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_seq_len": int(params["original_max_position_embeddings"]),
        }
    elif kind != "default":
        raise CheckpointError(
            f"{where}: RoPE scaling {kind!r} is not supported (minisft has linear and llama3); "
            "removing it from config.json runs the model at its original context length"
        )
    return rope


def _sliding_window(hf: dict, architecture: str) -> int | None:
    if architecture == "mistral":
        return hf.get("sliding_window")
    if architecture in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        return hf.get("sliding_window")
    return None


def model_config_from_hf(hf: dict, where: Path) -> ModelConfig:
    """config.json (as a dict) -> ModelConfig, refusing what minisft's model does not compute."""
    architecture = _architecture(hf, where)
    refusals = [
        (hf.get("hidden_act", "silu") != "silu", f"activation {hf.get('hidden_act')!r} (minisft has silu)"),
        (hf.get("mlp_bias", False), "biases in the MLP (mlp_bias)"),
        (architecture != "qwen2" and hf.get("attention_bias", False), "a bias on o_proj (attention_bias)"),
    ]
    for refused, what in refusals:
        if refused:
            raise CheckpointError(f"{where}: {what} is not supported")
    try:
        dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
        sizes = dict(
            vocab_size=hf["vocab_size"],
            dim=dim,
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"],
            max_seq_len=hf["max_position_embeddings"],
            norm_eps=hf["rms_norm_eps"],
        )
    except KeyError as err:
        raise CheckpointError(f"{where}: missing key {err}") from None
    head_dim = hf.get("head_dim") or dim // n_heads  # explicit in Qwen3 and Mistral-Nemo configs
    window = _sliding_window(hf, architecture)
    if window and window < sizes["max_seq_len"]:
        # Up to `window` tokens, sliding-window attention is plain causal attention: cap there.
        print(f"note: {where}: sliding window of {window} tokens: minisft caps sequences at it", file=sys.stderr)
        sizes["max_seq_len"] = window
    return ModelConfig(
        **sizes,
        **_rope(hf, where),
        tie_embeddings=hf.get("tie_word_embeddings", False),  # False is the default of all four
        attention_bias=architecture == "qwen2",
        qk_norm=architecture == "qwen3",
        head_dim=head_dim,
    )


def hf_config(config: ModelConfig, tokenizer: Tokenizer, stop_ids: list[int], dtype: torch.dtype) -> dict:
    """ModelConfig -> config.json of a LlamaForCausalLM, a Qwen2ForCausalLM (q/k/v biases) or a
    Qwen3ForCausalLM (q/k norms)."""
    if config.qk_norm and config.attention_bias:
        raise CheckpointError(
            "q/k norms with q/k/v biases: no Hugging Face architecture has both (Qwen3's bias is on o too)"
        )
    architecture = (
        "Qwen3ForCausalLM" if config.qk_norm else "Qwen2ForCausalLM" if config.attention_bias else "LlamaForCausalLM"
    )
    rope_scaling = None
    if config.rope_scaling:
        rope_scaling = {"rope_type": config.rope_scaling, "factor": config.rope_factor}
    if config.rope_scaling == "llama3":
        rope_scaling |= {
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_seq_len,
        }
    return {
        "architectures": [architecture],
        "model_type": ARCHITECTURES[architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        **({"use_sliding_window": False} if architecture != "LlamaForCausalLM" else {}),
        **({"attention_bias": False} if architecture != "Qwen2ForCausalLM" else {}),
        **({"mlp_bias": False} if architecture == "LlamaForCausalLM" else {}),
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stop_ids,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------- weights


def hf_name(name: str) -> str:
    """minisft's parameter name -> the Hugging Face one."""
    return name if name == "lm_head.weight" else "model." + name


def _weight_files(folder: Path) -> dict[str, Path]:
    """Hugging Face tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with open_tensors(single) as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (minisft reads only safetensors: "
        "pickled .bin/.pt files can run code when loaded; convert them first)"
    )


def read_weights(folder: Path, expected: dict[str, torch.Size], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read the tensors `expected` names (minisft names -> shapes) one at a time, checked and cast."""
    files = _weight_files(folder)
    missing = [hf_name(name) for name in expected if hf_name(name) not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{folder}: tensor {missing[0]} is missing{more}")
    # Old checkpoints store RoPE frequencies (recomputed here); tied ones sometimes a copy of the head.
    ignored = ("rotary_emb.inv_freq", "lm_head.weight")
    known = {hf_name(name) for name in expected}
    unexpected = [name for name in files if name not in known and not name.endswith(ignored)]
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected tensor {unexpected[0]}: config.json describes no such weight")
    by_file = defaultdict(list)
    for name in expected:
        by_file[files[hf_name(name)]].append(name)
    state = {}
    for path, names in by_file.items():
        with open_tensors(path) as f:
            for name in names:
                shape = tuple(f.get_slice(hf_name(name)).get_shape())
                if shape != tuple(expected[name]):
                    raise CheckpointError(
                        f"{path}: {hf_name(name)} has shape {list(shape)}, config.json implies {list(expected[name])}"
                    )
                tensor = f.get_tensor(hf_name(name))
                # Owned memory, not a view of the file's mapping: the views share one mapping, so a
                # weight replaced later (a bf16 LoRA base, `lora.py`) would stay resident while any other
                # weight lives — a bf16 base then cost 0.2 GB more than fp32 on SmolLM2, not 0.2 GB less.
                state[name] = tensor.to(dtype) if tensor.dtype != dtype else tensor.clone()
    return state


# ---------------------------------------------------------------- whole folders


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def chat_format_of_template(template: str | None) -> str | None:
    """The chat format a chat template writes, told by its turn markers: ChatML's `<|im_start|>`
    (Qwen3's when it also writes a `<think>` block), Llama 3's `<|start_header_id|>`; else None."""
    template = template or ""
    if "<|im_start|>" in template:
        return "qwen3" if "<think>" in template else "chatml"
    if "<|start_header_id|>" in template and "<|eot_id|>" in template:
        # Llama 3.1 to 3.3 add a system block with dates; 3.0 does not
        return "llama3.1" if "Cutting Knowledge Date" in template else "llama3"
    return None


def chat_format_of(folder: Path) -> str | None:
    """The chat format of an HF folder's model, from its small files alone (so a command can decide
    before the weights load): the one minisft exported it with, else the one its chat template
    writes, else None (no template, or one minisft does not know: the user has to pick one)."""
    return _tokenizer_config(folder).get("minisft_chat_format") or chat_format_of_template(read_chat_template(folder))


def load_hf(
    folder: str | Path, backends: Backends | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Transformer, Tokenizer, str | None]:
    """-> (model on CPU, tokenizer, chat format or None) from a Hugging Face model folder."""
    folder = Path(folder)
    if not is_hf_folder(folder):
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = model_config_from_hf(json.loads((folder / "config.json").read_text()), folder / "config.json")
    tokenizer = Tokenizer.from_file(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
            f"{config.vocab_size} rows: tokenizer and weights do not belong together"
        )
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = Transformer(config, backends)
    expected = {name: t.shape for name, t in model.state_dict().items()}
    model.load_state_dict(read_weights(folder, expected, dtype), assign=True)
    return model, tokenizer, chat_format_of(folder)


def export_hf(folder: str | Path, model: Transformer, tokenizer: Tokenizer, chat_format: str) -> Path:
    """Write a Hugging Face model folder that transformers' AutoModelForCausalLM loads as is: a new
    folder, or the files below put into an existing one (`export_command` checks it may)."""
    chat = make_chat_format(chat_format, tokenizer)
    stop_ids = list(dict.fromkeys([chat.end_id, tokenizer.eos_id]))  # end of turn first: pitfall 1
    template = CHAT_TEMPLATES.get(chat_format, tokenizer.chat_template)
    dtype = model.embed_tokens.weight.dtype

    def write(tmp: Path) -> None:
        weights = {hf_name(name): t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hf_config(model.config, tokenizer, stop_ids, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stop_ids, "pad_token_id": tokenizer.pad_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save(tmp)
        tokenizer_config = json.loads((tmp / "tokenizer_config.json").read_text()) | {
            "tokenizer_class": "PreTrainedTokenizerFast",  # the tokenizer.json as is: no BOS or legacy quirks
            **({"chat_template": template} if template else {}),
            "minisft_chat_format": chat_format,
            "model_max_length": model.config.max_seq_len,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    return write_into(folder, write)
