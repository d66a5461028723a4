"""The `Session` contract: one pass over one memory, an ingest (which writes) or a generation
(which only reads). Every backend's session keeps it (`MemorySession` for fot, knn and xl,
`RecurrentSession` for rmt, the Ray pipeline's `PipelineSession`); `MemoryLM` sees nothing
else of a session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

# Which logits a forward pass returns: none (ingest skips the LM head, a large share of a
# small model's work), the last token's (one row) or every token's.
Logits = Literal["none", "last", "all"]


@dataclass
class Retrieval:
    """What a memory layer read in the last forward pass (for explanations in the demo)."""

    positions: np.ndarray  # (Hkv, C, k, B)
    scores: np.ndarray  # (Hkv, C, k)


class Session(Protocol):
    """One pass over one memory, whatever the backend."""

    writes: bool  # an ingest (takes segments in, saved by `state` at commit) or a generation
    retrieved: dict[int, Retrieval]  # memory layer -> what the last forward pass read from the store
    # The store holds blocks this session can search (a vector memory with something in it).
    has_memory: bool

    @property
    def window_end(self) -> int:
        """The position the next token takes (after what is in view: sinks, memory, window)."""

    def forward(self, token_ids: list[int], logits: Logits) -> torch.Tensor | None:
        """Run tokens through the model and take them in; returns their logits, (1 or T, vocab),
        or None. Autograd as the caller has it (`MemoryLM.forward` runs without)."""

    def in_view(self) -> list[tuple[int, int]]:
        """Document token ranges [start, end) always in front of the model (sinks, local window)."""

    def state(self) -> dict[str, np.ndarray]:
        """What a later session, in this process or another, needs to continue from this one."""


def logits_of(model, hidden: torch.Tensor, logits: Logits) -> torch.Tensor | None:
    """The LM head over hidden states (T, hidden) or (1, T, hidden): (1 or T, vocab) in float32."""
    if logits == "none":
        return None
    hidden = hidden[0] if hidden.dim() == 3 else hidden
    return model.lm_head(hidden[-1:] if logits == "last" else hidden).float()
