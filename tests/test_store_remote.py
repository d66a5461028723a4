"""RemoteStore: the same answers as the in-process FaissStore, placement over several
servers, store URLs and settings."""

from __future__ import annotations

import time

import numpy as np
import pytest

from memlm.store import FaissStore, StoreSettings, open_store
from memlm.store.lance_store import LanceStore
from memlm.store.remote import RemoteConfig, RemoteStore
from store_fixtures import assert_same_results, check_against_faiss, random_blocks, running_server


@pytest.mark.parametrize(
    "backend, stream_adds", [("faiss", True), ("lance", True), ("faiss", False)], ids=["faiss", "lance", "at-commit"]
)
def test_matches_faiss_store_operation_by_operation(tmp_path, backend, stream_adds):
    data = str(tmp_path / "server") if backend == "faiss" else f"lance://{tmp_path / 'server'}"
    with running_server(data) as server:
        with RemoteStore.from_url(f"grpc://127.0.0.1:{server.port}", stream_adds=stream_adds) as store:
            check_against_faiss(store, tmp_path / "reference", seed=3)


def test_rollback_cancels_the_stream_and_the_server_keeps_nothing(tmp_path):
    rng = np.random.default_rng(0)
    with running_server(tmp_path / "server") as server:
        store = RemoteStore.from_url(f"grpc://127.0.0.1:{server.port}")
        store.add("kept", 0, random_blocks(rng, 2))
        store.commit("kept")
        for _ in range(5):
            store.add("kept", 0, random_blocks(rng, 50))
            store.add("dropped", 0, random_blocks(rng, 50))
            assert store._streams.keys() == {"kept", "dropped"}  # both are streaming already
            store.rollback("kept")
            store.delete("dropped")
        time.sleep(0.2)
        assert server.service.store.memories() == ["kept"]
        assert server.service.store.stats("kept").blocks_per_layer == {0: 2}


def test_a_transaction_outlives_a_server_restart(tmp_path):
    """The stream dies with the server; commit sends the transaction again from the local
    buffer, retrying until the new server is up."""
    rng = np.random.default_rng(0)
    first = running_server(tmp_path / "server")
    server = first.__enter__()
    port = server.port
    store = RemoteStore.from_url(f"grpc://127.0.0.1:{port}", backoff_s=0.05)
    store.add("m", 0, random_blocks(rng, 4))
    first.__exit__(None, None, None)
    store.add("m", 0, random_blocks(rng, 3))  # the stream is gone: buffered only
    with running_server(tmp_path / "server", port=port):
        store.add("m", 1, random_blocks(rng, 2))
        store.commit("m")
        assert RemoteStore.from_url(f"grpc://127.0.0.1:{port}").stats("m").blocks_per_layer == {0: 7, 1: 2}


def test_uncommitted_adds_are_searched_and_rolled_back(tmp_path):
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((2, 4, 8)).astype(np.float32)
    reference = FaissStore(None)
    with running_server(tmp_path / "server") as server:
        store = RemoteStore.from_url(f"grpc://127.0.0.1:{server.port}")
        first, second = random_blocks(rng, 20), random_blocks(rng, 7, start=1000)
        for target in (store, reference):
            target.add("m", 0, first)
            target.commit("m")
            target.add("m", 0, second)
            target.evict_oldest("m", 0, 15)  # hides 12 committed blocks, uncommitted
        assert_same_results(store.search("m", 0, queries, 10), reference.search("m", 0, queries, 10))
        assert RemoteStore.from_url(f"grpc://127.0.0.1:{server.port}").stats("m").blocks_per_layer == {0: 20}
        store.rollback("m")
        assert store.stats("m").blocks_per_layer == {0: 20}


