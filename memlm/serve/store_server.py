"""`memlm store-serve`: the `MemoryStore` gRPC service (proto/memlm/v1/store.proto) over a
FAISS or LanceDB store.

    memlm store-serve --port 50052 --data /var/lib/memlm          # FAISS files under the folder
    memlm store-serve --port 50052 --data lance:///var/lib/memlm  # LanceDB
    python -m memlm.serve.store_server --port 50052 --data DIR       # the same without the CLI

From Python: `server = serve(port=0, data="lance:///tmp/m")` returns the started
`grpc.Server` once the store has loaded, with the bound port as `server.port`;
`server.stop(grace)` stops it. `run(...)` blocks until SIGTERM/SIGINT, then finishes the
calls in flight (appends included) before it exits.

Transactions: an `Append` stream is read and checked up to its commit message before
anything touches the store (a stream that breaks, is cancelled or fails a check changes
nothing); then, holding the memory's lock, its blocks, evictions and state are applied and
committed, and rolled back on any error. Searches take the same lock, so they never see half an append.
Retried streams: the ids of the last `KEEP_APPEND_IDS` transactions live in the memory's
state under a reserved key (committed with the blocks, so they survive a crash); a stream
whose id is among them is acknowledged without being applied again.
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass, fields

import grpc
import numpy as np

from memlm.protos import from_tensor, store_pb2, store_pb2_grpc
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
from memlm.serve.serving import RunningServer, ServerOptions, Service, start_server, wait_for_signal

SERVICE_NAME = "memlm.v1.MemoryStore"
DEFAULT_PORT = 50052
APPEND_IDS = "__memlm_append_ids__"  # reserved state key: (n, 16) uint8 ids of committed appends
KEEP_APPEND_IDS = 64


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


def _answer_errors(method):
    """Map the store's exceptions to status codes; messages say what to fix."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except MemoryNotFound as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

    return wrapper


class TooLarge(Exception):
    """Over a configured size limit (answered RESOURCE_EXHAUSTED)."""


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

    def _ready(self, context) -> VectorStore:
        if self.store is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the store is still loading; retry shortly")
        return self.store

    # -- Append -----------------------------------------------------------------------------

    @_answer_errors
    def Append(self, request_iterator, context):
        store = self._ready(context)
        try:
            append = self._read_append(request_iterator)
        except TooLarge as error:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
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

    def _read_append(self, requests) -> Append:
        """Read the whole stream and check every message. Raises ValueError or TooLarge."""
        header, layouts, operations, size, committed = None, {}, [], 0, False
        for request in requests:
            if committed:
                raise ValueError("a message after the commit message; commit must be the last one")
            size += request.ByteSize()
            if size > self.config.max_append_bytes:
                raise TooLarge(
                    f"append stream over {self.config.max_append_bytes} bytes; commit more often or split it"
                )
            kind = request.WhichOneof("kind")
            if header is None:
                if kind != "header":
                    raise ValueError(f"the first message of an Append stream must be a header, got {kind}")
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
            elif kind == "commit":
                committed = True
            elif kind == "state":
                state = state_from_proto(request.state)
                if APPEND_IDS in state:
                    raise ValueError(f"state key {APPEND_IDS!r} is reserved")
                operations.append(state)
            else:
                raise ValueError(f"unexpected {kind or 'empty'} message after the header")
        if header is None:
            raise ValueError("empty Append stream: send a header first")
        if not committed:
            raise ValueError("the Append stream ended without a commit message; nothing was applied")
        if not operations:
            raise ValueError(f"nothing to append to {header.memory!r}: the stream holds only a header")
        return Append(header, operations)

    # -- reads and the rest -------------------------------------------------------------------

    @_answer_errors
    def Search(self, request, context):
        store = self._ready(context)
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
        self._check_reply_size(context, (result.keys, result.values, result.positions, result.scores),
                               "send fewer queries per call or ask for a smaller top_k")  # fmt: skip
        return result_to_proto(result)

    def _check_reply_size(self, context, arrays: tuple[np.ndarray, ...], advice: str) -> None:
        size = sum(array.nbytes for array in arrays)
        if size > self.config.max_message_bytes - (1 << 16):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the reply would be {size} bytes, over the {self.config.max_message_bytes}-byte message limit; {advice}",
            )

    @_answer_errors
    def ReadBlocks(self, request, context):
        store = self._ready(context)
        check_memory_name(request.memory)
        if request.skip_oldest < 0:
            raise ValueError(f"skip_oldest must be >= 0, got {request.skip_oldest}")
        starts = from_tensor(request.starts, "starts", ("int64",), ndim=1)
        with self._lock(request.memory):
            found = store.blocks_at(request.memory, request.layer, starts, request.skip_oldest)
        self._check_reply_size(context, (found.search_keys, found.keys, found.values, found.positions),
                               "ask for fewer blocks per call")  # fmt: skip
        reply = store_pb2.BlockBatch()
        blocks_to_proto(request.layer, found, reply)
        return reply

    @_answer_errors
    def LoadState(self, request, context):
        store = self._ready(context)
        check_memory_name(request.memory)
        state = store.load_state(request.memory)
        state.pop(APPEND_IDS, None)
        reply = store_pb2.LoadStateReply()
        state_to_proto(state, reply.state)
        return reply

    @_answer_errors
    def Drop(self, request, context):
        store = self._ready(context)
        check_memory_name(request.memory)
        with self._lock(request.memory):
            store.delete(request.memory)
        return store_pb2.DropReply()

    @_answer_errors
    def Stats(self, request, context):
        store = self._ready(context)
        check_memory_name(request.memory)
        return stats_to_proto(store.stats(request.memory))

    @_answer_errors
    def ListMemories(self, request, context):
        return store_pb2.ListMemoriesReply(memories=self._ready(context).memories())


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


def run(
    port: int = DEFAULT_PORT,
    data: str | None = None,
    token: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    **options,
) -> None:
    """Serve until SIGTERM/SIGINT, then finish the calls in flight. A token not given comes
    from MEMLM_TOKEN or the config file (memlm/store/settings.py)."""
    token = StoreSettings.resolve(token=token).token
    server = serve(port, data, token, tls_cert, tls_key, **options)
    running: RunningServer = server.running
    where = data or str(memlm_home() / "memories")
    print(
        f"memlm store-serve: listening on port {running.port} ({'TLS' if tls_cert else 'plaintext'}, "
        f"auth {'on' if token else 'off'}), data {where}",
        flush=True,
    )
    wait_for_signal()
    print("memlm store-serve: stopping, finishing calls in flight", flush=True)
    running.stop(server.service.config.grace_s)
    close = getattr(server.service.store, "close", None)
    if close is not None:
        close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="memlm store-serve", description="Serve the MemoryStore gRPC service.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--data", help="folder for FAISS files, or lance:///dir (default $MEMLM_HOME/memories)")
    parser.add_argument("--token", help="bearer token clients must send (default: env MEMLM_TOKEN)")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--host", default="[::]")
    args = parser.parse_args(argv)
    run(args.port, args.data, args.token, args.tls_cert, args.tls_key, host=args.host)


if __name__ == "__main__":
    sys.exit(main())
