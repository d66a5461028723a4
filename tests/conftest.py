"""Shared fixtures: tiny random models of each supported family, saved as local checkpoints."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

from memlm.config import MemoryConfig  # noqa: E402
from memlm.engine import MemoryLM  # noqa: E402
from memlm.store.settings import memlm_home  # noqa: E402
from memlm.store import FaissStore  # noqa: E402

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
FAMILIES = {
    "llama": lambda: LlamaConfig(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY, use_sliding_window=False),
}


def tiny_model(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32).eval()


class TinyTokenizer:
    """Enough of a tokenizer for MemoryLM on a random model: one token per byte below 120."""

    chat_template = None
    eos_token_id = 127
    vocab_size = 128

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict:
        encoded = {"input_ids": [b % 120 for b in text.encode()]}
        if return_offsets_mapping:  # ASCII text: byte i is character i
            encoded["offset_mapping"] = [(i, i + 1) for i in range(len(encoded["input_ids"]))]
        return encoded

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))  # ASCII text comes back as it went in


def tiny_lm(family: str = "llama", store=None, seed: int = 0, **settings) -> MemoryLM:
    config = MemoryConfig(memory_dtype="float32", **settings)
    return MemoryLM(tiny_model(family, seed), TinyTokenizer(), store or FaissStore(None), config)


# The embedded model, converted once into the user's real $MEMLM_HOME and shared by all tests.
MODEL_CACHE = memlm_home() / "models"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Tests never touch the user's memories: each gets its own $MEMLM_HOME, in which only
    the converted embedded model is shared."""
    home = tmp_path / "memlm-home"
    home.mkdir()
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(MODEL_CACHE)
    monkeypatch.setenv("MEMLM_HOME", str(home))


@pytest.fixture(scope="session")
def embedded_lm():
    """The embedded model with default settings, a RAM store and float32 weights (for
    exactness), loaded once per run (converted from GGUF into MODEL_CACHE the first time)."""
    return MemoryLM.load(store=FaissStore(None), dtype="float32")


@pytest.fixture
def self_signed_cert(tmp_path):
    """(certificate, key) PEM files for localhost and 127.0.0.1, valid for a day."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
