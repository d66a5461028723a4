"""The MemoryStore gRPC service on loopback: health, reflection, bad input, auth, TLS,
persistence across restarts, crash safety, concurrency, graceful shutdown, retries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memlm.protos import store_pb2, to_tensor
from memlm.store import open_store
from memlm.store.remote import RemoteConfig, RemoteStore
from memlm.serve import store_server
from store_fixtures import (
    append_requests,
    assert_same_results,
    call_code,
    free_port,
    random_blocks,
    raw_stub,
    running_server,
)

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ["faiss", "lance"]


def data_url(tmp_path: Path, backend: str) -> str:
    return str(tmp_path / "data") if backend == "faiss" else f"lance://{tmp_path / 'data'}"


@pytest.fixture
def server(tmp_path):
    with running_server(tmp_path / "data") as server:
        yield server


def remote(port: int, **options) -> RemoteStore:
    return RemoteStore(RemoteConfig([f"127.0.0.1:{port}"], **options))


def health_status(port: int, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


# -- health, reflection ----------------------------------------------------------------------------


def test_health_and_reflection(server):
    assert health_status(server.port) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(server.port, "memlm.v1.MemoryStore") == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {service.name for reply in replies for service in reply.list_services_response.service}
    assert {"memlm.v1.MemoryStore", "grpc.health.v1.Health"} <= names


def test_not_serving_and_unavailable_until_loaded(tmp_path, monkeypatch):
    loading, release = threading.Event(), threading.Event()
    real_open = store_server.open_backing_store

    def slow_open(data):
        loading.set()
        release.wait(10)
        return real_open(data)

    monkeypatch.setattr(store_server, "open_backing_store", slow_open)
    port = free_port()
    started = {}
    thread = threading.Thread(
        target=lambda: started.setdefault("server", store_server.serve(port, str(tmp_path), host="127.0.0.1"))
    )
    thread.start()
    try:
        assert loading.wait(10)
        assert health_status(port) == health_pb2.HealthCheckResponse.NOT_SERVING
        code = call_code(raw_stub(port).ListMemories, store_pb2.ListMemoriesRequest())
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
        thread.join(10)
    server = started["server"]
    assert health_status(port) == health_pb2.HealthCheckResponse.SERVING
    server.stop(None).wait()


# -- bad input: the right code, a useful message, the store unchanged --------------------------------


def _snapshot(stub) -> tuple:
    memories = list(stub.ListMemories(store_pb2.ListMemoriesRequest(), timeout=5).memories)
    stats = stub.Stats(store_pb2.StatsRequest(memory="m"), timeout=5)
    request = store_pb2.SearchRequest(memory="m", layer=0, top_k=50)
    to_tensor(np.ones((2, 3, 8), np.float32), request.queries)
    reply = stub.Search(request, timeout=5)
    return memories, stats.SerializeToString(deterministic=True), reply.SerializeToString(deterministic=True)


def _bad_appends() -> dict[str, tuple[list, str]]:
    """name -> (Append stream, a word its error message must contain)."""
    rng = np.random.default_rng(7)
    good = lambda: append_requests("m", 0, random_blocks(rng, 3))  # noqa: E731
    cases = {}

    stream = good()
    stream[1].blocks.keys.dtype = "int32"
    cases["keys of another dtype"] = (stream, "dtype")

    stream = good()
    stream[0].header.layers[0].dtype = "float64"
    cases["layout dtype not accepted"] = (stream, "dtype")

    stream = good()
    stream[1].blocks.values.shape[:] = [2, 3, 4, 9]
    cases["shape not matching bytes"] = (stream, "bytes")

    stream = append_requests("m", 0, random_blocks(rng, 3, dim=16))
    cases["head_dim differs from the memory's"] = (stream, "shape")

    stream = good()
    stream[0].header.layers[0].head_dim = 4
    cases["batch differs from the header"] = (stream, "header")

    blocks = random_blocks(rng, 3)
    blocks.values[1, 2, 0, 0] = np.nan
    cases["NaN in values"] = (append_requests("m", 0, blocks), "NaN")

    blocks = random_blocks(rng, 3)
    blocks.search_keys[0, 0, 0] = np.inf
    cases["Inf in search keys"] = (append_requests("m", 0, blocks), "Inf")

    cases["empty batch"] = (append_requests("m", 0, random_blocks(rng, 0)), "empty")
    stream = good()
    cases["header only"] = ([stream[0], stream[-1]], "nothing to append")
    cases["no header"] = (good()[1:], "header")
    cases["empty stream"] = ([], "header")
    cases["no commit message"] = (good()[:-1], "commit")
    stream = good()
    cases["a message after the commit"] = ([*stream, stream[1]], "commit")

    stream = good()
    stream[0].header.ClearField("layers")  # the first batch declares layer 0 ...
    stream.insert(2, append_requests("m", 0, random_blocks(rng, 2, heads=3))[1])  # ... the second differs
    cases["batch differs from the layer's first"] = (stream, "layout")

    first, second = good(), good()
    second[1].blocks.positions.data = b"\x00" * 7
    cases["bad second batch: nothing applied"] = ([*first[:-1], second[1], first[-1]], "bytes")

    for name in ["../etc", "a/b", "", ".hidden", "x" * 200, "a b"]:
        stream = good()
        stream[0].header.memory = name
        cases[f"memory name {name[:12]!r}"] = (stream, "memory name")
    return cases


BAD_APPENDS = _bad_appends()


@pytest.mark.parametrize("case", list(BAD_APPENDS))
def test_bad_append_is_invalid_argument_and_changes_nothing(server, case):
    stub = raw_stub(server.port)
    rng = np.random.default_rng(0)
    stub.Append(iter(append_requests("m", 0, random_blocks(rng, 4))), timeout=5)
    before = _snapshot(stub)
    stream, word = BAD_APPENDS[case]
    with pytest.raises(grpc.RpcError) as error:
        stub.Append(iter(stream), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert word.lower() in error.value.details().lower(), error.value.details()
    assert _snapshot(stub) == before


def test_bad_search_and_unknown_memory(server):
    stub = raw_stub(server.port)
    stub.Append(iter(append_requests("m", 0, random_blocks(np.random.default_rng(0), 4))), timeout=5)
    before = _snapshot(stub)

    def search(queries: np.ndarray, memory="m", top_k=4, dtype=None) -> grpc.StatusCode:
        request = store_pb2.SearchRequest(memory=memory, layer=0, top_k=top_k)
        to_tensor(queries, request.queries)
        if dtype:
            request.queries.dtype = dtype
        return call_code(stub.Search, request)

    ok = np.ones((2, 3, 8), np.float32)
    assert search(ok) == grpc.StatusCode.OK
    assert search(ok.astype(np.float64)) == grpc.StatusCode.INVALID_ARGUMENT
    assert search(ok, dtype="int32") == grpc.StatusCode.INVALID_ARGUMENT  # right bytes, wrong dtype
    assert search(np.ones((2, 3, 16), np.float32)) == grpc.StatusCode.INVALID_ARGUMENT  # head_dim
    assert search(np.ones((3, 3, 8), np.float32)) == grpc.StatusCode.INVALID_ARGUMENT  # heads
    assert search(np.full((2, 3, 8), np.nan, np.float32)) == grpc.StatusCode.INVALID_ARGUMENT
    assert search(np.ones((2, 0, 8), np.float32)) == grpc.StatusCode.INVALID_ARGUMENT
    assert search(ok, top_k=0) == grpc.StatusCode.INVALID_ARGUMENT
    assert search(ok, memory="../m") == grpc.StatusCode.INVALID_ARGUMENT
    assert search(ok, memory="nope") == grpc.StatusCode.NOT_FOUND

    def read_blocks(starts: np.ndarray, memory="m", skip_oldest=0) -> grpc.StatusCode:
        request = store_pb2.ReadBlocksRequest(memory=memory, layer=0, skip_oldest=skip_oldest)
        to_tensor(starts, request.starts)
        return call_code(stub.ReadBlocks, request)

    held = np.array([0, 8], np.int64)
    assert read_blocks(held) == grpc.StatusCode.OK
    assert read_blocks(np.array([1000], np.int64)) == grpc.StatusCode.OK  # not held: an empty reply
    assert read_blocks(held.astype(np.float32)) == grpc.StatusCode.INVALID_ARGUMENT
    assert read_blocks(held.reshape(1, 2)) == grpc.StatusCode.INVALID_ARGUMENT
    assert read_blocks(held, skip_oldest=-1) == grpc.StatusCode.INVALID_ARGUMENT
    assert read_blocks(held, memory="../m") == grpc.StatusCode.INVALID_ARGUMENT
    assert read_blocks(held, memory="nope") == grpc.StatusCode.NOT_FOUND
    for call, request in [
        (stub.Stats, store_pb2.StatsRequest(memory="nope")),
        (stub.Drop, store_pb2.DropRequest(memory="nope")),
        (stub.LoadState, store_pb2.LoadStateRequest(memory="nope")),
    ]:
        assert call_code(call, request) == grpc.StatusCode.NOT_FOUND
    evict_unknown = [
        store_pb2.AppendRequest(header=store_pb2.AppendHeader(memory="nope")),
        store_pb2.AppendRequest(evict=store_pb2.Evict(layer=0, keep_blocks=1)),
        store_pb2.AppendRequest(commit=store_pb2.Commit()),
    ]
    assert call_code(stub.Append, iter(evict_unknown)) == grpc.StatusCode.NOT_FOUND
    assert _snapshot(stub) == before


def test_over_size_limits_is_resource_exhausted(tmp_path):
    rng = np.random.default_rng(0)
    with running_server(tmp_path / "data", max_message_bytes=1 << 20, max_append_bytes=3 << 20) as server:
        stub = raw_stub(server.port)
        stub.Append(iter(append_requests("m", 0, random_blocks(rng, 4))), timeout=5)
        before = _snapshot(stub)
        too_big = random_blocks(rng, 2048, heads=2, block_len=4, dim=16)  # ~2 MB in one message
        assert call_code(stub.Append, iter(append_requests("m", 0, too_big))) == grpc.StatusCode.RESOURCE_EXHAUSTED
        part = append_requests("m", 0, random_blocks(rng, 800, heads=2, block_len=4, dim=8))  # ~0.4 MB each
        stream = [part[0], *[part[1]] * 10, part[-1]]  # 4 MB in all, over max_append_bytes
        assert call_code(stub.Append, iter(stream)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        request = store_pb2.SearchRequest(memory="m", layer=0, top_k=4)
        to_tensor(np.ones((2, 20_000, 8), np.float32), request.queries)  # the reply would be ~10 MB
        assert call_code(stub.Search, request) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _snapshot(stub) == before


# -- auth and TLS -----------------------------------------------------------------------------------


def test_bearer_token(tmp_path):
    with running_server(tmp_path / "data", token="s3cret") as server:
        stub = raw_stub(server.port)
        request = store_pb2.ListMemoriesRequest()
        assert call_code(stub.ListMemories, request) == grpc.StatusCode.UNAUTHENTICATED
        assert call_code(stub.ListMemories, request, token="wrong") == grpc.StatusCode.UNAUTHENTICATED
        stream = append_requests("m", 0, random_blocks(np.random.default_rng(0), 2))
        assert call_code(stub.Append, iter(stream), token="wrong") == grpc.StatusCode.UNAUTHENTICATED
        assert call_code(stub.ListMemories, request, token="s3cret") == grpc.StatusCode.OK
        assert health_status(server.port) == health_pb2.HealthCheckResponse.SERVING  # probes need no token
        with pytest.raises(grpc.RpcError) as error:
            remote(server.port).memories()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        store = remote(server.port, token="s3cret")
        store.add("m", 0, random_blocks(np.random.default_rng(0), 2))
        store.commit("m")
        assert store.memories() == ["m"]


def test_tls(tmp_path, self_signed_cert):
    cert, key = self_signed_cert
    with running_server(tmp_path / "data", tls_cert=str(cert), tls_key=str(key)) as server:
        store = RemoteStore.from_url(f"grpcs://127.0.0.1:{server.port}", tls_ca=str(cert))
        store.add("m", 0, random_blocks(np.random.default_rng(0), 2))
        store.commit("m")
        assert store.memories() == ["m"]
        plain = remote(server.port, retries=0, timeout_s=2)
        with pytest.raises(grpc.RpcError):
            plain.memories()


# -- durability --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_persistence_across_restart(tmp_path, backend):
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((2, 5, 8)).astype(np.float32)
    with running_server(data_url(tmp_path, backend)) as server:
        store = remote(server.port)
        for layer in (0, 2):
            store.add("doc", layer, random_blocks(rng, 30))
        store.save_state("doc", {"tokens": np.arange(10)})
        store.commit("doc")
        store.add("doc", 0, random_blocks(rng, 10, start=1000))
        store.evict_oldest("doc", 0, 25)
        store.commit("doc")
        before = [store.search("doc", layer, queries, 8) for layer in (0, 2)]
        stats = store.stats("doc")
    with running_server(data_url(tmp_path, backend), port=server.port) as server:
        store = remote(server.port)
        for layer, expected in zip((0, 2), before):
            assert_same_results(store.search("doc", layer, queries, 8), expected)
        assert store.stats("doc") == stats
        np.testing.assert_array_equal(store.load_state("doc")["tokens"], np.arange(10))


def _start_subprocess_server(data: str, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "memlm.cli", "store-serve", "--port", str(port), "--data", data, "--host", "127.0.0.1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    line = process.stdout.readline()  # printed once the store is loaded and serving
    assert "listening" in line, line
    return process


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_mid_stream_keeps_every_acknowledged_append(tmp_path, backend):
    port = free_port()
    process = _start_subprocess_server(data_url(tmp_path, backend), port)
    acknowledged: list[int] = []
    sizes = {i: 1 + i % 3 for i in range(10_000)}  # append i holds sizes[i] blocks at positions i*10 + j

    def writer():
        store = remote(port, retries=0, timeout_s=5, append_timeout_s=5)
        for i in sizes:
            blocks = random_blocks(np.random.default_rng(i), sizes[i], heads=1, block_len=1, dim=4, start=i * 10)
            store.add("log", 0, blocks)
            try:
                store.commit("log")
            except grpc.RpcError:
                return
            acknowledged.append(i)

    # A stream stopped half way: header and one batch sent, the rest never comes.
    hold = threading.Event()

    def half_stream():
        blocks = random_blocks(np.random.default_rng(1), 5, heads=1, block_len=1, dim=4, start=10**9)
        header, batch, _ = append_requests("log", 0, blocks)
        yield header
        yield batch
        hold.wait(30)

    half = raw_stub(port).Append.future(half_stream(), timeout=30)
    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.time() + 20
    while len(acknowledged) < 30 and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    thread.join(10)
    hold.set()
    assert half.exception(timeout=10) is not None
    assert len(acknowledged) >= 30

    with running_server(data_url(tmp_path, backend)) as server:
        store = remote(server.port)
        total = store.stats("log").blocks_per_layer[0]
        found = store.search("log", 0, np.ones((1, 1, 4), np.float32), min(total, 4096))
        positions = found.positions.reshape(-1)
    assert len(set(positions.tolist())) == total  # nothing twice
    appends = positions // 10
    present = {int(i): int((appends == i).sum()) for i in np.unique(appends)}
    assert 10**8 not in present  # the half stream left nothing
    assert set(acknowledged) <= set(present)
    assert all(count == sizes[i] for i, count in present.items())  # no partial append
    assert set(present) - set(acknowledged) <= {len(acknowledged)}  # at most the one in flight


def test_graceful_shutdown_finishes_the_append_in_flight(tmp_path):
    rng = np.random.default_rng(0)
    server = store_server.serve(0, str(tmp_path / "data"), host="127.0.0.1", grace_s=10)
    port = server.port
    hold = threading.Event()
    blocks = random_blocks(rng, 6)

    def slow_stream():
        header, batch, commit = append_requests("m", 0, blocks)
        yield header
        hold.wait(10)
        yield batch
        yield commit

    reply = raw_stub(port).Append.future(slow_stream(), timeout=20)
    time.sleep(0.3)  # the stream is open on the server
    stopping = threading.Thread(target=lambda: server.running.stop(10))
    stopping.start()
    time.sleep(0.3)
    assert call_code(raw_stub(port).ListMemories, store_pb2.ListMemoriesRequest()) != grpc.StatusCode.OK
    hold.set()
    assert reply.result(timeout=10).blocks_added == 6
    stopping.join(10)
    with running_server(tmp_path / "data") as server:
        assert remote(server.port).stats("m").blocks_per_layer == {0: 6}


# -- many clients, retries -----------------------------------------------------------------------------


def test_concurrent_appends_and_searches_count_exactly(server):
    rng = np.random.default_rng(0)
    shared_client = remote(server.port)  # four threads share one client, each on its own memory
    errors: list[BaseException] = []
    done = threading.Event()
    commits, blocks_per_commit = 8, 3

    def write(store, memory, seed):
        local = np.random.default_rng(seed)
        for i in range(commits):
            store.add(memory, 0, random_blocks(local, blocks_per_commit, start=seed * 10_000 + i * 100))
            store.commit(memory)

    def search():
        store = remote(server.port)
        queries = rng.standard_normal((2, 4, 8)).astype(np.float32)
        while not done.is_set():
            for memory in ("own-0", "shared"):
                try:
                    found = store.search(memory, 0, queries, 5)
                    assert found.k <= 5 and np.isfinite(found.scores).all()
                except KeyError:
                    pass  # not created yet

    def guarded(target, *args):
        def run():
            try:
                target(*args)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        return threading.Thread(target=run)

    writers = [guarded(write, shared_client, f"own-{i}", i) for i in range(4)]
    writers += [guarded(write, remote(server.port), "shared", 10 + i) for i in range(2)]
    searchers = [guarded(search), guarded(search)]
    for thread in writers + searchers:
        thread.start()
    for thread in writers:
        thread.join(60)
    done.set()
    for thread in searchers:
        thread.join(10)
    assert not errors, errors
    store = remote(server.port)
    assert store.memories() == ["own-0", "own-1", "own-2", "own-3", "shared"]
    for i in range(4):
        assert store.stats(f"own-{i}").blocks_per_layer == {0: commits * blocks_per_commit}
    assert store.stats("shared").blocks_per_layer == {0: 2 * commits * blocks_per_commit}


def test_retries_until_the_server_is_up_and_never_applies_twice(tmp_path):
    port = free_port()
    store = remote(port, retries=20, backoff_s=0.05, max_backoff_s=0.2)
    store.add("m", 0, random_blocks(np.random.default_rng(0), 3))
    servers = []
    starter = threading.Timer(0.5, lambda: servers.append(store_server.serve(port, str(tmp_path), host="127.0.0.1")))
    starter.start()
    try:
        store.commit("m")  # sent while nothing listens: retried until the server is up
        assert store.stats("m").blocks_per_layer == {0: 3}
        stub = raw_stub(port)
        stream = append_requests("m", 0, random_blocks(np.random.default_rng(1), 2), transaction_id=b"t" * 16)
        assert not stub.Append(iter(stream), timeout=5).duplicate
        again = stub.Append(iter(stream), timeout=5)  # a retry of an append that was applied
        assert again.duplicate and again.stats.blocks_per_layer[0] == 5
        assert store.stats("m").blocks_per_layer == {0: 5}
        assert "__memlm_append_ids__" not in store.load_state("m")
    finally:
        starter.join()
        for server in servers:
            server.stop(None).wait()


def test_open_store_grpc_url(server):
    store = open_store(f"grpc://127.0.0.1:{server.port}")
    assert isinstance(store, RemoteStore)
    store.add("m", 1, random_blocks(np.random.default_rng(0), 2))
    store.commit("m")
    assert store.memories() == ["m"]
