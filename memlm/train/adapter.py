"""Adapters: what training produces, a small safetensors file next to the base model, never
a copy of it. Two kinds:

- `knn-gates`: the Memorizing-Transformer gate biases (layers x heads floats);
- `fot-lora`: LoRA weights on the memory layers' attention projections (peft).

`MemoryLM.load(adapter=PATH)` and `load_adapter(lm, PATH)` apply either.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, safe_open, save_file

from memlm.memory.backends import MemorizingBackend

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_config(layers: list[int], rank: int, alpha: float) -> LoraConfig:
    """LoRA on the attention projections of the given layers only."""
    pattern = rf"model\.layers\.({'|'.join(map(str, layers))})\.self_attn\.({'|'.join(PROJECTIONS)})"
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=pattern, bias="none")


def add_lora(lm, rank: int = 8, alpha: float = 16.0) -> dict[str, torch.nn.Parameter]:
    """Inject LoRA into the memory layers of `lm.model`; returns the trainable parameters."""
    layers = lm.config.layer_indices(lm.shape.num_layers)
    inject_adapter_in_model(lora_config(layers, rank, alpha), lm.model)
    lm.lora = {"layers": layers, "rank": rank, "alpha": alpha}
    return {name: p for name, p in lm.model.named_parameters() if "lora_" in name}


def save_adapter(lm, path: str | Path, kind: str, provenance: dict) -> Path:
    """Write the trained tensors of `kind` with how they were made (command, seed, results)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "knn-gates":
        tensors = {"gate_bias": lm.backend.gate_bias.detach().float().cpu().contiguous()}
        extra = {}
    elif kind == "fot-lora":
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(lm.model).items()}
        extra = {"lora": lm.lora}
    else:
        raise ValueError(f"unknown adapter kind {kind!r}")
    metadata = {"kind": kind, "storage_key": json.dumps(lm.config.storage_key()), **{k: json.dumps(v) for k, v in {**extra, "provenance": provenance}.items()}}
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_adapter(lm, path: str | Path) -> str:
    """Apply an adapter file to a loaded MemoryLM; returns its kind."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no adapter file at {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    kind = metadata.get("kind")
    tensors = load_file(str(path))
    if kind == "knn-gates":
        if not isinstance(lm.backend, MemorizingBackend):
            raise ValueError(f"{path} holds knn gates; load it with backend='knn'")
        with torch.no_grad():
            lm.backend.gate_bias.copy_(tensors["gate_bias"].to(lm.backend.gate_bias))
    elif kind == "fot-lora":
        lora = json.loads(metadata["lora"])
        if lora["layers"] != lm.config.layer_indices(lm.shape.num_layers):
            raise ValueError(f"{path} was trained for memory layers {lora['layers']}; set memory_layers to match")
        inject_adapter_in_model(lora_config(lora["layers"], lora["rank"], lora["alpha"]), lm.model)
        set_peft_model_state_dict(lm.model, {k: v.to(lm.model.dtype) for k, v in tensors.items()})
        lm.lora = lora
    else:
        raise ValueError(f"{path} is not a memlm adapter (kind {kind!r})")
    return kind
