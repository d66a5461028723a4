"""`memlm store-serve`: the `MemoryStore` gRPC service (proto/memlm/v1/store.proto) over a
FAISS or LanceDB store.

    memlm store-serve --port 50052 --data /var/lib/memlm          # FAISS files under the folder
    memlm store-serve --port 50052 --data lance:///var/lib/memlm  # LanceDB

From Python: `server = serve(port=0, data="lance:///tmp/m")` returns the started
`grpc.Server` once the store has loaded, with the bound port as `server.port`;
`server.stop(grace)` stops it. `run(config)` blocks until SIGTERM/SIGINT, then finishes the
calls in flight (appends included) before it exits. Handlers raise; memlm/serve/errors.py
answers each exception with its status code.

Transactions: an `Append` stream is read and checked up to its commit message before
anything touches the store (a stream that breaks, is cancelled or fails a check changes
nothing); then, holding the memory's lock, its blocks, evictions and state are applied and
committed, and rolled back on any error. Searches take the same lock, so they never see half an append.
Retried streams: the ids of the last `KEEP_APPEND_IDS` transactions live in the memory's
state under a reserved key (committed with the blocks, so they survive a crash); a stream
whose id is among them is acknowledged without being applied again.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import grpc
import numpy as np

from memlm.protos import from_tensor, store_pb2, store_pb2_grpc
from memlm.serve.errors import NotReady, TooLarge
from memlm.serve.serving import RunningServer, ServerOptions, Service, StreamShape, start_server, wait_for_signal
from memlm.store import MemoryNotFound, VectorStore, check_memory_name, open_store
from memlm.store.settings import StoreSettings, memlm_home
from memlm.store.wire import (
    blocks_from_proto,
    blocks_to_proto,
    check_layout,
    layout_of_batch,
    queries_from_proto,
    result_to_proto,
    state_from_proto,
    state_to_proto,
    stats_to_proto,
)

SERVICE_NAME = "memlm.v1.MemoryStore"
DEFAULT_PORT = 50052
APPEND_IDS = "__memlm_append_ids__"  # reserved state key: (n, 16) uint8 ids of committed appends
KEEP_APPEND_IDS = 64
APPEND_STREAM = StreamShape("Append", first="header", last="commit", advice="commit more often or split it")


@dataclass
class StoreServerConfig:
    port: int = DEFAULT_PORT
    data: str | None = None  # folder (FAISS files) or store URL (faiss:///dir, lance:///dir, memory)
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    host: str = "[::]"
    max_message_bytes: int = 256 << 20  # one gRPC message; a segment's blocks are a few MB
    max_append_bytes: int = 4 << 30  # one Append stream, held in RAM until it is applied
    max_top_k: int = 4096
    max_workers: int = 64  # an open transaction's Append stream holds one while it is open
    grace_s: float = 30.0  # how long a stop waits for calls in flight


def open_backing_store(data: str | None) -> VectorStore:
    """A folder means FAISS files there; URLs go to `open_store`. Never another server."""
    if data is None:
        return open_store(f"faiss://{memlm_home() / 'memories'}")
    if data.startswith(("grpc://", "grpcs://")):
        raise ValueError(f"--data {data!r}: the store server keeps memories itself; give a folder or lance:///dir")
    return open_store(data if "://" in data or data == "memory" else f"faiss://{data}")


@dataclass
class Append:
    """An Append stream, read and checked, not yet applied."""

    header: store_pb2.AppendHeader
    operations: list  # (layer, Blocks) | store_pb2.Evict | dict (state), in stream order


class MemoryStoreService(store_pb2_grpc.MemoryStoreServicer):
    def __init__(self, config: StoreServerConfig):
        self.config = config
        self.store: VectorStore | None = None  # set once loaded; UNAVAILABLE until then
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    def _lock(self, memory: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[memory]

    def _ready(self) -> VectorStore:
        if self.store is None:
            raise NotReady("the store is still loading; retry shortly")
        return self.store

    # -- Append -----------------------------------------------------------------------------

    def Append(self, request_iterator, context):
        store = self._ready()
        append = self._read_append(request_iterator, context.is_active)
        memory, transaction_id = append.header.memory, append.header.transaction_id
        with self._lock(memory):
            try:
                state = store.load_state(memory)
            except MemoryNotFound:
                state = {}
            seen = state.get(APPEND_IDS, np.zeros((0, 16), np.uint8))
            this = np.frombuffer(transaction_id, np.uint8)
            if transaction_id and len(seen) and (seen == this).all(axis=1).any():
                return store_pb2.AppendReply(memory=memory, duplicate=True, stats=stats_to_proto(store.stats(memory)))
            added = evicted = 0
            try:
                new_state = None
                for operation in append.operations:
                    if isinstance(operation, store_pb2.Evict):
                        evicted += store.evict_oldest(memory, operation.layer, operation.keep_blocks)
                    elif isinstance(operation, dict):
                        new_state = operation
                    else:
                        layer, blocks = operation
                        store.add(memory, layer, blocks)
                        added += blocks.num_blocks
                if transaction_id or new_state is not None:
                    final = dict(new_state) if new_state is not None else dict(state)
                    ids = np.concatenate([seen, this[None]]) if transaction_id else seen
                    if len(ids):
                        final[APPEND_IDS] = ids[-KEEP_APPEND_IDS:]
                    store.save_state(memory, final)
                store.commit(memory)
            except BaseException:
                store.rollback(memory)
                raise
            return store_pb2.AppendReply(
                memory=memory, blocks_added=added, blocks_evicted=evicted, stats=stats_to_proto(store.stats(memory))
            )

    def _read_append(self, requests, alive: Callable[[], bool]) -> Append:
        """Read the whole stream and check every message. Raises ValueError, TooLarge or ClientGone."""
        header, layouts, operations = None, {}, []
        for kind, request in APPEND_STREAM.read(requests, self.config.max_append_bytes, alive):
            if header is None:  # the first message, a `header`
                header = request.header
                check_memory_name(header.memory)
                if len(header.transaction_id) not in (0, 16):
                    raise ValueError(f"transaction_id must be 16 bytes, got {len(header.transaction_id)}")
                for layout in header.layers:
                    check_layout(layout)
                    if layout.layer in layouts:
                        raise ValueError(f"layer {layout.layer} declared twice in the header")
                    layouts[layout.layer] = layout
            elif kind == "blocks":
                layout = layouts.get(request.blocks.layer)
                if layout is None:  # not declared in the header: the layer's first batch declares it
                    layout = layouts[request.blocks.layer] = layout_of_batch(request.blocks)
                operations.append((request.blocks.layer, blocks_from_proto(request.blocks, layout)))
            elif kind == "evict":
                if request.evict.keep_blocks < 0:
                    raise ValueError(f"evict keep_blocks must be >= 0, got {request.evict.keep_blocks}")
                operations.append(request.evict)
            elif kind == "state":
                state = state_from_proto(request.state)
                if APPEND_IDS in state:
                    raise ValueError(f"state key {APPEND_IDS!r} is reserved")
                operations.append(state)
            else:
                raise ValueError(f"unexpected {kind or 'empty'} message after the header")
        if not operations:
            raise ValueError(f"nothing to append to {header.memory!r}: the stream holds only a header")
        return Append(header, operations)

    # -- reads and the rest -------------------------------------------------------------------

    def Search(self, request, context):
        store = self._ready()
        check_memory_name(request.memory)
        if not 1 <= request.top_k <= self.config.max_top_k:
            raise ValueError(f"top_k must be between 1 and {self.config.max_top_k}, got {request.top_k}")
        if request.skip_oldest < 0:
            raise ValueError(f"skip_oldest must be >= 0, got {request.skip_oldest}")
        queries = queries_from_proto(request.queries)
        with self._lock(request.memory):
            if request.skip_oldest:
                result = store.search(request.memory, request.layer, queries, request.top_k, request.skip_oldest)
            else:
                result = store.search(request.memory, request.layer, queries, request.top_k)
        self._check_reply_size((result.keys, result.values, result.positions, result.scores),
                               "send fewer queries per call or ask for a smaller top_k")  # fmt: skip
        return result_to_proto(result)

    def _check_reply_size(self, arrays: tuple[np.ndarray, ...], advice: str) -> None:
        size = sum(array.nbytes for array in arrays)
        if size > self.config.max_message_bytes - (1 << 16):
            limit = self.config.max_message_bytes
            raise TooLarge(f"the reply would be {size} bytes, over the {limit}-byte message limit; {advice}")

    def ReadBlocks(self, request, context):
        store = self._ready()
        check_memory_name(request.memory)
        if request.skip_oldest < 0:
            raise ValueError(f"skip_oldest must be >= 0, got {request.skip_oldest}")
        starts = from_tensor(request.starts, "starts", ("int64",), ndim=1)
        with self._lock(request.memory):
            found = store.blocks_at(request.memory, request.layer, starts, request.skip_oldest)
        self._check_reply_size((found.search_keys, found.keys, found.values, found.positions),
                               "ask for fewer blocks per call")  # fmt: skip
        reply = store_pb2.BlockBatch()
        blocks_to_proto(request.layer, found, reply)
        return reply

    def LoadState(self, request, context):
        store = self._ready()
        check_memory_name(request.memory)
        state = store.load_state(request.memory)
        state.pop(APPEND_IDS, None)
        reply = store_pb2.LoadStateReply()
        state_to_proto(state, reply.state)
        return reply

    def Drop(self, request, context):
        store = self._ready()
        check_memory_name(request.memory)
        with self._lock(request.memory):
            store.delete(request.memory)
        return store_pb2.DropReply()

    def Stats(self, request, context):
        store = self._ready()
        check_memory_name(request.memory)
        return stats_to_proto(store.stats(request.memory))

    def ListMemories(self, request, context):
        return store_pb2.ListMemoriesReply(memories=self._ready().memories())


# -- starting and stopping ---------------------------------------------------------------------


def serve(
    port: int = DEFAULT_PORT,
    data: str | None = None,
    token: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    **options,
) -> grpc.Server:
    """Start the store service and return the `grpc.Server` once the store has loaded
    (health says NOT_SERVING and calls get UNAVAILABLE while it loads). `options`: other
    `StoreServerConfig` fields. The server carries `.port` (the bound port, useful with
    port=0), `.service` (the `MemoryStoreService`) and `.running` (a `RunningServer`)."""
    config = StoreServerConfig(port=port, data=data, token=token, tls_cert=tls_cert, tls_key=tls_key, **options)
    service = MemoryStoreService(config)
    server_options = ServerOptions(
        **{f.name: getattr(config, f.name) for f in fields(ServerOptions) if hasattr(config, f.name)}
    )
    running = start_server(
        server_options,
        [Service(SERVICE_NAME, lambda server: store_pb2_grpc.add_MemoryStoreServicer_to_server(service, server))],
    )
    try:
        service.store = open_backing_store(data)
    except BaseException:
        running.server.stop(None)
        raise
    running.set_serving(True)
    server = running.server
    server.port, server.service, server.running = running.port, service, running
    return server


def run(config: StoreServerConfig) -> None:
    """Serve until SIGTERM/SIGINT, then finish the calls in flight. A token not given comes
    from MEMLM_TOKEN or the config file (memlm/store/settings.py)."""
    config.token = StoreSettings.resolve(token=config.token).token
    server = serve(**asdict(config))
    running: RunningServer = server.running
    where = config.data or str(memlm_home() / "memories")
    # The first line on stdout, once the store is loaded: what a parent process waits for.
    print(
        f"memlm store-serve: listening on port {running.port} ({'TLS' if config.tls_cert else 'plaintext'}, "
        f"auth {'on' if config.token else 'off'}), data {where}",
        flush=True,
    )
    wait_for_signal()
    print("memlm store-serve: stopping, finishing calls in flight", flush=True)
    running.stop(server.service.config.grace_s)
    close = getattr(server.service.store, "close", None)
    if close is not None:
        close()
