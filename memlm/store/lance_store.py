"""`LanceStore`: memories on LanceDB, durable, under any URI LanceDB accepts.

Tables:

    blocks_d<D>   one row per (memory, layer, head, block), for all memories of head_dim D:
                  memory, layer, head, block (id, counting from the layer's first block
                  ever), commit, search_key (D float32, the vector column), keys, values
                  and positions (raw little-endian bytes of one block)
    commits       one row per memory, the commit marker: the memory's last commit id,
                  per layer its layout and live block ids [first, next), and its state

A commit first appends its rows to `blocks_d<D>` (tagged with the new commit id), then
upserts the memory's marker in `commits` (one Lance transaction, atomic). Readers only
see blocks the marker covers: `first <= block < next` and `commit <= marker`. So a crash
before the marker leaves invisible rows behind (deleted before the memory's next commit)
and never a partial commit; eviction is a marker change first and a row deletion after.
Uncommitted adds stay in RAM until commit (memlm/store/buffered.py).

Search: a FAISS cache (exact `IndexFlatIP`, the same code as `FaissStore`) holds the
committed blocks of recently used memories, up to `cache_bytes`, least recently used out
first; it is updated by every commit made through this object, which is the only writer
of the data directory (one writer per directory, as for FaissStore). A memory too big
for the cache is searched in Lance itself: prefiltered `dot` search per head, exact (flat)
while the table is small, through an IVF index past `index_min_rows` rows, with `nprobes`
chosen by measuring recall@32 against exact search on the table's own keys until it
reaches `target_recall`.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import faiss
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import IvfFlat, IvfPq

from memlm.store.base import Blocks, MemoryNotFound, MemoryStats, SearchResult
from memlm.store.buffered import BufferedStore, Changes
from memlm.store.faiss_store import FaissStore, _empty_result

log = logging.getLogger(__name__)

COMMITS = "commits"
# Lance runs a batch of queries side by side, and each query holds its own flat scan of the
# rows no index covers: queries per call are chosen to keep that under this many bytes.
LANCE_SCAN_BUDGET = 512 << 20
COMMITS_SCHEMA = pa.schema(
    [("memory", pa.string()), ("commit", pa.int64()), ("layers", pa.string()), ("state", pa.binary())]
)


def blocks_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("memory", pa.string()),
            ("layer", pa.int32()),
            ("head", pa.int32()),
            ("block", pa.int64()),
            ("commit", pa.int64()),
            ("search_key", pa.list_(pa.float32(), dim)),
            ("keys", pa.binary()),
            ("values", pa.binary()),
            ("positions", pa.binary()),
        ]
    )


@dataclass
class LanceConfig:
    uri: str
    cache_bytes: int = 4 << 30  # RAM for the FAISS cache; 0: every search goes to Lance
    index_min_rows: int = 100_000  # rows of a blocks table past which it gets an IVF index
    index_type: str = "IVF_FLAT"  # or "IVF_PQ" (smaller and coarser: refined by exact rescoring)
    # Rebuild the index once rows it does not cover (Lance scans those flat) reach this
    # fraction of the rows it covers: rebuilds stay O(log N) as a memory grows.
    unindexed_fraction: float = 0.25
    refine_factor: int = 10  # IVF_PQ: rescore refine_factor * top_k candidates exactly
    target_recall: float = 0.95  # recall@32 vs exact that the chosen nprobes must reach
    nprobes: int | None = None  # a fixed nprobes instead of the measured one (benchmarks)
    calibration_queries: int = 128
    optimize_every: int = 50  # commits between compactions of the small fragments commits leave


@dataclass
class LayerInfo:
    heads: int
    block_len: int
    head_dim: int
    dtype: str
    first: int = 0  # id of the oldest live block
    next: int = 0  # id the next block gets

    @property
    def live(self) -> int:
        return self.next - self.first

    @property
    def block_bytes(self) -> int:  # as FaissStore counts them: search keys, keys, values, positions
        itemsize = np.dtype(self.dtype).itemsize
        return self.heads * self.head_dim * (4 + 2 * self.block_len * itemsize) + self.block_len * 8


@dataclass
class Marker:
    commit: int
    layers: dict[int, LayerInfo] = field(default_factory=dict)
    state: bytes = b""  # npz

    def to_row(self, memory: str) -> dict:
        layers = json.dumps({str(layer): asdict(info) for layer, info in self.layers.items()})
        return {"memory": memory, "commit": self.commit, "layers": layers, "state": self.state}

    @classmethod
    def from_row(cls, row: dict) -> Marker:
        layers = {int(layer): LayerInfo(**info) for layer, info in json.loads(row["layers"]).items()}
        return cls(row["commit"], layers, row["state"])


class LanceStore(BufferedStore):
    def __init__(self, uri: str | LanceConfig, **options):
        super().__init__()
        self.config = uri if isinstance(uri, LanceConfig) else LanceConfig(uri=str(uri), **options)
        self._db = lancedb.connect(self.config.uri)
        self._lock = threading.RLock()  # the committed side: tables, markers, cache
        self._commits = self._db.create_table(COMMITS, schema=COMMITS_SCHEMA, exist_ok=True)
        self._markers = {row["memory"]: Marker.from_row(row) for row in self._commits.to_arrow().to_pylist()}
        self._tables: dict[int, lancedb.table.Table] = {}
        self._nprobes: dict[int, int] = {}  # per indexed table: measured to reach target_recall
        self._indexed_rows: dict[int, int] = {}
        self._building: set[int] = set()  # head dims whose index a background thread builds
        self._index_threads: list[threading.Thread] = []
        self._cleaned: set[str] = set()  # memories whose leftovers of crashed commits are gone
        self._cache = FaissStore(None)
        self._cache_lru: OrderedDict[str, int] = OrderedDict()  # memory -> bytes, oldest use first
        self._commits_since_optimize = 0

    def close(self) -> None:
        """Nothing to flush (every commit is durable): waits for index builds, drops the RAM cache."""
        self.wait_for_index()
        with self._lock:
            for memory in list(self._cache_lru):
                self._uncache(memory)

    # -- tables ---------------------------------------------------------------------------------

    def _table(self, dim: int) -> lancedb.table.Table:
        table = self._tables.get(dim)
        if table is None:
            table = self._tables[dim] = self._db.create_table(
                f"blocks_d{dim}", schema=blocks_schema(dim), exist_ok=True
            )
        return table

    def _marker(self, memory: str) -> Marker:
        marker = self._markers.get(memory)
        if marker is None:
            raise MemoryNotFound(memory, self.memories())
        return marker

    @staticmethod
    def _where(memory: str, marker: Marker, layer: int | None = None, head: int | None = None, skip: int = 0) -> str:
        """Rows of `memory` the marker covers (of one layer and head, if given)."""
        parts = [f"memory = '{memory}'", f"commit <= {marker.commit}"]  # names are [A-Za-z0-9_.-]: no quoting
        if layer is not None:
            info = marker.layers[layer]
            parts += [f"layer = {layer}", f"block >= {info.first + skip}", f"block < {info.next}"]
        if head is not None:
            parts.append(f"head = {head}")
        return " AND ".join(parts)

    # -- committed reads (BufferedStore) --------------------------------------------------------

    def memories(self) -> list[str]:
        with self._lock:
            return sorted(self._markers)

    def _committed_blocks(self, memory: str, layer: int) -> int:
        with self._lock:
            info = self._marker(memory).layers.get(layer)
            return info.live if info else 0

    def _committed_state(self, memory: str) -> dict[str, np.ndarray]:
        with self._lock:
            state = self._marker(memory).state
        if not state:
            return {}
        with np.load(io.BytesIO(state)) as saved:
            return {name: saved[name] for name in saved.files}

    def _committed_stats(self, memory: str) -> MemoryStats:
        with self._lock:
            stats = MemoryStats(memory)
            for layer, info in sorted(self._marker(memory).layers.items()):
                stats.blocks_per_layer[layer] = info.live
                if layer >= 0:  # an attention layer (see MemoryStats)
                    stats.tokens = max(stats.tokens, info.live * info.block_len)
                stats.bytes += info.live * info.block_bytes
            return stats

    def _check_blocks(self, memory: str, layer: int, blocks: Blocks) -> None:
        with self._lock:
            marker = self._markers.get(memory)
            info = marker.layers.get(layer) if marker else None
        heads, _, block_len, dim = blocks.keys.shape
        if info is not None and (heads, block_len, dim) != (info.heads, info.block_len, info.head_dim):
            expected = (info.heads, info.block_len, info.head_dim)
            raise ValueError(f"layer {layer} holds blocks of shape {expected}, got {(heads, block_len, dim)}")

    def _committed_search(
        self, memory: str, layer: int, queries: np.ndarray, top_k: int, skip_oldest: int
    ) -> SearchResult:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if queries.ndim != 3 or not np.isfinite(queries).all():
            raise ValueError(f"queries must be finite (heads, queries, head_dim), got shape {queries.shape}")
        with self._lock:
            marker = self._marker(memory)
            info = marker.layers.get(layer)
            if info is None or info.live <= skip_oldest:
                return _empty_result(*queries.shape)
            if (queries.shape[0], queries.shape[2]) != (info.heads, info.head_dim):
                expected, got = (info.heads, info.head_dim), queries.shape[::2]
                raise ValueError(f"layer {layer} holds (heads, head_dim) = {expected}, queries have {got}")
            if self._cached(memory, marker):
                return self._cache.search(memory, layer, queries, top_k, skip_oldest=skip_oldest)
            return self._lance_search(memory, marker, layer, queries, top_k, skip_oldest)

    def _committed_blocks_at(self, memory: str, layer: int, starts: np.ndarray, skip_oldest: int) -> Blocks:
        with self._lock:
            marker = self._marker(memory)
            info = marker.layers.get(layer)
            if info is None or info.live <= skip_oldest:
                return Blocks.none()
            if self._cached(memory, marker):
                return self._cache.blocks_at(memory, layer, starts, skip_oldest=skip_oldest)
            # Too large for the cache: read the layer's rows (a read of the layer's size).
            stored = self._read_layer(memory, marker, layer)
            chosen = skip_oldest + np.flatnonzero(np.isin(stored.positions[skip_oldest:, 0], starts))
            return stored.where(chosen)

    def _lance_search(
        self, memory: str, marker: Marker, layer: int, queries: np.ndarray, top_k: int, skip: int
    ) -> SearchResult:
        info = marker.layers[layer]
        heads, num_queries, dim = queries.shape
        k = min(top_k, info.live - skip)
        dtype = np.dtype(info.dtype).newbyteorder("<")
        keys = np.empty((heads, num_queries, k, info.block_len, dim), dtype)
        values = np.empty_like(keys)
        positions = np.empty((heads, num_queries, k, info.block_len), np.int64)
        scores = np.empty((heads, num_queries, k), np.float32)
        batch = self._query_batch(info.head_dim)
        for head in range(heads):
            for start in range(0, num_queries, batch):
                part = slice(start, start + batch)
                rows = self._lance_top_k(memory, marker, layer, head, skip, queries[head, part], k)
                n = len(queries[head, part])
                found_keys = _fixed_rows(rows["search_key"], np.float32, (n, k, dim))
                # Rescore exactly: Lance's dot distance is 1 - q.k in float32, which rounds away digits.
                scores[head, part] = np.einsum("qd,qkd->qk", queries[head, part].astype(np.float32), found_keys)
                keys[head, part] = _binary_rows(rows["keys"], dtype, (n, k, info.block_len, dim))
                values[head, part] = _binary_rows(rows["values"], dtype, (n, k, info.block_len, dim))
                positions[head, part] = _binary_rows(rows["positions"], np.dtype("<i8"), (n, k, info.block_len))
        # Lance orders by its rounded distance; restore the exact order.
        order = np.argsort(-scores, axis=2, kind="stable")
        take = lambda a: np.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 3)), axis=2)  # noqa: E731
        return SearchResult(take(keys), take(values), take(positions), take(scores))

    def _query_batch(self, dim: int, indexed: int | None = None) -> int:
        """Queries per Lance call (see LANCE_SCAN_BUDGET), given how many rows the index covers."""
        if indexed is None:
            self._index_nprobes(dim)  # learn of an index an earlier process built
            indexed = self._indexed_rows.get(dim) or 0
        unindexed = self._table(dim).count_rows() - indexed
        return int(np.clip(LANCE_SCAN_BUDGET // max(1, unindexed * dim * 4), 1, 256))

    def _lance_top_k(
        self, memory: str, marker: Marker, layer: int, head: int, skip: int, queries: np.ndarray, k: int
    ) -> pa.Table:
        """Rows of the top-k blocks of each query, query by query, best first."""
        dim = marker.layers[layer].head_dim
        query = (
            self._table(dim)
            .search(list(queries.astype(np.float32)), vector_column_name="search_key")
            .distance_type("dot")
            .where(self._where(memory, marker, layer, head, skip), prefilter=True)
            .limit(k)
            .select(["block", "search_key", "keys", "values", "positions", "_distance"])
        )
        nprobes = self._index_nprobes(dim)
        if nprobes is None and dim in self._building:
            query = query.bypass_vector_index()  # a new index, its nprobes not measured yet
        elif nprobes is not None:
            query = query.nprobes(nprobes)
            if self.config.index_type == "IVF_PQ":
                query = query.refine_factor(self.config.refine_factor)
        rows = query.to_arrow()
        if rows.num_rows != len(queries) * k:  # an ANN probe came back short: answer exactly
            rows = query.bypass_vector_index().to_arrow()
        if "query_index" not in rows.column_names:  # Lance leaves it out for a single query
            rows = rows.append_column("query_index", pa.array(np.zeros(rows.num_rows, np.int32)))
        return rows.sort_by([("query_index", "ascending"), ("_distance", "ascending")]).combine_chunks()

    # -- the FAISS cache ------------------------------------------------------------------------

    def _cached(self, memory: str, marker: Marker) -> bool:
        """Whether `memory` is (now) in the cache; loads it from Lance if it fits."""
        if memory in self._cache_lru:
            self._cache_lru.move_to_end(memory)
            return True
        size = sum(info.live * info.block_bytes for info in marker.layers.values())
        if size > self.config.cache_bytes:
            return False
        for layer, info in marker.layers.items():
            if info.live:
                self._cache.add(memory, layer, self._read_layer(memory, marker, layer))
        self._cache_lru[memory] = size
        self._shrink_cache()
        return memory in self._cache_lru

    def _read_layer(self, memory: str, marker: Marker, layer: int) -> Blocks:
        info = marker.layers[layer]
        rows = (
            self._table(info.head_dim)
            .search()
            .where(self._where(memory, marker, layer))
            .select(["block", "head", "search_key", "keys", "values", "positions"])
            .limit(info.live * info.heads)
            .to_arrow()
        )
        if rows.num_rows != info.live * info.heads:
            found = f"{rows.num_rows} rows on disk"
            raise RuntimeError(f"{memory!r} layer {layer}: {found}, the marker says {info.live} blocks")
        rows = rows.sort_by([("block", "ascending"), ("head", "ascending")]).combine_chunks()
        n, h, b, d = info.live, info.heads, info.block_len, info.head_dim
        dtype = np.dtype(info.dtype).newbyteorder("<")
        return Blocks(
            search_keys=_fixed_rows(rows["search_key"], np.float32, (n, h, d)).transpose(1, 0, 2),
            keys=_binary_rows(rows["keys"], dtype, (n, h, b, d)).transpose(1, 0, 2, 3),
            values=_binary_rows(rows["values"], dtype, (n, h, b, d)).transpose(1, 0, 2, 3),
            positions=_binary_rows(rows["positions"], np.dtype("<i8"), (n, h, b))[:, 0],
        )

    def _uncache(self, memory: str) -> None:
        if self._cache_lru.pop(memory, None) is not None:
            self._cache.delete(memory)

    def _shrink_cache(self) -> None:
        while self._cache_lru and sum(self._cache_lru.values()) > self.config.cache_bytes:
            self._uncache(next(iter(self._cache_lru)))

    # -- commits ----------------------------------------------------------------------------------

    def _write(self, changes: Changes) -> None:
        memory = changes.memory
        with self._lock:
            old = self._markers.get(memory)
            try:
                marker, dims = self._commit_to_disk(changes, old)
            except BaseException:
                self._cleaned.discard(memory)  # rows may have landed: clean them before the retry
                raise
            # Committed. What follows keeps RAM in step and tidies the disk; a failure there
            # must not make the caller retry a commit that happened.
            self._markers[memory] = marker
            try:
                self._update_cache(memory, old, marker, changes)
            except Exception:
                log.exception("dropping %r from the cache after a failed update", memory)
                self._uncache(memory)
            try:
                for layer, info in marker.layers.items():
                    if old and layer in old.layers and info.first > old.layers[layer].first:
                        where = f"memory = '{memory}' AND layer = {layer} AND block < {info.first}"
                        self._table(info.head_dim).delete(where)  # evicted: already invisible
                self._after_commit(dims)
            except Exception:
                log.exception("housekeeping after committing %r failed; the commit stands", memory)

    def _commit_to_disk(self, changes: Changes, old: Marker | None) -> tuple[Marker, list[int]]:
        """Write the rows, then the marker. Returns the new marker and the tables written."""
        memory = changes.memory
        if memory not in self._cleaned:
            self._delete_rows(f"memory = '{memory}'" + (f" AND commit > {old.commit}" if old else ""))
            self._cleaned.add(memory)
        marker = Marker(old.commit + 1 if old else 1, {}, old.state if old else b"")
        if old:
            marker.layers = {layer: LayerInfo(**asdict(info)) for layer, info in old.layers.items()}
        rows: dict[int, list[pa.Table]] = {}
        for layer, write in sorted(changes.layers.items()):
            info = marker.layers.get(layer)
            if info is None:
                if write.blocks is None:
                    continue
                heads, _, block_len, dim = write.blocks.keys.shape
                info = marker.layers[layer] = LayerInfo(heads, block_len, dim, write.blocks.keys.dtype.name)
            # Blocks added and evicted again in the transaction used up ids they never
            # reached the disk with; with them gone, every older block is gone too.
            info.first += write.drop_committed + write.skipped_new
            info.next += write.skipped_new
            if write.blocks is not None:
                rows.setdefault(info.head_dim, []).append(
                    _block_rows(memory, layer, info, write.blocks, marker.commit)
                )
                info.next += write.blocks.num_blocks
        if changes.state is not None:
            buffer = io.BytesIO()
            np.savez(buffer, **changes.state)
            marker.state = buffer.getvalue()
        for dim, tables in rows.items():  # invisible until the marker below says so
            self._table(dim).add(pa.concat_tables(tables))
        self._commits.merge_insert("memory").when_matched_update_all().when_not_matched_insert_all().execute(
            pa.Table.from_pylist([marker.to_row(memory)], schema=COMMITS_SCHEMA)
        )
        return marker, list(rows)

    def _update_cache(self, memory: str, old: Marker | None, marker: Marker, changes: Changes) -> None:
        """Apply a commit to the cached copy, so the cache always equals what is on disk. A
        new memory is cached at once: its committed blocks are exactly the ones at hand."""
        if memory not in self._cache_lru and old is not None:
            return  # not cached: read from Lance at its next search
        for layer, write in changes.layers.items():
            if write.drop_committed:  # only a cached memory has committed blocks to drop
                self._cache.evict_oldest(memory, layer, old.layers[layer].live - write.drop_committed)
            if write.blocks is not None:
                self._cache.add(memory, layer, write.blocks)
        self._cache_lru[memory] = sum(info.live * info.block_bytes for info in marker.layers.values())
        self._cache_lru.move_to_end(memory)
        self._shrink_cache()

    def _delete_rows(self, where: str) -> None:
        for table in self._all_tables():
            table.delete(where)

    def _all_tables(self) -> list:
        for name in self._db.list_tables().tables:
            if name.startswith("blocks_d"):
                self._table(int(name.removeprefix("blocks_d")))
        return list(self._tables.values())

    def _delete_committed(self, memory: str) -> None:
        with self._lock:
            self._marker(memory)
            self._commits.delete(f"memory = '{memory}'")  # the memory is gone from here on
            del self._markers[memory]
            self._uncache(memory)
            self._delete_rows(f"memory = '{memory}'")
            self._cleaned.add(memory)

    # -- index and housekeeping -------------------------------------------------------------------

    def _after_commit(self, dims: list[int]) -> None:
        """Keep the tables fast: past `index_min_rows` build the IVF index, and rebuild it
        when the rows it misses reach `unindexed_fraction`; every `optimize_every` commits
        compact the small fragments commits leave. This runs in a background thread, one
        per table at a time, not on the committing caller's time."""
        self._commits_since_optimize += 1
        compact = self._commits_since_optimize >= self.config.optimize_every
        if compact:
            self._commits_since_optimize = 0
            self._commits.optimize(cleanup_older_than=timedelta(minutes=10))
        for dim in dims:
            job = self._maintenance(dim, compact)
            if job is not None:
                self._building.add(dim)
                thread = threading.Thread(target=self._maintain, args=(dim, job), name=f"lance-{job}-d{dim}")
                self._index_threads.append(thread)
                thread.start()

    def _maintenance(self, dim: int, compact: bool = False) -> str | None:
        """What the table of head_dim `dim` needs now: "build", "optimize" or nothing."""
        if dim in self._building:
            return None
        self._index_nprobes(dim)  # learn of an index an earlier process built
        rows = self._table(dim).count_rows()
        indexed = self._indexed_rows.get(dim) or 0
        if rows >= self.config.index_min_rows and rows - indexed >= indexed * self.config.unindexed_fraction:
            return "build"
        return "optimize" if compact else None

    def _maintain(self, dim: int, job: str) -> None:
        try:
            if job == "build":
                self.build_index(dim)
            else:
                table = self._table(dim)
                rows = table.count_rows()
                table.optimize(cleanup_older_than=timedelta(minutes=10))  # compacts, adds new rows to the index
                if self._indexed_rows.get(dim):  # the index changed: measure again
                    nprobes = self.config.nprobes or self._calibrate(table, rows)
                    with self._lock:
                        self._indexed_rows[dim], self._nprobes[dim] = rows, nprobes
        except Exception:  # a conflict with a concurrent commit, say: the next commit tries again
            log.exception("%s of blocks_d%d failed", job, dim)
        finally:
            with self._lock:
                self._building.discard(dim)

    def build_index(self, dim: int) -> int:
        """(Re)build the IVF index of the head_dim `dim` table and measure the nprobes that
        reaches `target_recall`; returns it. While it runs, searches stay exact (flat) or
        use the previous index."""
        table = self._table(dim)
        rows = table.count_rows()
        # Lance's own partition count (from a target partition size) trains in a third
        # of the time sqrt(N) partitions take (300k rows: 1.8 s against 5.6 s).
        if self.config.index_type == "IVF_PQ":
            config = IvfPq(distance_type="dot", num_sub_vectors=max(1, dim // 4))
        else:
            config = IvfFlat(distance_type="dot")
        table.create_index("search_key", config=config, replace=True)  # commits and searches go on
        nprobes = self.config.nprobes or self._calibrate(table, rows)
        with self._lock:
            self._indexed_rows[dim], self._nprobes[dim] = rows, nprobes
        return nprobes

    def wait_for_index(self) -> None:
        """Finish the index work in flight, and any the last commits made due."""
        while self._index_threads:
            self._index_threads.pop().join()
        for dim in list(self._tables):
            job = self._maintenance(dim)
            if job is not None:
                self._building.add(dim)
                self._maintain(dim, job)

    def _index_nprobes(self, dim: int) -> int | None:
        """nprobes for the table's IVF index; None: no index (exact flat search)."""
        if dim not in self._nprobes and dim not in self._indexed_rows:
            table = self._table(dim)
            indexes = [index for index in table.list_indices() if "search_key" in index.columns]
            if indexes:  # built by an earlier process: measure recall again
                indexed = self._indexed_rows[dim] = indexes[0].num_indexed_rows
                self._nprobes[dim] = self.config.nprobes or self._calibrate(table, indexed)
            else:
                self._indexed_rows[dim] = 0
        return self._nprobes.get(dim)

    def _calibrate(self, table, indexed: int, top_k: int = 32, max_nprobes: int = 4096) -> int:
        """The nprobes to search with: the smallest power of two whose recall@top_k against
        exact search reaches target_recall on calibration queries, doubled as a margin.

        Queries are not stored keys (a stored key finds its own cluster at one probe): they
        are stored keys of the largest layer moved by noise as large as the keys' spread,
        near the data as attention queries are near their keys, never on it."""
        dim = table.schema.field("search_key").type.list_size
        with self._lock:
            markers = dict(self._markers)
        memory, marker, layer = max(
            ((m, mk, layer) for m, mk in markers.items() for layer, i in mk.layers.items() if i.head_dim == dim),
            key=lambda item: item[1].layers[item[2]].live,
        )
        where = self._where(memory, marker, layer, head=0)
        info = marker.layers[layer]
        group = table.search().where(where).select(["block", "search_key"]).limit(info.live).to_arrow()
        keys = _fixed_rows(group["search_key"], np.float32, (group.num_rows, dim))
        blocks = group["block"].to_numpy()
        rng = np.random.default_rng(0)
        count = self.config.calibration_queries
        noise = rng.standard_normal((count, dim)) * keys.std(axis=0)
        queries = (keys[rng.integers(0, len(keys), count)] + noise).astype(np.float32)
        exact_index = faiss.IndexFlatIP(dim)
        exact_index.add(keys)
        exact = [set(blocks[row]) for row in exact_index.search(queries, top_k)[1]]
        del exact_index, keys

        def found(nprobes: int) -> list[set[int]]:
            results, step = [], self._query_batch(dim, indexed)
            for start in range(0, len(queries), step):
                batch = list(queries[start : start + step])
                query = table.search(batch, vector_column_name="search_key").distance_type("dot")
                query = query.where(where, prefilter=True).limit(top_k).select(["block", "_distance"]).nprobes(nprobes)
                if self.config.index_type == "IVF_PQ":
                    query = query.refine_factor(self.config.refine_factor)
                rows = query.to_arrow()
                block = rows["block"].to_numpy()
                index = rows["query_index"].to_numpy() if "query_index" in rows.column_names else np.zeros_like(block)
                results += [set(block[index == i]) for i in range(len(batch))]
            return results

        nprobes = 1
        while nprobes < max_nprobes:
            approx = found(nprobes)
            recall = np.mean([len(a & e) / max(len(e), 1) for a, e in zip(approx, exact)])
            log.info("blocks_d%d: nprobes %d, recall@%d %.3f on calibration queries", dim, nprobes, top_k, recall)
            if recall >= self.config.target_recall:
                break
            nprobes *= 2
        return 2 * nprobes


# -- rows <-> arrays ------------------------------------------------------------------------------


def _block_rows(memory: str, layer: int, info: LayerInfo, blocks: Blocks, commit: int) -> pa.Table:
    """One row per (block, head), block-major, ids from info.next on."""
    heads, n, block_len, dim = blocks.keys.shape
    dtype = np.dtype(info.dtype).newbyteorder("<")
    keys = np.ascontiguousarray(blocks.keys.transpose(1, 0, 2, 3), dtype=dtype)  # (N, H, B, D)
    values = np.ascontiguousarray(blocks.values.transpose(1, 0, 2, 3), dtype=dtype)
    positions = np.repeat(np.ascontiguousarray(blocks.positions, dtype="<i8")[:, None], heads, axis=1)  # (N, H, B)
    search_keys = np.ascontiguousarray(blocks.search_keys.transpose(1, 0, 2), dtype=np.float32)  # (N, H, D)
    rows = n * heads
    return pa.table(
        {
            "memory": pa.array([memory] * rows, pa.string()),
            "layer": pa.array(np.full(rows, layer, np.int32)),
            "head": pa.array(np.tile(np.arange(heads, dtype=np.int32), n)),
            "block": pa.array(np.repeat(np.arange(info.next, info.next + n, dtype=np.int64), heads)),
            "commit": pa.array(np.full(rows, commit, np.int64)),
            "search_key": pa.FixedSizeListArray.from_arrays(pa.array(search_keys.reshape(-1)), dim),
            "keys": _binary_array(keys.reshape(rows, -1)),
            "values": _binary_array(values.reshape(rows, -1)),
            "positions": _binary_array(positions.reshape(rows, -1)),
        },
        schema=blocks_schema(dim),
    )


def _binary_array(rows: np.ndarray) -> pa.Array:
    """(R, ...) -> a binary array of R equal-length values, without a Python loop."""
    flat = rows.reshape(len(rows), -1).view(np.uint8)
    width = flat.shape[1]
    offsets = np.arange(0, (len(rows) + 1) * width, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), len(rows), [None, pa.py_buffer(offsets), pa.py_buffer(flat.tobytes())])


def _binary_rows(column: pa.ChunkedArray | pa.Array, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A binary column of equal-length values -> one array of `shape`."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(column) == 0:
        return np.empty(shape, dtype)
    width = len(column[0].as_py()) if len(column) else 0
    fixed = pc.cast(column, pa.binary(width))  # fails loudly if any value has another length
    data = fixed.buffers()[1]
    start = fixed.offset * width
    return np.frombuffer(data, dtype=np.uint8, count=len(fixed) * width, offset=start).view(dtype).reshape(shape)


def _fixed_rows(column: pa.ChunkedArray | pa.Array, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size-list column -> one array of `shape`."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(shape)
