"""LanceStore: the same answers as FaissStore, persistence, rollback, crash safety of a
commit, the FAISS cache, and recall of the ANN index."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from memlm.store import Blocks, FaissStore, MemoryNotFound
from memlm.store.lance_store import LanceStore
from store_fixtures import assert_same_results, check_against_faiss, random_blocks


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0], ids=["faiss-cache", "lance-search"])
def test_matches_faiss_store_operation_by_operation(tmp_path, cache_bytes):
    check_against_faiss(LanceStore(tmp_path / "lance", cache_bytes=cache_bytes), tmp_path / "reference", seed=5)


def test_persistence_and_rollback(tmp_path):
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((2, 6, 8)).astype(np.float32)
    store = LanceStore(tmp_path)
    store.add("doc", 0, random_blocks(rng, 40))
    store.save_state("doc", {"window": np.arange(5)})
    store.commit("doc")
    expected = store.search("doc", 0, queries, 8)
    store.add("doc", 0, random_blocks(rng, 10, start=500))
    store.evict_oldest("doc", 0, 5)
    store.save_state("doc", {"window": np.arange(2)})
    assert store.stats("doc").blocks_per_layer == {0: 5}
    store.rollback("doc")
    assert_same_results(store.search("doc", 0, queries, 8), expected)
    store.add("new", 0, random_blocks(rng, 3))
    store.rollback("new")
    assert store.memories() == ["doc"]
    for cache_bytes in (1 << 30, 0):  # from the cache filled by reading Lance, and from Lance itself
        reopened = LanceStore(tmp_path, cache_bytes=cache_bytes)
        assert reopened.memories() == ["doc"]
        assert_same_results(reopened.search("doc", 0, queries, 8), expected)
        np.testing.assert_array_equal(reopened.load_state("doc")["window"], np.arange(5))
        assert reopened.stats("doc") == store.stats("doc")


def test_crash_before_the_commit_marker_leaves_the_last_commit(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((2, 4, 8)).astype(np.float32)
    store = LanceStore(tmp_path, cache_bytes=0)
    store.add("doc", 0, random_blocks(rng, 12))
    store.commit("doc")
    expected = store.search("doc", 0, queries, 20)

    def crash(*args, **kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(type(store._commits), "merge_insert", crash)  # rows written, marker not
    store.add("doc", 0, random_blocks(rng, 5, start=100))
    store.evict_oldest("doc", 0, 10)
    with pytest.raises(OSError):
        store.commit("doc")
    monkeypatch.undo()
    assert store._table(8).count_rows() == 2 * (12 + 5)  # the rows of the failed commit are on disk
    after_crash = LanceStore(tmp_path, cache_bytes=0)  # what a restarted process sees
    assert after_crash.stats("doc").blocks_per_layer == {0: 12}
    assert_same_results(after_crash.search("doc", 0, queries, 20), expected)
    # The next commit replaces the leftovers instead of showing them twice.
    late = random_blocks(rng, 2, start=900)
    after_crash.add("doc", 0, late)
    after_crash.commit("doc")
    assert LanceStore(tmp_path, cache_bytes=0).stats("doc").blocks_per_layer == {0: 14}
    # The store that failed retries its transaction: it is still open and commits once.
    store.commit("doc")
    assert LanceStore(tmp_path).stats("doc").blocks_per_layer == {0: 10}


def test_delete_and_several_head_dims(tmp_path):
    rng = np.random.default_rng(0)
    store = LanceStore(tmp_path)
    store.add("small", 0, random_blocks(rng, 4, dim=8))
    store.add("wide", 0, random_blocks(rng, 4, dim=16))
    store.commit("small")
    store.commit("wide")
    store.delete("small")
    with pytest.raises(MemoryNotFound):
        store.delete("small")
    reopened = LanceStore(tmp_path, cache_bytes=0)
    assert reopened.memories() == ["wide"]
    assert reopened.search("wide", 0, rng.standard_normal((2, 1, 16)).astype(np.float32), 2).k == 2
    with pytest.raises(ValueError, match="shape"):
        reopened.add("wide", 0, random_blocks(rng, 1, dim=8))


def test_cache_keeps_the_most_recent_memories(tmp_path):
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((2, 3, 8)).astype(np.float32)
    reference = FaissStore(None)
    store = LanceStore(tmp_path, cache_bytes=60 * 2 * (8 * 4 + 2 * 4 * 8 * 4) + 60 * 4 * 8)  # ~one memory of 60 blocks
    for name in ("a", "b", "c"):
        blocks = random_blocks(rng, 60)
        for target in (store, reference):
            target.add(name, 0, blocks)
            target.commit(name)
    for name in ("a", "b", "a", "c", "c"):
        assert_same_results(store.search(name, 0, queries, 5), reference.search(name, 0, queries, 5))
    assert list(store._cache_lru) == ["c"]


def test_ann_index_reaches_the_target_recall(tmp_path):
    """Past `index_min_rows` the table gets an IVF index, and the measured nprobes keeps
    recall@32 against exact search at 0.95 or more on queries it was not tuned on."""
    rng = np.random.default_rng(0)
    n, dim, clusters = 20_000, 32, 64
    centers = rng.standard_normal((clusters, dim)).astype(np.float32) * 3
    keys = (centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim))).astype(np.float32)
    blocks = Blocks(keys[None], keys[None, :, None], keys[None, :, None], np.arange(n, dtype=np.int64)[:, None])
    store = LanceStore(tmp_path, cache_bytes=0, index_min_rows=10_000)
    store.add("big", 0, blocks)
    store.commit("big")
    store.wait_for_index()  # built in the background
    assert store._table(dim).list_indices() and store._nprobes[dim] >= 1  # indexed and calibrated
    queries = (centers[rng.integers(0, clusters, 64)] + rng.standard_normal((64, dim))).astype(np.float32)
    found = store.search("big", 0, queries[None], 32)
    exact = faiss.IndexFlatIP(dim)
    exact.add(keys)
    _, truth = exact.search(queries, 32)
    retrieved = found.positions[0, :, :, 0]  # positions are the block indices here
    recall = np.mean([len(set(a) & set(b)) / 32 for a, b in zip(retrieved, truth)])
    assert recall >= 0.95, recall
    # A reopened store measures again before it trusts the index.
    reopened = LanceStore(tmp_path, cache_bytes=0)
    assert reopened.search("big", 0, queries[None], 32).k == 32
    assert reopened._nprobes[dim] >= 1