def test_memories_are_placed_on_servers_by_name(tmp_path):
    names = [f"doc-{i}" for i in range(12)]
    with running_server(tmp_path / "a") as a, running_server(tmp_path / "b") as b:
        store = open_store(f"grpc://127.0.0.1:{a.port},127.0.0.1:{b.port}")
        for name in names:
            store.add(name, 0, random_blocks(np.random.default_rng(0), 2))
            store.commit(name)
        on_a, on_b = a.service.store.memories(), b.service.store.memories()
        assert on_a and on_b and sorted(on_a + on_b) == sorted(names)
        assert store.memories() == sorted(names)
        # Placement is a function of the name alone: a fresh client finds everything.
        again = RemoteStore.from_url(f"grpc://127.0.0.1:{a.port},127.0.0.1:{b.port}")
        assert all(again.stats(name).blocks_per_layer == {0: 2} for name in names)
        again.delete(names[0])
        assert names[0] not in store.memories()


def test_store_urls(tmp_path):
    assert isinstance(open_store("memory"), FaissStore)
    assert isinstance(open_store(f"faiss://{tmp_path / 'f'}"), FaissStore)
    assert isinstance(open_store(f"lance://{tmp_path / 'l'}"), LanceStore)
    config = RemoteConfig.from_url("grpcs://a:1,b:2")
    assert config.addresses == ["a:1", "b:2"] and config.tls
    for bad in ["grpc://", "grpc://nohost", "grpc://a:port", "http://a:1"]:
        with pytest.raises(ValueError):
            RemoteConfig.from_url(bad)
    with pytest.raises(ValueError, match="unknown store"):
        open_store("s3://bucket")


def test_settings_precedence_flags_env_file(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('[store]\nurl = "memory"\ntoken = "from-file"\n')
    monkeypatch.setenv("MEMLM_CONFIG", str(config))
    monkeypatch.delenv("MEMLM_STORE", raising=False)
    monkeypatch.delenv("MEMLM_TOKEN", raising=False)
    assert StoreSettings.resolve() == StoreSettings(url="memory", token="from-file")
    assert isinstance(open_store(), FaissStore) and open_store().root is None
    monkeypatch.setenv("MEMLM_TOKEN", "from-env")
    monkeypatch.setenv("MEMLM_STORE", f"lance://{tmp_path / 'l'}")
    assert StoreSettings.resolve().token == "from-env"
    assert isinstance(open_store(), LanceStore)
    assert StoreSettings.resolve(token="from-flag").token == "from-flag"
    assert RemoteConfig.from_url("grpc://a:1").token == "from-env"
    config.write_text('[store]\nurl = "memory"\ntokn = "typo"\n')
    with pytest.raises(ValueError, match="tokn"):
        StoreSettings.resolve()


@pytest.mark.parametrize("kind", ["remote", "lance"])
def test_a_model_ingesting_with_fifo_eviction_reads_the_same_memory(tmp_path, kind, request):
    """The engine's own use (search every segment, add, evict to a cap, save state, one
    commit) gives the same memory and the same generation on every store."""
    import torch
    from conftest import tiny_lm

    # One torch thread: OpenMP workers spinning against this process's gRPC threads on two
    # cores make the forward passes 40 times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    settings = dict(segment_len=16, sink_len=4, local_len=16, block_len=4, top_k=2, max_memory_tokens=40)
    document = torch.randint(0, 120, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = tiny_lm(store=FaissStore(None), **settings)
    reference.ingest_tokens(document, "doc", progress=False)
    expected = reference.generate_full("what?", memory="doc", chat=False, max_new_tokens=8)
    with running_server(tmp_path / "server") as server:
        store = (
            RemoteStore.from_url(f"grpc://127.0.0.1:{server.port}")
            if kind == "remote"
            else LanceStore(tmp_path / "lance")
        )
        lm = tiny_lm(store=store, **settings)
        lm.ingest_tokens(document, "doc", progress=False)
        assert store.stats("doc") == reference.store.stats("doc")
        got = lm.generate_full("what?", memory="doc", chat=False, max_new_tokens=8)
    assert got.text == expected.text
