"""Writing adapters (the format and how they are applied: memlm/model/adapter.py): LoRA
injected for training, and the trained tensors saved with how they were made."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from memlm.model.adapter import lora_config


def add_lora(lm, rank: int = 8, alpha: float = 16.0, layers: list[int] | None = None) -> dict[str, torch.nn.Parameter]:
    """Inject LoRA into `layers` of `lm.model` (default: the memory layers); returns the
    trainable parameters."""
    layers = lm.config.layer_indices(lm.shape.num_layers) if layers is None else layers
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
        tensors = _lora_tensors(lm)
        extra = {"lora": lm.lora}
    elif kind == "rmt":
        lora = getattr(lm, "lora", None)
        own = {name: p.detach().float().cpu().contiguous() for name, p in lm.backend.named_parameters()}  # write_prompt
        tensors = {**own, **(_lora_tensors(lm) if lora else {})}
        extra = {"lora": lora, "rmt": {"num_mem_tokens": lm.config.num_mem_tokens, "segment_len": lm.config.segment_len}}
    else:
        raise ValueError(f"unknown adapter kind {kind!r}")
    metadata = {"kind": kind, "storage_key": json.dumps(lm.config.storage_key()), **{k: json.dumps(v) for k, v in {**extra, "provenance": provenance}.items()}}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _lora_tensors(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(lm.model).items()}
