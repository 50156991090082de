"""LoRA: train a low-rank update beside each frozen projection instead of the projection itself.

    h = W x + b + s · B A dropout(x)          (Hu et al. 2021, eq. 3)

W (out, in) is the pretrained weight, frozen; A (r, in) and B (out, r) are the adapter, r ≪ in.
A starts Kaiming-uniform (as nn.Linear's own weight) and B at zero, so at step 0 the model *is*
the base model. The scale s is alpha / r (Hu et al.), or alpha / √r with rsLoRA (Kalajdzievski
2023: with 1/r the update's size shrinks as r grows, so large ranks learn no faster than small).

Why it matters here: the optimizer holds only A and B — no gradient and no AdamW moments for W,
so a fraction of full fine-tuning's memory — and the update is low-rank, which is why LoRA
"learns less and forgets less" (Biderman et al. 2024). The frozen W may be stored in bf16
(`base_dtype`), the adapters stay fp32.

`apply_lora` wraps the chosen projections of a `Transformer` in place; parameter names stay those of
the base (`layers.0.self_attn.q_proj.weight`) plus `...q_proj.lora_A` / `lora_B`, so the base's
state dict still loads and exports as before. On disk, adapters use PEFT's layout (`peft_format.py`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minisft.errors import ConfigError
from minisft.model import Transformer

# Short target names -> the projection attribute in model.py (PEFT names them by the attribute).
TARGETS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
BASE_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 0  # adapter rank (LoRA on when > 0, with init); 0: full fine-tuning
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter's input only (the frozen path sees x as is)
    # Projections that get an adapter, comma-separated: q, k, v, o, gate, up, down (or PEFT's q_proj, ...).
    # All seven by default: Biderman et al. 2024 found adapters on the MLP too learn most.
    targets: str = "q,k,v,o,gate,up,down"
    rslora: bool = False  # rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r
    # Storage of the wrapped projections' frozen weights: fp32 (as loaded), or bf16 (half their memory;
    # each is cast to the activations' dtype as it is used). Embedding, norms and adapters stay fp32.
    base_dtype: str = "fp32"
    adapter: str = ""  # start from this adapter folder (PEFT layout); its r, alpha, targets and rslora are used

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"lora.r must be at least 1 (0: no LoRA), got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"lora.base_dtype must be one of {', '.join(BASE_DTYPES)}, got {self.base_dtype!r}")
        unknown = [t for t in self.target_list if t not in TARGETS]
        if unknown or not self.target_list:
            raise ValueError(f"lora.targets: {unknown[0] if unknown else '(none)'!r} matches no layer; "
                             f"choose from {', '.join(TARGETS)}")  # fmt: skip

    @property
    def target_list(self) -> list[str]:
        """['q', 'v'] from 'q,v' or PEFT's 'q_proj,v_proj'."""
        names = [t.strip().removesuffix("_proj") for t in self.targets.split(",") if t.strip()]
        return list(dict.fromkeys(names))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def enabled(self) -> bool:
        return self.r > 0 or bool(self.adapter)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus s · B A: the same `weight` and `bias` names, and `lora_A`, `lora_B`."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float, base_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().to(base_dtype), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))  # (out, r): step 0 = base
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as PEFT does
        self.scale, self.dropout = scale, nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        # Both paths run in x's dtype (bf16 under autocast: the norms hand over bf16). W and the fp32
        # adapters are cast to it, never x: the backward then keeps x itself, shared by q, k and v (or
        # gate and up), not a private copy per adapter — an fp32 x.to() here cost a copy of every input.
        out = F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.merged:
            return out
        low = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        # out + s · low Bᵀ in one GEMM that accumulates into out: no (..., out) product to scale, then
        # add, and back (SmolLM2's 576 -> 1,536 projection, 1,024 rows, 1 thread: 43 ms forward and
        # backward instead of 46, of which the frozen matmul alone takes 39).
        update = torch.addmm(out.flatten(0, -2), low.flatten(0, -2), self.lora_B.to(x.dtype).T, alpha=self.scale)
        return update.view(out.shape)

    def delta(self) -> Tensor:
        """s · B A, (out, in) in fp32: what merging adds to W."""
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """W += s·BA: one matmul per projection at inference. Exact in fp32; a bf16 base rounds."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, scale={self.scale:g}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """'layers.0.self_attn.q_proj' -> its LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: Transformer, cfg: LoRAConfig) -> dict[str, LoRALinear]:
    """Freeze every parameter of `model`, then wrap cfg's targets in LoRALinear (in place, on the
    model's device); -> the wrapped layers by name. Only lora_A and lora_B then require grad."""
    model.requires_grad_(False)
    wrapped = {}
    for i, block in enumerate(model.layers):
        for target in cfg.target_list:
            parent_name, _, attr = TARGETS[target].partition(".")
            parent = getattr(block, parent_name)
            linear = getattr(parent, attr)
            dtype = torch.bfloat16 if cfg.base_dtype == "bf16" else linear.weight.dtype  # fp32: as loaded
            layer = LoRALinear(linear, cfg.r, cfg.scale, cfg.dropout, dtype)
            setattr(parent, attr, layer)
            wrapped[f"layers.{i}.{TARGETS[target]}"] = layer
    if not wrapped:
        raise ConfigError(f"lora.targets={cfg.targets!r} matches no layer of the model")
    model.lora_config = cfg  # checkpoints see it: they save these adapters alone (peft_format.py)
    return wrapped


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its weight and put plain nn.Linear back: a model that exports, and
    runs, as any other (in place; -> the model)."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = nn.Parameter(layer.weight.detach())
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach())
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, plain)
    model.requires_grad_(True)
    return model


def base_hash(path: str | Path) -> str:
    """sha256 of a base model's weight files (a .gguf file, or a folder's *.safetensors), so an
    adapter can tell the base it was trained on from another of the same shape."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.glob("*.safetensors") if "adapter" not in p.name)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
