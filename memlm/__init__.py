"""memlm: language models with long-term, searchable memory of their own attention keys and values.

    from memlm import MemoryLM

The names below load lazily, so that the store service and client, which import
`memlm.store` and `memlm.protos`, do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MemoryLM": "memlm.engine",
    "GenerationResult": "memlm.engine",
    "IngestStats": "memlm.engine",
    "Piece": "memlm.engine",
    "MemoryConfig": "memlm.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memlm' has no attribute {name!r}")
