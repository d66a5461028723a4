"""Adapters: what training produces (`memlm train`, memlm/train/adapter.py writes them), a
small safetensors file next to the base model, never a copy of it. Three kinds:

- `knn-gates`: the Memorizing-Transformer gate biases (layers x heads floats);
- `fot-lora`: LoRA weights on the memory layers' attention projections (peft);
- `rmt`: the RMT write prompt, with LoRA weights on every layer's attention when trained
  with them.

`MemoryLM.load(adapter=PATH)` and `load_adapter(lm, PATH)` apply any of them; inference
needs nothing of the training code. `python -m memlm.model.adapter FILE` says how a file
was made.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, safe_open

from memlm.memory.backends import MemorizingBackend
from memlm.memory.recurrent import RecurrentMemoryTokens

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Adapters trained for the embedded model, shipped in the package (how each was made is in
# its metadata: `python -m memlm.model.adapter FILE`). A backend is listed only when its
# adapter beat the training-free backend in `memlm bench` (README, Results).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "adapters"
SHIPPED: dict[str, str] = {"rmt": "rmt.safetensors", "knn": "knn-gates.safetensors"}


def shipped_adapter(backend: str) -> Path | None:
    """The adapter shipped for `backend` on the embedded model, if there is one."""
    name = SHIPPED.get(backend)
    return SHIPPED_DIR / name if name and (SHIPPED_DIR / name).is_file() else None


def lora_config(layers: list[int], rank: int, alpha: float) -> LoraConfig:
    """LoRA on the attention projections of the given layers only."""
    pattern = rf"model\.layers\.({'|'.join(map(str, layers))})\.self_attn\.({'|'.join(PROJECTIONS)})"
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=pattern, bias="none")


def _apply_lora(lm, lora: dict, tensors: dict[str, torch.Tensor]) -> None:
    inject_adapter_in_model(lora_config(lora["layers"], lora["rank"], lora["alpha"]), lm.model)
    set_peft_model_state_dict(lm.model, {k: v.to(lm.model.dtype) for k, v in tensors.items()})
    lm.lora = lora


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
        _apply_lora(lm, lora, tensors)
    elif kind == "rmt":
        if not isinstance(lm.backend, RecurrentMemoryTokens):
            raise ValueError(f"{path} holds an RMT write prompt; load it with backend='rmt'")
        trained = json.loads(metadata["rmt"])
        if trained["num_mem_tokens"] != lm.config.num_mem_tokens:
            raise ValueError(f"{path} was trained with num_mem_tokens={trained['num_mem_tokens']}; this model is set "
                             f"to {lm.config.num_mem_tokens}: set num_mem_tokens to match")  # fmt: skip
        with torch.no_grad():
            for name, p in lm.backend.named_parameters():
                p.copy_(tensors.pop(name))
        lora = json.loads(metadata["lora"])
        if lora:
            _apply_lora(lm, lora, tensors)
    else:
        raise ValueError(f"{path} is not a memlm adapter (kind {kind!r})")
    return kind


def describe(path: str | Path) -> str:
    """How an adapter file was made: its kind, command, seed, steps and last losses."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    made = json.loads(metadata.get("provenance", "{}"))
    losses = made.get("losses", [])
    last = sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan")
    return (f"{path}: {metadata.get('kind')}, made by `{made.get('command')}` (seed {made.get('seed')}), "
            f"{len(losses)} steps, {made.get('seconds', 0) / 60:.0f} min, mean loss of the last 10 steps {last:.3f}")  # fmt: skip


if __name__ == "__main__":
    import sys

    for argument in sys.argv[1:]:
        print(describe(argument))
