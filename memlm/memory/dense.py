"""A memory's dense index: embeddings of its text in overlapping word windows, for questions
that paraphrase their evidence (the lexical read finds a fact only when the question repeats
its rare words).

The index lives in the memory's own vector store, as one more layer (`DENSE_LAYER`) beside
the attention layers: one head, one search key per window (its embedding), and the window's
token range [start, end) as the block's two positions. So it is written, committed, rolled
back, persisted and served by every store (FAISS files, LanceDB, the gRPC store) exactly as
the keys and values are. Its keys and values are empty placeholders (zeros, float16):
the search key is all a window needs.

Windows are `size` words, one every `stride` words, written while the ingest runs, as soon as
a window's last word is complete; the ingest's end writes the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memlm.memory.reading import Words
from memlm.model.embedder import Embedder
from memlm.store.base import Blocks, VectorStore

DENSE_LAYER = -1  # the store layer holding a memory's window embeddings


@dataclass(frozen=True)
class Window:
    start: int  # token positions [start, end) in the memory's document
    end: int
    score: float  # inner product with the question (cosine for a normalizing embedder)


def window_spans(pieces: Sequence[str], size: int, stride: int, final: bool) -> tuple[list[tuple[int, int]], int]:
    """Windows of `size` words every `stride` words over tokens whose texts are `pieces`, as
    token spans [start, end) counted from the first piece, and where the next window begins
    (a token index). Without `final`, only windows whose end is known (a word follows them);
    with it, every window until one reaches the end."""
    starts = Words.of(pieces).starts
    num_words = len(starts)
    spans = []
    for first in range(0, num_words, stride):
        last = first + size
        if last >= num_words:  # the window reaches the end: its end is known only at the last
            if final:
                spans.append((int(starts[first]), len(pieces)))
            break
        spans.append((int(starts[first]), int(starts[last])))
    if final:
        return spans, len(pieces)
    following = len(spans) * stride
    return spans, int(starts[following]) if spans else 0


def write_windows(
    store: VectorStore, memory: str, embedder: Embedder, pieces: Sequence[str], offset: int,
    size: int, stride: int, final: bool,
) -> int:  # fmt: skip
    """Embed and add the windows of the tokens from document position `offset` (their texts,
    `pieces`); returns the position the next call starts from."""
    spans, following = window_spans(pieces, size, stride, final)
    if spans:
        vectors = embedder.embed(["".join(pieces[a:b]) for a, b in spans])  # (N, D)
        n, dim = vectors.shape
        empty = np.zeros((1, n, 2, dim), dtype=np.float16)
        positions = np.array(spans, dtype=np.int64) + offset  # (N, 2): [start, end)
        store.add(memory, DENSE_LAYER, Blocks(vectors[None], empty, empty, positions))
    return offset + following


def search_windows(store: VectorStore, memory: str, query: np.ndarray, top_n: int) -> list[Window]:
    """The `top_n` windows nearest the query vector (dim,), best first; none when the memory
    has no dense index."""
    found = store.search(memory, DENSE_LAYER, query[None, None, :].astype(np.float32), top_n)
    if not found.k:
        return []
    spans, scores = found.positions[0, 0], found.scores[0, 0]  # (k, 2), (k,)
    return [Window(int(a), int(b), float(s)) for (a, b), s in zip(spans, scores)]


def window_block_scores(windows: Sequence[Window], block_len: int, grid: int, oldest: int) -> dict[int, float]:
    """The windows as a ranking of blocks (starts at `grid` + a multiple of `block_len`, or
    0 for the sinks): each block scores its best window's similarity. Windows that start
    before `oldest` (their blocks evicted) are left out."""
    def block_of(position: int) -> int:
        if position < grid:  # the sinks: blocks on a grid from 0, as the quote read's lexical scores
            return position // block_len * block_len
        return grid + (position - grid) // block_len * block_len

    scores: dict[int, float] = {}
    for window in windows:
        if grid <= window.start < oldest:
            continue
        position = window.start
        while position < window.end:
            start = block_of(position)
            scores[start] = max(scores.get(start, -np.inf), window.score)
            position = start + block_len if start >= grid else min(start + block_len, grid)
    return scores
