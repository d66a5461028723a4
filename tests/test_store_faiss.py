"""FaissStore details the other stores lean on."""

from __future__ import annotations

import numpy as np

from memlm.store import FaissStore
from memlm.store import faiss_store
from store_fixtures import assert_same_results, random_blocks


def test_skip_oldest_leaves_the_oldest_blocks_out(monkeypatch):
    rng = np.random.default_rng(0)
    store, tail = FaissStore(None), FaissStore(None)
    old, new = random_blocks(rng, 30), random_blocks(rng, 20, start=1000)
    store.add("m", 0, old)
    store.add("m", 0, new)
    tail.add("m", 0, new)
    queries = rng.standard_normal((2, 5, 8)).astype(np.float32)
    expected = tail.search("m", 0, queries, 7)
    assert_same_results(store.search("m", 0, queries, 7, skip_oldest=30), expected)
    # GPU indexes ignore FAISS's IDSelector, so that path brute-forces the kept blocks instead.
    monkeypatch.setattr(faiss_store, "USE_GPU", True)
    assert_same_results(store.search("m", 0, queries, 7, skip_oldest=30), expected)
    assert store.search("m", 0, queries, 7, skip_oldest=50).k == 0
