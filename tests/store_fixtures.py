"""Helpers shared by the store tests: random blocks, servers on loopback, raw requests, and a
randomized script that checks a store against the reference `FaissStore` step by step."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np

from memlm.protos import bearer_metadata, store_pb2, store_pb2_grpc
from memlm.store import Blocks, FaissStore, MemoryNotFound, SearchResult
from memlm.store.wire import blocks_to_proto, layout_of, state_to_proto
from memlm.serve.store_server import serve


def random_blocks(rng: np.random.Generator, n: int, heads=2, block_len=4, dim=8, start=0, dtype=np.float32) -> Blocks:
    return Blocks(
        search_keys=rng.standard_normal((heads, n, dim)).astype(np.float32),
        keys=rng.standard_normal((heads, n, block_len, dim)).astype(dtype),
        values=rng.standard_normal((heads, n, block_len, dim)).astype(dtype),
        positions=np.arange(start, start + n * block_len, dtype=np.int64).reshape(n, block_len),
    )


def assert_same_results(got: SearchResult, expected: SearchResult) -> None:
    assert got.scores.shape == expected.scores.shape
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.positions, expected.positions)
    np.testing.assert_array_equal(got.keys, expected.keys)
    np.testing.assert_array_equal(got.values, expected.values)


def assert_same_blocks(got: Blocks, expected: Blocks) -> None:
    assert got.num_blocks == expected.num_blocks
    if expected.num_blocks:
        for name in ("search_keys", "keys", "values", "positions"):
            np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(data, port: int = 0, **options) -> Iterator[grpc.Server]:
    server = serve(port=port, data=str(data), host="127.0.0.1", **options)
    try:
        yield server
    finally:
        server.stop(None).wait()
        close = getattr(server.service.store, "close", None)
        if close is not None:
            close()


def raw_stub(port: int) -> store_pb2_grpc.MemoryStoreStub:
    return store_pb2_grpc.MemoryStoreStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def append_requests(
    memory: str, layer: int, blocks: Blocks, transaction_id: bytes = b"", state: dict | None = None
) -> list[store_pb2.AppendRequest]:
    header = store_pb2.AppendHeader(memory=memory, layers=[layout_of(layer, blocks)], transaction_id=transaction_id)
    requests = [store_pb2.AppendRequest(header=header), store_pb2.AppendRequest()]
    blocks_to_proto(layer, blocks, requests[1].blocks)
    if state is not None:
        requests.append(store_pb2.AppendRequest())
        requests[-1].state.SetInParent()
        state_to_proto(state, requests[-1].state)
    return [*requests, store_pb2.AppendRequest(commit=store_pb2.Commit())]


def call_code(call, *args, token: str | None = None, **kwargs) -> grpc.StatusCode:
    """The status code a raw call ends with (OK when it succeeds)."""
    try:
        call(*args, timeout=10, metadata=bearer_metadata(token), **kwargs)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# -- a store against the reference, operation by operation ----------------------------------------


def _outcome(operation):
    try:
        return operation()
    except MemoryNotFound:
        return "MemoryNotFound"


def _stats_view(stats) -> tuple:
    # Layers whose blocks were all evicted may or may not be listed with 0 blocks.
    return ({layer: n for layer, n in stats.blocks_per_layer.items() if n}, stats.tokens, stats.bytes)


ACTIONS = ["add", "add", "add", "search", "search", "evict", "state", "commit", "commit", "rollback", "stats", "delete"]
ACTION_WEIGHTS = [0.16, 0.16, 0.16, 0.12, 0.12, 0.08, 0.04, 0.06, 0.04, 0.03, 0.02, 0.01]


def check_against_faiss(store, reference_root, seed: int = 0, steps: int = 120) -> None:
    """Run the same random adds, evictions, states, commits, rollbacks and deletes on `store`
    and on a `FaissStore`, comparing every search, stats, state and memory list."""
    reference = FaissStore(reference_root)
    rng = np.random.default_rng(seed)
    data_rng = np.random.default_rng(seed + 1)
    position = 0
    for step in range(steps):
        memory = str(rng.choice(["alpha", "beta"]))
        layer = int(rng.choice([0, 3]))
        action = rng.choice(ACTIONS, p=ACTION_WEIGHTS)
        where = f"step {step}: {action} {memory} layer {layer}"
        if action == "add":
            blocks = random_blocks(data_rng, int(rng.integers(1, 6)), start=position)
            position += blocks.positions.size
            store.add(memory, layer, blocks)
            reference.add(memory, layer, blocks)
        elif action == "search":
            queries = data_rng.standard_normal((2, 3, 8)).astype(np.float32)
            top_k = int(rng.integers(1, 9))
            got = _outcome(lambda: store.search(memory, layer, queries, top_k))
            expected = _outcome(lambda: reference.search(memory, layer, queries, top_k))
            if isinstance(expected, str):
                assert got == expected, where
            else:
                assert not isinstance(got, str), where
                assert_same_results(got, expected)
            # The passage read's fetch: some block starts, held or not (evicted, never written).
            starts = np.sort(data_rng.choice(np.arange(0, position + 8, 4), size=min(6, position // 4 + 2), replace=False))
            got = _outcome(lambda: store.blocks_at(memory, layer, starts))
            expected = _outcome(lambda: reference.blocks_at(memory, layer, starts))
            if isinstance(expected, str):
                assert got == expected, where
            else:
                assert not isinstance(got, str), where
                assert_same_blocks(got, expected)
        elif action == "evict":
            keep = int(rng.integers(0, 16))
            got = _outcome(lambda: store.evict_oldest(memory, layer, keep))
            assert got == _outcome(lambda: reference.evict_oldest(memory, layer, keep)), where
        elif action == "state":
            tokens = data_rng.integers(0, 100, size=int(rng.integers(0, 5)))
            state = {"tokens": tokens, "step": np.array(step)}  # a 0-d array too
            store.save_state(memory, state)
            reference.save_state(memory, state)
        elif action == "commit":
            got = _outcome(lambda: store.commit(memory))
            assert got == _outcome(lambda: reference.commit(memory)), where
        elif action == "rollback":
            store.rollback(memory)
            reference.rollback(memory)
        elif action == "delete":
            got = _outcome(lambda: store.delete(memory))
            assert got == _outcome(lambda: reference.delete(memory)), where
        got = _outcome(lambda: _stats_view(store.stats(memory)))
        assert got == _outcome(lambda: _stats_view(reference.stats(memory))), where
        got_state = _outcome(lambda: store.load_state(memory))
        expected_state = _outcome(lambda: reference.load_state(memory))
        if isinstance(expected_state, str):
            assert got_state == expected_state, where
        else:
            assert sorted(got_state) == sorted(expected_state), where
            for name in expected_state:
                np.testing.assert_array_equal(got_state[name], expected_state[name], strict=True)  # shape, dtype
        assert store.memories() == reference.memories(), where
