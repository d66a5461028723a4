"""Transactions buffered in RAM in front of a store whose committed blocks live elsewhere.

`RemoteStore` (committed blocks on a server) and `LanceStore` (in a Lance table) share one
way of honouring the `VectorStore` transaction contract:

- `add` keeps blocks in RAM (a copy: callers may reuse their arrays); they go into a
  private in-RAM `FaissStore` (the *pending* store) when something first reads them, so
  a transaction nobody searches costs one copy. Nothing is durable before `commit`.
- `search` searches the committed blocks and the pending ones and merges the two top-k
  lists by score: exactly the top-k of their union.
- `evict_oldest` evicts from the committed blocks first (they are older) by *hiding* them:
  the committed search skips the oldest `hidden` blocks of the layer. Blocks added and
  evicted again in the same transaction are dropped from the pending store for good.
- `commit` hands everything to `_write` as one `Changes` (the live new blocks of each
  layer, how many committed blocks to drop, the final block count, the state), which the
  subclass makes durable atomically. `rollback` throws the buffer away.

A subclass implements the `_committed_*` reads, `_write`, `_delete_committed` and
`memories`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from memlm.store.base import Blocks, MemoryNotFound, MemoryStats, SearchResult, check_memory_name
from memlm.store.faiss_store import FaissStore, _empty_result


@dataclass
class LayerChange:
    """One layer's part of an open transaction."""

    committed: int | None = None  # committed blocks of the layer, read at the first eviction
    hidden: int = 0  # oldest committed blocks evicted in this transaction
    evicted_new: int = 0  # blocks added and evicted again in this transaction


@dataclass
class Transaction:
    layers: dict[int, LayerChange] = field(default_factory=dict)
    state: dict[str, np.ndarray] | None = None  # None: not saved in this transaction
    deferred: dict[int, list[Blocks]] = field(default_factory=dict)  # added, not yet in the pending store


@dataclass
class LayerWrite:
    """What a commit does to one layer, in this order: drop the oldest `drop_committed`
    committed blocks, then append `blocks` (None: nothing new)."""

    drop_committed: int
    skipped_new: int  # blocks added then evicted in the transaction, before `blocks`
    blocks: Blocks | None
    keep_blocks: int | None  # blocks the layer holds afterwards, when the transaction evicted


@dataclass
class Changes:
    memory: str
    layers: dict[int, LayerWrite]
    state: dict[str, np.ndarray] | None


