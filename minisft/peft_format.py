"""LoRA adapters on disk, in PEFT's layout, so `peft.PeftModel.from_pretrained(base, folder)` loads
ours and minisft loads PEFT's:

    folder/adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    folder/adapter_model.safetensors    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (r, in)
                                        base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight (out, r)
    folder/minisft_adapter.json         the base the adapters were trained on: its path, content hash and
                                        the dtype it was held in (lora.base_dtype), so chat and export
                                        load it as training saw it

An adapter means nothing without its base: loading one onto a base of other shapes, or of another
content hash than the one recorded, is refused in one line. A folder with adapter_config.json is a
model folder too (`SavedModel`): its base, found by path, plus the adapters, unmerged.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from minisft.errors import ConfigError
from minisft.hf import CheckpointError
from minisft.integrity import read_json
from minisft.lora import TARGETS, LoRAConfig, apply_lora, base_hash, lora_layers
from minisft.model import Transformer

ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FILE = "adapter_config.json", "adapter_model.safetensors", "minisft_adapter.json"
PREFIX = "base_model.model.model."  # PeftModel > LlamaForCausalLM > LlamaModel: where `layers` sits

# PEFT options minisft has no code for, with the values that mean "not used": anything else is refused.
UNUSED = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "layer_replication": (None,),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
}


def is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def adapter_base(folder: Path) -> Path:
    """The base model an adapter folder names: minisft's record, else PEFT's base_model_name_or_path."""
    recorded = recorded_base(folder)
    if recorded is not None:
        base = recorded["path"]
    else:
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    if not base or not Path(base).exists():
        raise FileNotFoundError(f"{folder}: its base model {base!r} is not on this machine; the adapters need it")
    return Path(base)


def peft_key(name: str) -> str:
    """'layers.0.self_attn.q_proj.lora_A' -> PEFT's 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'."""
    return PREFIX + name + ".weight"


def write_adapter(folder: Path, model: Transformer) -> None:
    """The adapters of a model `attach_lora` set up -> folder's three files."""
    cfg, base = model.lora_config, model.lora_base
    weights = {}
    for name, layer in lora_layers(model).items():
        weights[peft_key(f"{name}.lora_A")] = layer.lora_A.detach().cpu().contiguous()
        weights[peft_key(f"{name}.lora_B")] = layer.lora_B.detach().cpu().contiguous()
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base["path"],
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": [TARGETS[t].rpartition(".")[2] for t in cfg.target_list],
        "inference_mode": True,
        "init_lora_weights": True,
    } | {key: allowed[0] for key, allowed in UNUSED.items() if key in ("use_dora", "bias", "fan_in_fan_out")}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (folder / BASE_FILE).write_text(json.dumps(base | {"base_dtype": cfg.base_dtype}, indent=2) + "\n")


def recorded_base(folder: Path) -> dict | None:
    """minisft_adapter.json: the base the adapters were trained on (path, sha256, base_dtype), or None
    for adapters minisft did not write (PEFT's)."""
    recorded = folder / BASE_FILE
    return read_json(recorded) if recorded.is_file() else None


def recorded_base_dtype(folder: Path) -> str:
    """The lora.base_dtype the adapters were trained with (fp32 for PEFT's, and minisft's before it was recorded)."""
    return (recorded_base(folder) or {}).get("base_dtype", "fp32")


def read_adapter_config(folder: Path, dropout: float = 0.0, base_dtype: str | None = None) -> LoRAConfig:
    """adapter_config.json -> a LoRAConfig, or one line saying what in it minisft cannot load. The base
    is held in base_dtype, or (None) in the dtype it was trained in: a bf16-trained base is bf16 again."""
    where = folder / ADAPTER_CONFIG
    try:
        config = json.loads(where.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{where}: cannot read it: {err}") from None
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ConfigError(f"{where}: peft_type {kind!r} is not supported (minisft loads LoRA adapters only)")
    for key, allowed in UNUSED.items():
        if config.get(key, allowed[0]) not in allowed:
            raise ConfigError(f"{where}: {key} = {config[key]!r} is not supported by minisft's LoRA")
    targets = config.get("target_modules")
    if not isinstance(targets, list):  # PEFT reads a string as a regular expression
        raise ConfigError(f"{where}: target_modules {targets!r}: minisft reads a list of projection names only")
    r = config.get("r", 8)  # PEFT's defaults for keys an older PEFT did not write
    if not isinstance(r, int) or r < 1:
        raise ConfigError(f"{where}: r = {r!r}; a LoRA rank must be at least 1")
    try:
        return LoRAConfig(
            r=r,
            alpha=float(config.get("lora_alpha", 8)),
            dropout=dropout,
            targets=",".join(targets),
            rslora=bool(config.get("use_rslora", False)),
            base_dtype=base_dtype or recorded_base_dtype(folder),
            adapter=str(folder),
        )
    except ValueError as err:  # a target LoRAConfig does not know
        raise ConfigError(f"{where}: {err}") from None


def load_adapter_weights(folder: Path, model: Transformer) -> None:
    """Copy folder's adapter tensors into model's LoRA layers; refuse another base's adapters."""
    trained_on = recorded_base(folder)
    if trained_on is not None:
        if trained_on["sha256"] != model.lora_base["sha256"]:
            raise CheckpointError(
                f"{folder}: these adapters were trained on {trained_on['path']} (sha256 {trained_on['sha256'][:12]}…), "
                f"but the base here is {model.lora_base['path']} (sha256 {model.lora_base['sha256'][:12]}…)"
            )
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS} (minisft reads adapters from safetensors only)")
    params = {
        peft_key(f"{name}.{part}"): getattr(layer, part)
        for name, layer in lora_layers(model).items()
        for part in ("lora_A", "lora_B")
    }
    with safe_open(path, framework="pt") as f:
        # PEFT saves some adapters with the adapter's name in the key ("...lora_A.default.weight").
        stored = {key.replace(".default.weight", ".weight"): key for key in f.keys()}
        missing = [k for k in params if k not in stored]
        unexpected = [k for k in stored if k not in params]
        if missing or unexpected:
            what = f"tensor {missing[0]} is missing" if missing else f"unexpected tensor {unexpected[0]}"
            raise CheckpointError(f"{path}: {what}: the adapters do not fit this base's layers")
        for key, param in params.items():
            tensor = f.get_tensor(stored[key])
            if tensor.shape != param.shape:
                raise CheckpointError(
                    f"{path}: {key} has shape {list(tensor.shape)}, this base needs {list(param.shape)}: "
                    "the adapters belong to another base model"
                )
            param.data.copy_(tensor)


def attach_lora(model: Transformer, cfg: LoRAConfig, base_path: Path) -> LoRAConfig:
    """Wrap model's projections as cfg says (or, with cfg.adapter, as that folder's adapter_config.json
    says, and load its adapters); remember the base (path, content hash) for every save. -> the config used."""
    if cfg.adapter:
        found = read_adapter_config(Path(cfg.adapter), cfg.dropout, cfg.base_dtype)
        if cfg.r and cfg.r != found.r:
            raise ConfigError(
                f"lora.r = {cfg.r}, but {cfg.adapter} has r = {found.r}: leave lora.r unset with an adapter"
            )
        cfg = replace(found, adapter=cfg.adapter)
    model.lora_base = {"path": str(base_path.resolve()), "sha256": base_hash(base_path)}
    apply_lora(model, cfg)
    if cfg.adapter:
        load_adapter_weights(Path(cfg.adapter), model)
    return cfg
