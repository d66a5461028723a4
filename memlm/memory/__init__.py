"""Memory backends and the attention they install into a transformers model."""

from memlm.memory.backends import FocusedBackend, MemorizingBackend, MemoryBackend, make_backend
from memlm.memory.session import MemorySession, ModelShape

__all__ = ["FocusedBackend", "MemorizingBackend", "MemoryBackend", "MemorySession", "ModelShape", "make_backend"]