def merge_results(first: SearchResult | None, second: SearchResult | None, top_k: int) -> SearchResult | None:
    """Top-k of the union of two search results over disjoint blocks. Ties keep `first`'s
    blocks first, so committed (older) blocks win ties as they do in one FAISS index."""
    if second is None or second.k == 0:
        return first if first is not None else second
    if first is None or first.k == 0:
        return second
    scores = np.concatenate([first.scores, second.scores], axis=2)  # (H, Q, k1 + k2)
    order = np.argsort(-scores, axis=2, kind="stable")[:, :, :top_k]

    def pick(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        both = np.concatenate([a, b.astype(a.dtype, copy=False)], axis=2)
        index = order.reshape(order.shape + (1,) * (both.ndim - 3))
        return np.take_along_axis(both, index, axis=2)

    return SearchResult(
        keys=pick(first.keys, second.keys),
        values=pick(first.values, second.values),
        positions=pick(first.positions, second.positions),
        scores=np.take_along_axis(scores, order, axis=2),
    )


class BufferedStore(ABC):
    """A `VectorStore` whose open transactions are kept in this process until commit.
    Thread-safe; one lock per memory, so work on different memories runs in parallel."""

    def __init__(self) -> None:
        self._pending = FaissStore(None)
        self._transactions: dict[str, Transaction] = {}
        self._locks: defaultdict[str, threading.RLock] = defaultdict(threading.RLock)
        self._locks_guard = threading.Lock()

    # -- what a subclass provides ------------------------------------------------------

    @abstractmethod
    def _committed_search(
        self, memory: str, layer: int, queries: np.ndarray, top_k: int, skip_oldest: int
    ) -> SearchResult:
        """Search the committed blocks, leaving out the oldest `skip_oldest`. Raises MemoryNotFound."""

    @abstractmethod
    def _committed_blocks_at(self, memory: str, layer: int, starts: np.ndarray, skip_oldest: int) -> Blocks:
        """The committed blocks starting at `starts`, leaving out the oldest `skip_oldest`. Raises MemoryNotFound."""

    @abstractmethod
    def _committed_blocks(self, memory: str, layer: int) -> int:
        """Committed blocks of a layer (0 for a layer never written). Raises MemoryNotFound."""

    @abstractmethod
    def _committed_state(self, memory: str) -> dict[str, np.ndarray]:
        """Raises MemoryNotFound."""

    @abstractmethod
    def _committed_stats(self, memory: str) -> MemoryStats:
        """Raises MemoryNotFound."""

    @abstractmethod
    def _write(self, changes: Changes) -> None:
        """Make `changes` durable in one atomic step (all of it or none of it)."""

    @abstractmethod
    def _delete_committed(self, memory: str) -> None:
        """Raises MemoryNotFound."""

    @abstractmethod
    def memories(self) -> list[str]:
        """Names of the committed memories, sorted."""

    def _check_blocks(self, memory: str, layer: int, blocks: Blocks) -> None:
        """Reject blocks that do not fit the committed layer (where that is cheap to know)."""

    def _added(self, memory: str, layer: int, blocks: Blocks) -> None:
        """Blocks were just buffered (RemoteStore starts sending them to the server)."""

    def _discarded(self, memory: str) -> None:
        """An open transaction was thrown away (rollback or delete)."""

    # -- writes ---------------------------------------------------------------------------

    def _memory_lock(self, memory: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks[memory]

    def add(self, memory: str, layer: int, blocks: Blocks) -> None:
        check_memory_name(memory)
        if blocks.num_blocks == 0:
            return
        if not np.isfinite(blocks.search_keys).all():
            raise ValueError("search keys contain NaN or Inf")
        with self._memory_lock(memory):
            self._check_blocks(memory, layer, blocks)
            txn = self._transactions.get(memory) or Transaction()
            heads, _, block_len, dim = blocks.keys.shape
            expected = self._pending_shape(memory, layer, txn)
            if expected is not None and expected != (heads, block_len, dim):
                raise ValueError(f"layer {layer} holds blocks of shape {expected}, got {(heads, block_len, dim)}")
            copy = Blocks(
                np.array(blocks.search_keys, np.float32),
                np.array(blocks.keys),
                np.array(blocks.values),
                np.array(blocks.positions, np.int64),
            )
            txn.deferred.setdefault(layer, []).append(copy)
            txn.layers.setdefault(layer, LayerChange())
            self._transactions[memory] = txn
            self._added(memory, layer, copy)

    def evict_oldest(self, memory: str, layer: int, keep_blocks: int) -> int:
        if keep_blocks < 0:
            raise ValueError(f"keep_blocks must be >= 0, got {keep_blocks}")
        with self._memory_lock(memory):
            txn = self._transactions.get(memory)
            change = txn.layers.get(layer, LayerChange()) if txn is not None else LayerChange()
            if change.committed is None:
                try:
                    change.committed = self._committed_blocks(memory, layer)
                except MemoryNotFound:
                    if txn is None:
                        raise
                    change.committed = 0  # a memory this transaction creates
                if txn is not None:  # remember it: a remote store pays a round trip for it
                    txn.layers[layer] = change
            live_committed = change.committed - change.hidden
            pending = self._pending_blocks(memory, layer)
            drop = live_committed + pending - keep_blocks
            if drop <= 0:
                return 0
            from_committed = min(drop, live_committed)
            change.hidden += from_committed
            if drop > from_committed:
                self._materialize(memory, layer)
                self._pending.evict_oldest(memory, layer, keep_blocks)
                change.evicted_new += drop - from_committed
            txn = self._transactions.setdefault(memory, Transaction())
            txn.layers[layer] = change
            return drop

    def save_state(self, memory: str, state: dict[str, np.ndarray]) -> None:
        check_memory_name(memory)
        with self._memory_lock(memory):
            txn = self._transactions.setdefault(memory, Transaction())
            txn.state = {name: np.array(array) for name, array in state.items()}

    def commit(self, memory: str) -> None:
        with self._memory_lock(memory):
            txn = self._transactions.get(memory)
            if txn is None:
                self._committed_stats(memory)  # nothing to do, but an unknown memory is an error
                return
            layers = {}
            for layer, change in txn.layers.items():
                blocks = self._pending_layer(memory, layer)
                evicted = change.hidden > 0 or change.evicted_new > 0
                keep = (change.committed or 0) - change.hidden + (blocks.num_blocks if blocks else 0)
                layers[layer] = LayerWrite(change.hidden, change.evicted_new, blocks, keep if evicted else None)
            self._write(Changes(memory, layers, txn.state))  # raises: the transaction stays open
            self._pending.rollback(memory)
            del self._transactions[memory]

    def rollback(self, memory: str) -> None:
        with self._memory_lock(memory):
            self._discard(memory)

    def delete(self, memory: str) -> None:
        with self._memory_lock(memory):
            had_transaction = self._discard(memory)
            try:
                self._delete_committed(memory)
            except MemoryNotFound:
                if not had_transaction:
                    raise

    def _discard(self, memory: str) -> bool:
        self._pending.rollback(memory)  # never committed there, so this forgets it
        self._discarded(memory)
        return self._transactions.pop(memory, None) is not None

    # -- reads ----------------------------------------------------------------------------

    def search(
        self, memory: str, layer: int, queries: np.ndarray, top_k: int, skip_oldest: int = 0
    ) -> SearchResult:
        """`skip_oldest` leaves the oldest blocks out, as in `FaissStore.search`."""
        if memory not in self._transactions:  # the common case: read-only, no lock needed
            return self._committed_search(memory, layer, queries, top_k, skip_oldest)
        with self._memory_lock(memory):
            txn = self._transactions.get(memory)
            if txn is None:  # committed meanwhile by another thread
                return self._committed_search(memory, layer, queries, top_k, skip_oldest)
            change = txn.layers.get(layer, LayerChange())
            skip = change.hidden + skip_oldest
            try:
                committed = self._committed_search(memory, layer, queries, top_k, skip)
                skip_pending = max(0, skip - self._committed_blocks(memory, layer)) if skip_oldest else 0
            except MemoryNotFound:
                committed, skip_pending = None, skip_oldest  # created by this transaction
            pending = None
            if self._pending_blocks(memory, layer) > skip_pending:
                self._materialize(memory, layer)
                pending = self._pending.search(memory, layer, queries, top_k, skip_oldest=skip_pending)
            merged = merge_results(committed, pending, top_k)
            return merged if merged is not None else _empty_result(*queries.shape)

    def blocks_at(self, memory: str, layer: int, starts: np.ndarray, skip_oldest: int = 0) -> Blocks:
        """The committed blocks (less those an open transaction evicted), then the pending
        ones; `skip_oldest` as in `search`."""
        if memory not in self._transactions:
            return self._committed_blocks_at(memory, layer, starts, skip_oldest)
        with self._memory_lock(memory):
            txn = self._transactions.get(memory)
            if txn is None:
                return self._committed_blocks_at(memory, layer, starts, skip_oldest)
            skip = txn.layers.get(layer, LayerChange()).hidden + skip_oldest
            try:
                committed = self._committed_blocks_at(memory, layer, starts, skip)
                skip_pending = max(0, skip - self._committed_blocks(memory, layer)) if skip_oldest else 0
            except MemoryNotFound:
                committed, skip_pending = Blocks.none(), skip_oldest  # created by this transaction
            pending = Blocks.none()
            if self._pending_blocks(memory, layer) > skip_pending:
                self._materialize(memory, layer)
                pending = self._pending.blocks_at(memory, layer, starts, skip_oldest=skip_pending)
            return Blocks.join([committed, pending])

    def load_state(self, memory: str) -> dict[str, np.ndarray]:
        with self._memory_lock(memory):
            txn = self._transactions.get(memory)
            if txn is not None and txn.state is not None:
                return dict(txn.state)
            try:
                return self._committed_state(memory)
            except MemoryNotFound:
                if txn is None:
                    raise
                return {}

    def stats(self, memory: str) -> MemoryStats:
        """Exact block counts. Mid-transaction, `tokens` and `bytes` assume every layer has
        the same block length and bytes per block (true for memories a model writes)."""
        with self._memory_lock(memory):
            txn = self._transactions.get(memory)
            if txn is None:
                return self._committed_stats(memory)
            try:
                committed = self._committed_stats(memory)
            except MemoryNotFound:
                committed = MemoryStats(memory)
            self._materialize(memory)
            pending = self._pending.stats(memory) if memory in self._pending._memories else MemoryStats(memory)
            stats = MemoryStats(memory)
            hidden_total = 0
            for layer in sorted(set(committed.blocks_per_layer) | set(pending.blocks_per_layer)):
                hidden = txn.layers[layer].hidden if layer in txn.layers else 0
                hidden_total += hidden
                stats.blocks_per_layer[layer] = (
                    committed.blocks_per_layer.get(layer, 0) - hidden + pending.blocks_per_layer.get(layer, 0)
                )
            attention = [n for layer, n in stats.blocks_per_layer.items() if layer >= 0]  # see MemoryStats
            for source in (pending, committed):  # tokens = blocks * block_len of its biggest layer
                most = max((n for layer, n in source.blocks_per_layer.items() if layer >= 0), default=0)
                if most:
                    stats.tokens = max(attention) * (source.tokens // most)
                    break
            committed_total = sum(committed.blocks_per_layer.values())
            kept = (committed_total - hidden_total) / committed_total if committed_total else 0.0
            stats.bytes = round(committed.bytes * kept) + pending.bytes
            return stats

    # -- the pending store ------------------------------------------------------------------
    # Read in place (same package): FaissStore keeps a layer block-major, (N, H, ...).

    def _materialize(self, memory: str, layer: int | None = None) -> None:
        """Move deferred blocks (of one layer, or all) into the pending store."""
        txn = self._transactions.get(memory)
        if txn is None:
            return
        for key in [layer] if layer is not None else list(txn.deferred):
            for blocks in txn.deferred.pop(key, []):
                self._pending.add(memory, key, blocks)

    def _stored(self, memory: str, layer: int):
        mem = self._pending._memories.get(memory)
        return mem.layers.get(layer) if mem is not None else None

    def _pending_shape(self, memory: str, layer: int, txn: Transaction) -> tuple[int, int, int] | None:
        """(heads, block_len, head_dim) of the layer's uncommitted blocks, if any."""
        stored = self._stored(memory, layer)
        if stored is not None:
            return stored.keys.array.shape[1:]
        if not txn.deferred.get(layer):
            return None
        heads, _, block_len, dim = txn.deferred[layer][0].keys.shape
        return heads, block_len, dim

    def _pending_blocks(self, memory: str, layer: int) -> int:
        stored = self._stored(memory, layer)
        txn = self._transactions.get(memory)
        deferred = sum(b.num_blocks for b in txn.deferred.get(layer, [])) if txn else 0
        return (len(stored) if stored is not None else 0) + deferred

    def _pending_layer(self, memory: str, layer: int) -> Blocks | None:
        """The live uncommitted blocks of a layer, oldest first, in `add`'s layout."""
        txn = self._transactions[memory]
        deferred = txn.deferred.get(layer, [])
        if deferred and self._stored(memory, layer) is None:  # never read: join the adds, one copy
            dtype = deferred[0].keys.dtype
            return Blocks(
                search_keys=np.concatenate([b.search_keys for b in deferred], axis=1),
                keys=np.concatenate([b.keys.astype(dtype, copy=False) for b in deferred], axis=1),
                values=np.concatenate([b.values.astype(dtype, copy=False) for b in deferred], axis=1),
                positions=np.concatenate([b.positions for b in deferred]),
            )
        self._materialize(memory, layer)
        stored = self._stored(memory, layer)
        if stored is None or len(stored) == 0:
            return None
        return Blocks(
            search_keys=stored.search_keys.array.transpose(1, 0, 2),
            keys=stored.keys.array.transpose(1, 0, 2, 3),
            values=stored.values.array.transpose(1, 0, 2, 3),
            positions=stored.positions.array,
        )
