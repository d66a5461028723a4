"""Vector stores for attention memories. `open_store` turns a store URL into a store:

    None                     the configured store: MEMLM_STORE, else the config file's
                             [store] url (memlm/store/settings.py), else "faiss"
    "faiss"                  FAISS in process, persisted under $MEMLM_HOME/memories
    "faiss:///path"          FAISS in process, persisted under /path
    "memory"                 FAISS in process, nothing on disk (tests, benchmarks)
    "lance:///path"          LanceDB under /path (or lance://<any LanceDB URI>, e.g. lance://s3://bucket/x)
    "grpc://host:port"       a `memlm store-serve` server; "grpc://a:1,b:2" spreads memories over
                             several; "grpcs://" for TLS (token: MEMLM_TOKEN or the config file)
"""

from __future__ import annotations

from memlm.extras import require_extra
from memlm.store.base import Blocks, MemoryNotFound, MemoryStats, SearchResult, VectorStore, check_memory_name
from memlm.store.faiss_store import FaissStore
from memlm.store.settings import StoreSettings, memlm_home

__all__ = [
    "Blocks",
    "FaissStore",
    "MemoryNotFound",
    "MemoryStats",
    "SearchResult",
    "StoreSettings",
    "VectorStore",
    "check_memory_name",
    "memlm_home",
    "open_store",
]


def open_store(url: str | VectorStore | None = None) -> VectorStore:
    if url is None:
        url = StoreSettings.resolve().url or "faiss"
    if not isinstance(url, str):
        return url
    if url == "faiss":
        return FaissStore(memlm_home() / "memories")
    if url == "memory":
        return FaissStore(None)
    if url.startswith("faiss://"):
        return FaissStore(url.removeprefix("faiss://"))
    if url.startswith("lance://"):
        require_extra("lance", f"store {url!r}")
        from memlm.store.lance_store import LanceStore  # lancedb is imported only when used

        return LanceStore(url.removeprefix("lance://"))
    if url.startswith(("grpc://", "grpcs://")):
        from memlm.store.remote import RemoteStore  # so is grpc

        return RemoteStore.from_url(url)
    raise ValueError(
        f"unknown store {url!r}: use 'faiss', 'faiss:///path', 'memory', 'lance:///path' or 'grpc://host:port'"
    )
