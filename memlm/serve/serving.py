"""What every memlm gRPC server does the same way: a thread-pool server with message
limits, optional bearer-token auth and TLS, `grpc.health.v1` health checking (NOT_SERVING
until the service says it is ready), server reflection, and a graceful stop on SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memlm.serve.auth import BearerTokenInterceptor


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
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_workers),
        interceptors=[BearerTokenInterceptor(options.token)] if options.token else [],
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
    names = [service.name for service in services]
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


def wait_for_signal(signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Block the main thread until one of `signals` arrives."""
    arrived = threading.Event()
    for sig in signals:
        signal.signal(sig, lambda *_: arrived.set())
    while not arrived.wait(1.0):
        pass
