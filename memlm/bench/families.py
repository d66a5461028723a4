"""The families of generated documents the benchmarks ask about (`memlm/tasks.py`), and the
seeds and depths that place their facts: the same documents for every configuration, never
one that training saw."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

from memlm.tasks import Task, babilong, handbook, kv_lines, multi_needle, passkey, prose_needles
from memlm.train.data import TRAIN_SEED_BASE


@dataclass(frozen=True)
class Family:
    """One kind of generated document and the questions asked about it."""

    build: Callable[[int, list[float], int], list[Task]]  # (tokens, depths, seed) -> tasks on one document
    questions: int  # depths (facts) per document
    kinds: tuple[str, ...]  # the task kinds its questions have


FAMILIES: dict[str, Family] = {
    "prose-needles": Family(prose_needles, 6, ("prose-passkey", "prose-fact")),
    "passkey": Family(lambda n, depths, seed: [passkey(n, depths[0], seed)], 1, ("passkey",)),
    "kv-lines": Family(kv_lines, 4, ("kv-lines",)),
    "multi-needle": Family(multi_needle, 4, ("multi-needle-one", "multi-needle-all")),
    "babilong": Family(babilong, 4, ("babilong-1fact", "babilong-2fact")),
    "docqa": Family(lambda n, depths, seed: handbook(n, seed, depths=depths)[1], 4, ("docqa",)),
}

Document = tuple[str, int, int, list[Task]]  # (family, length, seed, the tasks on one document)


def document_seed(seed: int, family: str, length: int, document: int) -> int:
    """The same documents for every configuration, different ones per family, length and index;
    below TRAIN_SEED_BASE, where training seeds start, so evaluation never sees training data."""
    return (seed * 1_000_003 + zlib.crc32(f"{family}:{length}:{document}".encode())) % TRAIN_SEED_BASE


def document_depths(document: int, documents: int, questions: int) -> list[float]:
    """Depths of one document's facts: all documents' facts together cover 0..1 evenly,
    and each document spans the range."""
    total = documents * questions
    return [(j * documents + document + 0.5) / total for j in range(questions)]
