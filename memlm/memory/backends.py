"""How a memory layer merges attention over its local window with attention over memory.

`fot` (Focused Transformer): retrieved keys join the local keys in one softmax. Given each
part's output and log-sum-exp, the joint softmax is exactly the two outputs weighted by
their shares of the total mass, so with every past key retrieved this *is* full attention.

`knn` (Memorizing Transformers): two separate softmaxes mixed by a learned per-head gate
g = sigmoid(b): out = g * memory + (1 - g) * local.

`xl` (Transformer-XL): no vector memory; the recurrent cache of the last `local_len` tokens
(the session's local window) is the memory.

`rmt` (Recurrent Memory Transformer): notes the model writes after each segment and reads
before the next (memlm/memory/recurrent.py); no vector memory either.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from memlm.config import MemoryConfig
from memlm.memory.attention import Attended, merge
from memlm.memory.recurrent import RecurrentMemoryTokens


class MemoryBackend(Protocol):
    name: str


class VectorMemoryBackend(MemoryBackend, Protocol):
    """fot and knn: memory layers read the vector store and merge what they read."""

    def combine(self, layer: int, local: Attended, memory: Attended) -> torch.Tensor:
        """Merge (Hkv, G, T, D) outputs of local and memory attention into one."""


class FocusedBackend:
    name = "fot"

    def combine(self, layer: int, local: Attended, memory: Attended) -> torch.Tensor:
        return merge(local, memory).out


class MemorizingBackend(nn.Module):
    name = "knn"

    def __init__(self, num_layers: int, num_heads: int, gate_init: float):
        super().__init__()
        # One gate bias per layer and query head; only memory layers' rows are ever used.
        self.gate_bias = nn.Parameter(torch.full((num_layers, num_heads), float(gate_init)))

    def combine(self, layer: int, local: Attended, memory: Attended) -> torch.Tensor:
        heads, group = local.out.shape[:2]
        gate = torch.sigmoid(self.gate_bias[layer]).view(heads, group, 1, 1)
        mixed = gate * memory.out.float() + (1.0 - gate) * local.out.float()
        return mixed.to(local.out.dtype)


class RecurrenceBackend:
    """Transformer-XL segment recurrence: the cached window is the whole memory, so there is
    never a retrieved part to merge (MemoryConfig turns memory layers off for it)."""

    name = "xl"


def make_backend(config: MemoryConfig, num_layers: int, num_heads: int, model) -> MemoryBackend:
    """`model`: the transformers model (rmt starts its memory from its embeddings)."""
    if config.backend == "fot":
        return FocusedBackend()
    if config.backend == "knn":
        return MemorizingBackend(num_layers, num_heads, config.gate_init)
    if config.backend == "xl":
        return RecurrenceBackend()
    if config.backend == "rmt":
        return RecurrentMemoryTokens.for_model(model, config.num_mem_tokens)
    raise ValueError(f"unknown backend {config.backend!r}; choose fot, knn, xl or rmt")
