"""Vector stores for attention memories. `open_store` turns a store URL into a store:

    None or "faiss"          FAISS in process, persisted under $MEMLM_HOME/memories
    "faiss:///path"          FAISS in process, persisted under /path
    "memory"                 FAISS in process, nothing on disk (tests, benchmarks)
"""

from __future__ import annotations

import os
from pathlib import Path

from memlm.store.base import Blocks, MemoryNotFound, MemoryStats, SearchResult, VectorStore, check_memory_name
from memlm.store.faiss_store import FaissStore

__all__ = [
    "Blocks",
    "FaissStore",
    "MemoryNotFound",
    "MemoryStats",
    "SearchResult",
    "VectorStore",
    "check_memory_name",
    "memlm_home",
    "open_store",
]


def memlm_home() -> Path:
    return Path(os.environ.get("MEMLM_HOME", Path.home() / ".memlm"))


def open_store(url: str | VectorStore | None = None) -> VectorStore:
    if url is None or url == "faiss":
        return FaissStore(memlm_home() / "memories")
    if isinstance(url, str):
        if url == "memory":
            return FaissStore(None)
        if url.startswith("faiss://"):
            return FaissStore(url.removeprefix("faiss://"))
        raise ValueError(f"unknown store {url!r}: use 'faiss', 'faiss:///path' or 'memory'")
    return url
