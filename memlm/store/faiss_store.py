"""In-process store: exact inner-product FAISS indexes, persisted as append-only files.

Layout on disk (one folder per memory):

    <root>/<memory>/manifest.json        the commit point: which files, how much evicted
    <root>/<memory>/L003-000007.npz      blocks of layer 3 added in commit 7
    <root>/<memory>/state-000007.npz     the backend's state as of commit 7

Every file is written to a temporary name and renamed; the manifest is replaced last
(`os.replace` is atomic), so a crash at any point leaves the previous commit intact.
Files the manifest does not name are leftovers of an interrupted commit and are removed
on open.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from memlm.store.base import Blocks, MemoryNotFound, MemoryStats, SearchResult, check_memory_name

MANIFEST = "manifest.json"
# GPU FAISS (the `gpu` extra, faiss-gpu-cu12) when a GPU is there; exact search either way.
USE_GPU = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
_gpu_resources = faiss.StandardGpuResources() if USE_GPU else None


def flat_ip_index(dim: int) -> faiss.Index:
    if USE_GPU:
        return faiss.GpuIndexFlatIP(_gpu_resources, dim)
    return faiss.IndexFlatIP(dim)


class GrowableArray:
    """Rows appended along axis 0 with capacity doubling: amortised O(1) appends, one
    contiguous array to gather search results from."""

    def __init__(self, row_shape: tuple[int, ...], dtype: np.dtype):
        self._data = np.empty((16, *row_shape), dtype=dtype)
        self._len = 0

    def append(self, rows: np.ndarray) -> None:
        needed = self._len + len(rows)
        if needed > len(self._data):
            grown = np.empty((max(needed, 2 * len(self._data)), *self._data.shape[1:]), dtype=self._data.dtype)
            grown[: self._len] = self._data[: self._len]
            self._data = grown
        self._data[self._len : needed] = rows
        self._len = needed

    def drop_front(self, n: int) -> None:
        self._data = self._data[n : self._len].copy()
        self._len -= n

    def truncate(self, n: int) -> None:
        self._len = n

    @property
    def array(self) -> np.ndarray:
        return self._data[: self._len]

    def __len__(self) -> int:
        return self._len


@dataclass
class LayerBlocks:
    """One layer of one memory in RAM: the live blocks (oldest first) and one FAISS index per head."""

    search_keys: GrowableArray  # (N, H, D)
    keys: GrowableArray  # (N, H, B, D)
    values: GrowableArray  # (N, H, B, D)
    positions: GrowableArray  # (N, B)
    indexes: list[faiss.Index]
    evicted: int = 0  # blocks dropped from the front since the memory was created
    files: list[tuple[str, int]] = field(default_factory=list)  # committed files: (name, number of blocks)
    committed_blocks: int = 0  # live blocks at the last commit (for rollback)
    committed_evicted: int = 0
    # Blocks FIFO eviction dropped since the last commit, oldest first: a rollback puts them back.
    evicted_since_commit: list[tuple[np.ndarray, ...]] = field(default_factory=list)
    added_since_commit: int = 0

    @classmethod
    def empty(cls, heads: int, block_len: int, dim: int, dtype: np.dtype) -> LayerBlocks:
        return cls(
            search_keys=GrowableArray((heads, dim), np.float32),
            keys=GrowableArray((heads, block_len, dim), dtype),
            values=GrowableArray((heads, block_len, dim), dtype),
            positions=GrowableArray((block_len,), np.int64),
            indexes=[flat_ip_index(dim) for _ in range(heads)],
        )

    def append(self, search_keys: np.ndarray, keys: np.ndarray, values: np.ndarray, positions: np.ndarray) -> None:
        """Arrays block-major: search_keys (N, H, D), keys/values (N, H, B, D), positions (N, B)."""
        self.search_keys.append(search_keys)
        self.keys.append(keys)
        self.values.append(values)
        self.positions.append(positions)
        self.added_since_commit += len(keys)
        for head, index in enumerate(self.indexes):
            index.add(np.ascontiguousarray(search_keys[:, head], dtype=np.float32))

    def arrays(self) -> tuple[GrowableArray, ...]:
        return self.search_keys, self.keys, self.values, self.positions

    def drop_oldest(self, n: int) -> None:
        self.evicted_since_commit.append(tuple(a.array[:n].copy() for a in self.arrays()))
        for array in self.arrays():
            array.drop_front(n)
        self.evicted += n
        self.rebuild_indexes()

    def mark_committed(self) -> None:
        self.committed_blocks, self.committed_evicted = len(self), self.evicted
        self.evicted_since_commit, self.added_since_commit = [], 0

    @property
    def new_live_blocks(self) -> int:
        """Blocks added since the last commit that eviction has not dropped again."""
        evicted_now = self.evicted - self.committed_evicted
        return self.added_since_commit - max(0, evicted_now - self.committed_blocks)

    def roll_back(self) -> None:
        """Back to the last commit: evicted blocks return to the front, newer ones go."""
        restored = [
            np.concatenate([dropped[i] for dropped in self.evicted_since_commit] + [array.array])
            for i, array in enumerate(self.arrays())
        ]
        for array, rows in zip(self.arrays(), restored):
            array.truncate(0)
            array.append(rows[: self.committed_blocks])
        self.evicted, self.evicted_since_commit, self.added_since_commit = self.committed_evicted, [], 0
        self.rebuild_indexes()

    def rebuild_indexes(self) -> None:
        for head, index in enumerate(self.indexes):
            index.reset()
            if len(self.search_keys):
                index.add(np.ascontiguousarray(self.search_keys.array[:, head]))

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class Memory:
    layers: dict[int, LayerBlocks] = field(default_factory=dict)
    state: dict[str, np.ndarray] = field(default_factory=dict)
    committed_state: dict[str, np.ndarray] = field(default_factory=dict)
    state_file: str | None = None
    commit_id: int = 0
    dirty: bool = False


class FaissStore:
    """`VectorStore` on FAISS `IndexFlatIP` (exact search), one index per memory, layer and
    key/value head, persisted under `root` (None: in RAM only, for tests and benchmarks)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else None
        self._memories: dict[str, Memory] = {}
        self._lock = threading.RLock()
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            for manifest in sorted(self.root.glob(f"*/{MANIFEST}")):
                self._memories[manifest.parent.name] = self._open(manifest.parent)

    # -- writes ---------------------------------------------------------------------------

    def add(self, memory: str, layer: int, blocks: Blocks) -> None:
        check_memory_name(memory)
        if not np.all(np.isfinite(blocks.search_keys)):
            raise ValueError("search keys contain NaN or Inf")
        heads, _, block_len, dim = blocks.keys.shape
        with self._lock:
            # Check before creating anything: a rejected add must leave the store as it was.
            mem = self._memories.get(memory)
            stored = mem.layers.get(layer) if mem is not None else None
            if stored is not None and (heads, block_len, dim) != stored.keys.array.shape[1:]:
                expected = stored.keys.array.shape[1:]
                raise ValueError(f"layer {layer} holds blocks of shape {expected}, got {(heads, block_len, dim)}")
            if mem is None:
                mem = self._memories[memory] = Memory(dirty=True)
            if stored is None:
                stored = mem.layers[layer] = LayerBlocks.empty(heads, block_len, dim, blocks.keys.dtype)
            stored.append(
                blocks.search_keys.transpose(1, 0, 2),
                blocks.keys.transpose(1, 0, 2, 3).astype(stored.keys.array.dtype, copy=False),
                blocks.values.transpose(1, 0, 2, 3).astype(stored.keys.array.dtype, copy=False),
                blocks.positions,
            )
            mem.dirty = True

    def evict_oldest(self, memory: str, layer: int, keep_blocks: int) -> int:
        with self._lock:
            stored = self._get(memory).layers.get(layer)
            if stored is None or len(stored) <= keep_blocks:
                return 0
            drop = len(stored) - keep_blocks
            stored.drop_oldest(drop)
            self._memories[memory].dirty = True
            return drop

    def save_state(self, memory: str, state: dict[str, np.ndarray]) -> None:
        check_memory_name(memory)
        with self._lock:
            mem = self._memories.setdefault(memory, Memory(dirty=True))
            mem.state = {name: np.asarray(array) for name, array in state.items()}
            mem.dirty = True

    def commit(self, memory: str) -> None:
        with self._lock:
            mem = self._get(memory)
            if not mem.dirty:
                return
            if self.root is not None:
                self._write_commit(memory, mem)
            mem.commit_id += 1
            for stored in mem.layers.values():
                stored.mark_committed()
            mem.committed_state = mem.state  # the same object: `state is not committed_state` = saved since
            mem.dirty = False

    def rollback(self, memory: str) -> None:
        with self._lock:
            mem = self._memories.get(memory)
            if mem is None or not mem.dirty:
                return
            if mem.commit_id == 0:
                del self._memories[memory]  # never committed: it never existed
                return
            for layer, stored in list(mem.layers.items()):
                stored.roll_back()
                if stored.committed_blocks == 0 and stored.committed_evicted == 0:
                    del mem.layers[layer]
            mem.state = mem.committed_state
            mem.dirty = False

    def delete(self, memory: str) -> None:
        with self._lock:
            self._get(memory)
            del self._memories[memory]
            if self.root is not None:
                # Remove the manifest first: a crash mid-delete then leaves no half memory.
                (self.root / memory / MANIFEST).unlink(missing_ok=True)
                shutil.rmtree(self.root / memory, ignore_errors=True)

    # -- reads ----------------------------------------------------------------------------

    def search(
        self, memory: str, layer: int, queries: np.ndarray, top_k: int, skip_oldest: int = 0
    ) -> SearchResult:
        """`skip_oldest` leaves the oldest blocks out (what a client that evicted them in an
        uncommitted transaction must no longer see; see memlm/store/buffered.py)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if queries.ndim != 3:
            raise ValueError(f"queries must be (heads, queries, head_dim), got shape {queries.shape}")
        if not np.all(np.isfinite(queries)):
            raise ValueError("queries contain NaN or Inf")
        heads, num_queries, dim = queries.shape
        with self._lock:
            stored = self._get(memory).layers.get(layer)
            if stored is None or len(stored) <= skip_oldest:
                return _empty_result(heads, num_queries, dim)
            if (heads, dim) != (len(stored.indexes), stored.keys.array.shape[-1]):
                expected = (len(stored.indexes), stored.keys.array.shape[-1])
                raise ValueError(f"layer {layer} holds (heads, head_dim) = {expected}, queries have {(heads, dim)}")
            k = min(top_k, len(stored) - skip_oldest)
            selector = faiss.IDSelectorRange(skip_oldest, len(stored)) if skip_oldest else None
            scores = np.empty((heads, num_queries, k), np.float32)
            ids = np.empty((heads, num_queries, k), np.int64)
            for head, index in enumerate(stored.indexes):
                query = np.ascontiguousarray(queries[head], dtype=np.float32)
                if selector is not None and USE_GPU:
                    # GPU indexes ignore IDSelector (faiss#3114, #3924): brute force over the kept blocks.
                    kept = np.ascontiguousarray(stored.search_keys.array[skip_oldest:, head])
                    scores[head], ids[head] = faiss.knn(query, kept, k, metric=faiss.METRIC_INNER_PRODUCT)
                    ids[head] += skip_oldest
                else:
                    params = faiss.SearchParameters(sel=selector) if selector is not None else None
                    scores[head], ids[head] = index.search(query, k, params=params)
            head_index = np.arange(heads)[:, None, None]
            return SearchResult(
                keys=stored.keys.array[ids, head_index],  # (H, Q, k, B, D)
                values=stored.values.array[ids, head_index],
                positions=stored.positions.array[ids],  # (H, Q, k, B)
                scores=scores,
            )

    def blocks_at(self, memory: str, layer: int, starts: np.ndarray, skip_oldest: int = 0) -> Blocks:
        """`skip_oldest` leaves the oldest blocks out, as in `search`."""
        with self._lock:
            stored = self._get(memory).layers.get(layer)
            if stored is None:
                return Blocks.none()
            chosen = skip_oldest + np.flatnonzero(np.isin(stored.positions.array[skip_oldest:, 0], starts))
            return Blocks(
                search_keys=stored.search_keys.array[chosen].transpose(1, 0, 2),
                keys=stored.keys.array[chosen].transpose(1, 0, 2, 3),
                values=stored.values.array[chosen].transpose(1, 0, 2, 3),
                positions=stored.positions.array[chosen],
            )

    def load_state(self, memory: str) -> dict[str, np.ndarray]:
        with self._lock:
            return dict(self._get(memory).state)

    def memories(self) -> list[str]:
        with self._lock:
            return sorted(name for name, mem in self._memories.items() if mem.commit_id > 0)

    def stats(self, memory: str) -> MemoryStats:
        with self._lock:
            mem = self._get(memory)
            stats = MemoryStats(memory=memory)
            for layer, stored in sorted(mem.layers.items()):
                stats.blocks_per_layer[layer] = len(stored)
                if layer >= 0:  # an attention layer (see MemoryStats)
                    stats.tokens = max(stats.tokens, stored.positions.array.size)
                stats.bytes += sum(
                    a.array.nbytes for a in (stored.search_keys, stored.keys, stored.values, stored.positions)
                )
            return stats

    # -- persistence ----------------------------------------------------------------------

    def _get(self, memory: str) -> Memory:
        mem = self._memories.get(memory)
        if mem is None:
            raise MemoryNotFound(memory, self.memories())
        return mem

    def _write_commit(self, memory: str, mem: Memory) -> None:
        assert self.root is not None
        folder = self.root / memory
        folder.mkdir(parents=True, exist_ok=True)
        commit_id = mem.commit_id + 1
        manifest: dict = {"commit": commit_id, "layers": {}, "state": mem.state_file}
        for layer, stored in sorted(mem.layers.items()):
            new_blocks = stored.new_live_blocks
            # Blocks in committed files that FIFO eviction has dropped; whole files go.
            files = list(stored.files)
            dead = sum(n for _, n in files) - (len(stored) - new_blocks)
            while files and files[0][1] <= dead:
                dead -= files.pop(0)[1]
            if new_blocks > 0:
                name = f"L{layer:03d}-{commit_id:06d}.npz"
                new = slice(len(stored) - new_blocks, len(stored))
                _atomic_savez(
                    folder / name,
                    search_keys=stored.search_keys.array[new],
                    keys=stored.keys.array[new],
                    values=stored.values.array[new],
                    positions=stored.positions.array[new],
                )
                files.append((name, new_blocks))
            stored.files = files
            manifest["layers"][str(layer)] = {"files": files, "skip": dead, "evicted": stored.evicted}
        if mem.state is not mem.committed_state:
            mem.state_file = manifest["state"] = f"state-{commit_id:06d}.npz" if mem.state else None
            if mem.state_file:
                _atomic_savez(folder / mem.state_file, **mem.state)
        _atomic_write(folder / MANIFEST, json.dumps(manifest).encode())
        _remove_unreferenced(folder, manifest)

    def _open(self, folder: Path) -> Memory:
        manifest = json.loads((folder / MANIFEST).read_text())
        _remove_unreferenced(folder, manifest)
        mem = Memory(commit_id=manifest["commit"], state_file=manifest["state"])
        for layer, entry in manifest["layers"].items():
            parts = [np.load(folder / name) for name, _ in entry["files"]]
            if not parts:
                continue
            arrays = {key: np.concatenate([p[key] for p in parts])[entry["skip"] :] for key in parts[0].files}
            _, heads, block_len, dim = arrays["keys"].shape
            stored = LayerBlocks.empty(heads, block_len, dim, arrays["keys"].dtype)
            stored.append(arrays["search_keys"], arrays["keys"], arrays["values"], arrays["positions"])
            stored.files = [tuple(f) for f in entry["files"]]
            stored.evicted = stored.committed_evicted = entry["evicted"]
            stored.mark_committed()
            mem.layers[int(layer)] = stored
        if mem.state_file:
            with np.load(folder / mem.state_file) as saved:
                mem.state = {key: saved[key] for key in saved.files}
        mem.committed_state = mem.state
        return mem


def _empty_result(heads: int, num_queries: int, dim: int) -> SearchResult:
    return SearchResult(
        keys=np.zeros((heads, num_queries, 0, 1, dim), np.float32),
        values=np.zeros((heads, num_queries, 0, 1, dim), np.float32),
        positions=np.zeros((heads, num_queries, 0, 1), np.int64),
        scores=np.zeros((heads, num_queries, 0), np.float32),
    )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_unreferenced(folder: Path, manifest: dict) -> None:
    keep = {MANIFEST, manifest.get("state")} | {
        name for entry in manifest["layers"].values() for name, _ in entry["files"]
    }
    for path in folder.iterdir():
        if path.name not in keep:
            path.unlink(missing_ok=True)
