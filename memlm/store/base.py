"""The `VectorStore` protocol: where a memory's attention keys and values live.

A memory (addressed by name) holds, per memory layer, a list of *blocks*. A block is
`block_len` consecutive tokens of one layer: their keys and values for every key/value
head, their token positions, and one search key per head (the block's mean key) that
top-k search matches against. `block_len == 1` is the per-token memory of Memorizing
Transformers; larger blocks are InfLLM-style block retrieval. Everything is numpy so that
stores need no torch and arrays travel over gRPC as raw bytes.

Writes are transactional per memory: `add` makes blocks searchable at once (later segments
of the same ingest read them), `commit` makes everything since the last commit durable in
one atomic step, `rollback` forgets it. A crash between the two leaves the memory exactly
as it was at the last commit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

MEMORY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class MemoryNotFound(KeyError):
    """The named memory does not exist in the store."""

    def __init__(self, memory: str, known: list[str]):
        self.memory, self.known = memory, known
        super().__init__(f"no memory named {memory!r}; known memories: {', '.join(known) or '(none)'}")

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return self.args[0]


def check_memory_name(memory: str) -> str:
    """Memory names become directory names and table filters: letters, digits, `_.-` only."""
    # fullmatch, not match: the pattern's "$" also matches before a final newline ("probe\n").
    if not isinstance(memory, str) or not MEMORY_NAME.fullmatch(memory) or ".." in memory:
        shown = memory if not isinstance(memory, str) or len(memory) <= 64 else memory[:64] + "..."
        raise ValueError(
            f"bad memory name {shown!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return memory


@dataclass
class Blocks:
    """New memory for one layer, grouped in blocks (what `VectorStore.add` takes)."""

    search_keys: np.ndarray  # (H, N, D) float32: one search key per head and block
    keys: np.ndarray  # (H, N, B, D) float16/float32: keys with no rotary embedding applied
    values: np.ndarray  # (H, N, B, D)
    positions: np.ndarray  # (N, B) int64: token positions in the memory's document

    def __post_init__(self) -> None:
        h, n, b, d = self.keys.shape
        if self.values.shape != (h, n, b, d):
            raise ValueError(f"values shape {self.values.shape} != keys shape {self.keys.shape}")
        if self.search_keys.shape != (h, n, d):
            raise ValueError(f"search_keys shape {self.search_keys.shape} != {(h, n, d)}")
        if self.positions.shape != (n, b):
            raise ValueError(f"positions shape {self.positions.shape} != {(n, b)}")

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[1]

    @classmethod
    def none(cls) -> Blocks:
        """No blocks (what `blocks_at` returns for a layer that holds none of them)."""
        return cls(np.zeros((0, 0, 0), np.float32), np.zeros((0, 0, 0, 0), np.float16),
                   np.zeros((0, 0, 0, 0), np.float16), np.zeros((0, 0), np.int64))  # fmt: skip

    def where(self, chosen: np.ndarray) -> Blocks:
        """The blocks at indices `chosen`, in that order."""
        return Blocks(self.search_keys[:, chosen], self.keys[:, chosen], self.values[:, chosen], self.positions[chosen])

    @staticmethod
    def join(parts: list[Blocks]) -> Blocks:
        """Blocks of one layer, concatenated in order (empty parts skipped)."""
        parts = [part for part in parts if part.num_blocks]
        if not parts:
            return Blocks.none()
        if len(parts) == 1:
            return parts[0]
        return Blocks(*(np.concatenate([getattr(p, name) for p in parts], axis=axis) for name, axis in
                        (("search_keys", 1), ("keys", 1), ("values", 1), ("positions", 0))))  # fmt: skip


@dataclass
class SearchResult:
    """Top-k blocks for each query (what `VectorStore.search` returns). k may be below the
    asked top_k when the memory holds fewer blocks; k == 0 for an empty layer."""

    keys: np.ndarray  # (H, Q, k, B, D)
    values: np.ndarray  # (H, Q, k, B, D)
    positions: np.ndarray  # (H, Q, k, B) int64
    scores: np.ndarray  # (H, Q, k) float32, inner product of query and search key

    @property
    def k(self) -> int:
        return self.scores.shape[2]


@dataclass
class MemoryStats:
    """Sizes of a memory. Layers with a negative number hold a memory's other indexes (the
    dense index of memlm/memory/dense.py): they count in `blocks_per_layer` and `bytes`, not
    in `tokens`, which the attention layers' blocks give."""

    memory: str
    blocks_per_layer: dict[int, int] = field(default_factory=dict)
    tokens: int = 0  # tokens per attention layer currently held (after FIFO eviction)
    bytes: int = 0  # keys + values + search keys + positions, all layers


@runtime_checkable
class VectorStore(Protocol):
    def add(self, memory: str, layer: int, blocks: Blocks) -> None:
        """Append blocks to a layer of a memory (created on first add). Searchable at once."""

    def blocks_at(self, memory: str, layer: int, starts: np.ndarray) -> Blocks:
        """The blocks of a layer whose first token position is in `starts` (int64), oldest
        first; blocks no longer held (FIFO-evicted) are left out. What the passage read
        fetches once the question's votes chose its passages."""
        ...

    def search(self, memory: str, layer: int, queries: np.ndarray, top_k: int) -> SearchResult:
        """queries (H, Q, D) float32: all queries of a segment for one layer, in one call."""

    def evict_oldest(self, memory: str, layer: int, keep_blocks: int) -> int:
        """FIFO: drop the oldest blocks so at most `keep_blocks` remain; returns how many were dropped."""

    def save_state(self, memory: str, state: dict[str, np.ndarray]) -> None:
        """Small per-memory arrays a backend needs besides the blocks (local window, tokens,
        recurrent state). Part of the same transaction as `add`."""

    def load_state(self, memory: str) -> dict[str, np.ndarray]:
        """The state as of the last commit (or as saved in this transaction). Raises MemoryNotFound."""

    def commit(self, memory: str) -> None:
        """Make every add/evict/save_state since the last commit durable, atomically."""

    def rollback(self, memory: str) -> None:
        """Forget every add/evict/save_state since the last commit."""

    def delete(self, memory: str) -> None:
        """Remove a memory and everything in it. Raises MemoryNotFound."""

    def memories(self) -> list[str]:
        """Names of the committed memories, sorted."""

    def stats(self, memory: str) -> MemoryStats:
        """Sizes of a memory. Raises MemoryNotFound."""
