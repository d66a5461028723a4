"""`RemoteStore`: the `VectorStore` of a `MemoryStore` gRPC server (memlm/serve/store_server.py).

    store = open_store("grpc://127.0.0.1:50052")            # or RemoteStore(RemoteConfig([...]))
    store = open_store("grpc://10.0.0.5:50052,10.0.0.6:50052")   # memories spread over two servers
    store = open_store("grpcs://store.example:50052")       # TLS (CA from MEMLM_TLS_CA or system roots)

Transactions (memlm/store/buffered.py): one open transaction per memory is one `Append`
stream. The first `add` opens it and every add is sent at once, in the background, so the
transfer overlaps whatever the caller computes next (a model's next segment); `commit`
sends the evictions and the state, closes the stream and returns when the server says it
is all durable; `rollback` cancels the stream, and the server drops what it had received.
The adds are also kept here, and `search` merges the server's top-k (leaving out blocks
this transaction evicted) with the top-k of this local buffer: the server sees nothing
of a transaction before its commit, and neither does anyone else.

If the stream breaks (server restarted, a limit reached), the commit sends the
transaction again from the local buffer, compacted: only the blocks still live, then the
final block counts, then the state. `RemoteConfig(stream_adds=False)` always does that.

Every call has a deadline and is retried with exponential backoff while the server is
UNAVAILABLE (restarting, loading). A retried `Append` carries the same transaction id, and
the server acknowledges an id it has already committed without applying it again.

With several addresses, each memory lives on one of them, chosen by a stable hash of its
name, so every client agrees on the placement without talking to each other.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

from memlm.protos import bearer_metadata, store_pb2, store_pb2_grpc, to_tensor
from memlm.store.base import Blocks, MemoryNotFound, MemoryStats, SearchResult, check_memory_name
from memlm.store.buffered import BufferedStore, Changes
from memlm.store.settings import StoreSettings
from memlm.store.wire import (
    blocks_to_proto,
    read_blocks_from_proto,
    result_from_proto,
    split_blocks,
    state_from_proto,
    state_to_proto,
    stats_from_proto,
)

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class RemoteConfig:
    addresses: list[str]  # "host:port"; several: memories are spread over them by name
    token: str | None = None  # bearer token the server asks for (None: no auth)
    tls: bool = False
    tls_ca: str | None = None  # PEM file of the CA that signed the server's certificate (None: system roots)
    timeout_s: float = 30.0  # deadline of each unary call
    append_timeout_s: float = 3600.0  # deadline of an Append stream: a transaction, first add to commit
    stream_adds: bool = True  # send adds as they come (False: all at commit)
    retries: int = 6  # attempts after the first while the server is UNAVAILABLE
    backoff_s: float = 0.1  # first wait; doubles each retry, at most `max_backoff_s`
    max_backoff_s: float = 3.0
    max_message_bytes: int = 256 << 20  # must not exceed the server's limit
    batch_bytes: int = 8 << 20  # blocks per Append message

    @classmethod
    def from_url(cls, url: str, **overrides) -> RemoteConfig:
        """`grpc://host:port[,host2:port2...]` (plain) or `grpcs://...` (TLS). The token and
        CA come from `StoreSettings` (MEMLM_TOKEN, MEMLM_TLS_CA, config file) unless given."""
        scheme, _, rest = url.partition("://")
        if scheme not in ("grpc", "grpcs") or not rest:
            raise ValueError(f"bad store URL {url!r}: use grpc://host:port[,host:port...] or grpcs://...")
        addresses = [address.strip() for address in rest.rstrip("/").split(",") if address.strip()]
        for address in addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"bad address {address!r} in {url!r}: use host:port")
        settings = StoreSettings.resolve(token=overrides.pop("token", None), tls_ca=overrides.pop("tls_ca", None))
        return cls(addresses, token=settings.token, tls=scheme == "grpcs", tls_ca=settings.tls_ca, **overrides)


class RemoteStore(BufferedStore):
    def __init__(self, config: RemoteConfig):
        super().__init__()
        if not config.addresses:
            raise ValueError("RemoteStore needs at least one address")
        self.config = config
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        if config.tls:
            root = Path(config.tls_ca).read_bytes() if config.tls_ca else None
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
            self._channels = [grpc.secure_channel(a, credentials, options=options) for a in config.addresses]
        else:
            self._channels = [grpc.insecure_channel(a, options=options) for a in config.addresses]
        self._stubs = [store_pb2_grpc.MemoryStoreStub(channel) for channel in self._channels]
        self._metadata = bearer_metadata(config.token)
        self._streams: dict[str, _AppendStream] = {}  # memory -> the open transaction's stream

    @classmethod
    def from_url(cls, url: str, **overrides) -> RemoteStore:
        return cls(RemoteConfig.from_url(url, **overrides))

    def close(self) -> None:
        for memory in list(self._streams):
            self._streams.pop(memory).cancel()
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls ------------------------------------------------------------------------------

    def _stub(self, memory: str) -> store_pb2_grpc.MemoryStoreStub:
        """The server that holds `memory`: a hash of the name, stable across processes and
        Python versions (unlike `hash()`)."""
        digest = hashlib.blake2b(memory.encode(), digest_size=8).digest()
        return self._stubs[int.from_bytes(digest, "big") % len(self._stubs)]

    def _call(self, memory: str | None, call: Callable[[], T]) -> T:
        """Run `call` with retries while the server is UNAVAILABLE; map the status codes the
        `VectorStore` contract has exceptions for."""
        delay = self.config.backoff_s
        for attempt in range(self.config.retries + 1):
            try:
                return call()
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.config.retries:
                    time.sleep(delay)
                    delay = min(2 * delay, self.config.max_backoff_s)
                    continue
                if code == grpc.StatusCode.NOT_FOUND and memory is not None:
                    not_found = MemoryNotFound(memory, [])
                    not_found.args = (error.details(),)  # the server's message lists the known memories
                    raise not_found from None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(error.details()) from None
                raise
        raise AssertionError("unreachable")

    def _unary(self, memory: str, method: str, request):
        stub = self._stub(memory)
        return self._call(
            memory, lambda: getattr(stub, method)(request, timeout=self.config.timeout_s, metadata=self._metadata)
        )

    # -- committed side (BufferedStore) ---------------------------------------------------------

    def _committed_search(
        self, memory: str, layer: int, queries: np.ndarray, top_k: int, skip_oldest: int
    ) -> SearchResult:
        check_memory_name(memory)
        request = store_pb2.SearchRequest(memory=memory, layer=layer, top_k=top_k, skip_oldest=skip_oldest)
        to_tensor(np.asarray(queries, dtype=np.float32), request.queries)
        return result_from_proto(self._unary(memory, "Search", request))

    def _committed_blocks_at(self, memory: str, layer: int, starts: np.ndarray, skip_oldest: int) -> Blocks:
        check_memory_name(memory)
        request = store_pb2.ReadBlocksRequest(memory=memory, layer=layer, skip_oldest=skip_oldest)
        to_tensor(np.asarray(starts, dtype=np.int64), request.starts)
        return read_blocks_from_proto(self._unary(memory, "ReadBlocks", request))

    def _committed_blocks(self, memory: str, layer: int) -> int:
        return self._committed_stats(memory).blocks_per_layer.get(layer, 0)

    def _committed_state(self, memory: str) -> dict[str, np.ndarray]:
        check_memory_name(memory)
        return state_from_proto(self._unary(memory, "LoadState", store_pb2.LoadStateRequest(memory=memory)).state)

    def _committed_stats(self, memory: str) -> MemoryStats:
        check_memory_name(memory)
        return stats_from_proto(self._unary(memory, "Stats", store_pb2.StatsRequest(memory=memory)))

    def _delete_committed(self, memory: str) -> None:
        check_memory_name(memory)
        self._unary(memory, "Drop", store_pb2.DropRequest(memory=memory))

    # -- the Append stream of a transaction -------------------------------------------------------

    def _added(self, memory: str, layer: int, blocks: Blocks) -> None:
        if not self.config.stream_adds:
            return
        stream = self._streams.get(memory)
        if stream is None:
            header = store_pb2.AppendHeader(memory=memory, transaction_id=os.urandom(16))
            stream = self._streams[memory] = _AppendStream(header)
            stream.call = self._stub(memory).Append.future(
                stream.requests(), timeout=self.config.append_timeout_s, metadata=self._metadata
            )
        stream.send_all(_block_requests(layer, blocks, self.config.batch_bytes))

    def _discarded(self, memory: str) -> None:
        stream = self._streams.pop(memory, None)
        if stream is not None:
            stream.cancel()  # the server forgets what it received

    def _write(self, changes: Changes) -> None:
        stream = self._streams.pop(changes.memory, None)
        if stream is not None:
            if stream.send_all(_closing_requests(changes)):
                try:
                    stream.finish(self.config.append_timeout_s)
                    return
                except grpc.RpcError as error:
                    log.info("Append stream of %r failed (%s); sending the transaction again", changes.memory, error)
            stream.cancel()
        # The same transaction id as the stream's: if that one did commit and only its reply
        # was lost, the server acknowledges this copy without applying it again.
        transaction_id = stream.header.transaction_id if stream is not None else os.urandom(16)
        stub = self._stub(changes.memory)
        self._call(
            changes.memory,
            lambda: stub.Append(
                self._compacted_requests(changes, transaction_id),
                timeout=self.config.append_timeout_s,
                metadata=self._metadata,
            ),
        )

    def _compacted_requests(self, changes: Changes, transaction_id: bytes) -> Iterator[store_pb2.AppendRequest]:
        """A whole transaction from the local buffer: the blocks still live, then evictions
        and state."""
        header = store_pb2.AppendHeader(memory=changes.memory, transaction_id=transaction_id)
        yield store_pb2.AppendRequest(header=header)
        for layer, write in sorted(changes.layers.items()):
            if write.blocks is not None:
                yield from _block_requests(layer, write.blocks, self.config.batch_bytes)
        yield from _closing_requests(changes)

    def memories(self) -> list[str]:
        names: set[str] = set()
        for stub in self._stubs:
            reply = self._call(
                None,
                lambda stub=stub: stub.ListMemories(
                    store_pb2.ListMemoriesRequest(), timeout=self.config.timeout_s, metadata=self._metadata
                ),
            )
            names.update(reply.memories)
        return sorted(names)


def _block_requests(layer: int, blocks: Blocks, batch_bytes: int) -> Iterator[store_pb2.AppendRequest]:
    for part in split_blocks(blocks, batch_bytes):
        request = store_pb2.AppendRequest()
        blocks_to_proto(layer, part, request.blocks)
        yield request


def _closing_requests(changes: Changes) -> Iterator[store_pb2.AppendRequest]:
    """What ends a transaction's stream: each evicting layer's final block count (the server
    gets there by dropping its oldest blocks), the state, the commit message."""
    for layer, write in sorted(changes.layers.items()):
        if write.keep_blocks is not None:
            yield store_pb2.AppendRequest(evict=store_pb2.Evict(layer=layer, keep_blocks=write.keep_blocks))
    if changes.state is not None:
        request = store_pb2.AppendRequest()
        request.state.SetInParent()  # an empty state is a state too: it replaces the old one
        state_to_proto(changes.state, request.state)
        yield request
    yield store_pb2.AppendRequest(commit=store_pb2.Commit())


class _AppendStream:
    """An open client-streaming Append call fed from a bounded queue: `send_all` blocks
    while the server is `QUEUE` messages behind (backpressure), and gives up (returns False)
    once the call has ended, e.g. when the server went away."""

    QUEUE = 4
    _END = object()

    def __init__(self, header: store_pb2.AppendHeader):
        self.header = header
        self.call: grpc.Future | None = None
        self._queue: queue.Queue = queue.Queue(self.QUEUE)
        self._closed = threading.Event()

    def requests(self) -> Iterator[store_pb2.AppendRequest]:
        yield store_pb2.AppendRequest(header=self.header)
        while (request := self._queue.get()) is not self._END:
            yield request

    def send_all(self, requests: Iterator[store_pb2.AppendRequest]) -> bool:
        for request in requests:
            while True:
                if self._closed.is_set() or self.call.done():
                    return False
                try:
                    self._queue.put(request, timeout=0.2)
                    break
                except queue.Full:
                    continue
        return not self.call.done()

    def finish(self, timeout: float) -> store_pb2.AppendReply:
        self._queue.put(self._END)
        return self.call.result(timeout=timeout)

    def cancel(self) -> None:
        self._closed.set()
        if self.call is not None:
            self.call.cancel()
        while True:  # unblock the sending thread if it waits for a request
            try:
                self._queue.put_nowait(self._END)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
