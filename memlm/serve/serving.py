"""What every memlm gRPC server does the same way: a thread-pool server with message
limits, optional bearer-token auth and TLS, errors answered with a status code
(memlm/serve/errors.py: handlers raise, they never abort), `grpc.health.v1` health checking
(NOT_SERVING until the service says it is ready), server reflection, request streams read
in order and within a size limit, and a graceful stop on SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memlm.serve.auth import BearerTokenInterceptor
from memlm.serve.errors import ClientGone, ErrorStatusInterceptor, TooLarge


@dataclass
class ServerOptions:
    host: str = "[::]"
    port: int = 0  # 0: any free port (the bound one is returned)
    token: str | None = None  # bearer token clients must send (None: no auth)
    tls_cert: str | None = None  # PEM certificate chain; with tls_key, serve TLS only
    tls_key: str | None = None
    max_message_bytes: int = 256 << 20
    max_workers: int = 16
    max_concurrent_rpcs: int = 256  # beyond this, calls are answered RESOURCE_EXHAUSTED


@dataclass
class Service:
    name: str  # full service name, e.g. "memlm.v1.MemoryStore"
    register: Callable[[grpc.Server], None]  # e.g. lambda s: add_MemoryStoreServicer_to_server(servicer, s)


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    services: list[str]

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.services]:  # "" is the whole server
            self.health.set(name, status)

    def stop(self, grace_s: float) -> None:
        """Refuse new calls at once, let calls in flight finish for up to `grace_s` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


def start_server(options: ServerOptions, services: list[Service]) -> RunningServer:
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
    names = [service.name for service in services]
    # Auth comes first (outermost): a refused call never reaches the error interceptor.
    auth = [BearerTokenInterceptor(options.token)] if options.token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_workers),
        interceptors=[*auth, ErrorStatusInterceptor(names)],
        options=[
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
        ],
        maximum_concurrent_rpcs=options.max_concurrent_rpcs,
    )
    for service in services:
        service.register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{options.host}:{options.port}"
    if options.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(Path(options.tls_key).read_bytes(), Path(options.tls_cert).read_bytes())]
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    running = RunningServer(server, port, health_servicer, names)
    running.set_serving(False)  # until the service has loaded what it serves
    server.start()
    return running


@dataclass(frozen=True)
class StreamShape:
    """How a client's request stream (Ingest, Append) must go: a message of kind `first`
    opens it, one of kind `last` closes it (nothing may follow), and a stream that ends
    without it changes nothing. Messages are protos with a `kind` oneof."""

    name: str  # "Ingest", "Append": what error messages call the stream
    first: str
    last: str
    advice: str  # what to do about a stream over its size limit

    def read(
        self, requests: Iterable[Message], max_bytes: int, alive: Callable[[], bool]
    ) -> Iterator[tuple[str, Message]]:
        """The stream's messages before `last` as (kind, message), checked on the way: its
        order (ValueError), its size in all (TooLarge), its client (ClientGone when the
        client broke it off or its deadline passed)."""
        size, opened, closed = 0, False, False
        try:
            for request in requests:
                if closed:
                    raise ValueError(f"a message after the {self.last} message; {self.last} must be the last one")
                size += request.ByteSize()
                if size > max_bytes:
                    raise TooLarge(f"{self.name.lower()} stream over {max_bytes} bytes; {self.advice}")
                kind = request.WhichOneof("kind")
                if not opened and kind != self.first:
                    raise ValueError(
                        f"the first message of the {self.name} stream must be `{self.first}`, got {kind or 'nothing'}"
                    )
                opened, closed = True, kind == self.last
                if not closed:
                    yield kind, request
        except grpc.RpcError as error:  # the client went away mid-stream
            raise ClientGone() from error
        if not opened:
            raise ValueError(f"empty {self.name} stream: send a `{self.first}` message first")
        if not closed:
            if not alive():  # gRPC ends the iteration quietly when the deadline passes
                raise ClientGone()
            article = "an" if self.last[0] in "aeiou" else "a"
            raise ValueError(f"the {self.name} stream ended without {article} `{self.last}` message; nothing changed")


def wait_for_signal(signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Block the main thread until one of `signals` arrives."""
    arrived = threading.Event()
    for sig in signals:
        signal.signal(sig, lambda *_: arrived.set())
    while not arrived.wait(1.0):
        pass
