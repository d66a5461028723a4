"""`memlm bench train`: tail perplexity as computed by hand, split ingest as exact as one call,
configurations without their adapter skipped, without-memory numbers shared by backends."""

from __future__ import annotations

import math

import torch
from conftest import tiny_lm

from memlm.bench.train import (
    TrainBenchConfig,
    build,
    document_nlls,
    measure_perplexity,
    tail_logits,
    tail_nll,
    without_memory,
)
from memlm.config import MemoryConfig
from memlm.train.adapter import save_adapter

SMALL = dict(segment_len=16, sink_len=4, local_len=16, block_len=4, top_k=4)


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 120, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_tail_nll_is_the_mean_cross_entropy_of_the_last_tokens() -> None:
    ids = [5, 0, 2, 1]
    # Rows predict ids[2] = 2 and ids[3] = 1 (row t predicts the token after the t-th of the tail's context).
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 3.0, 0.0]])
    first = -(2.0 - math.log(math.exp(0.0) + math.exp(1.0) + math.exp(2.0)))
    second = -(3.0 - math.log(math.exp(1.0) + math.exp(3.0) + math.exp(0.0)))
    assert math.isclose(tail_nll(logits, ids, tail=2), (first + second) / 2, rel_tol=1e-6)


def test_tail_logits_equal_those_of_one_ingest() -> None:
    lm = tiny_lm(**SMALL)
    ids = random_ids(100)
    whole = lm.ingest_tokens(ids, "whole", progress=False, return_logits=True).logits
    # 100 tokens, tail 20: split after 64 (a segment boundary), then 36 tokens with logits.
    torch.testing.assert_close(tail_logits(lm, ids, 20, "split"), whole[-21:-1])
    assert lm.store.stats("split").tokens == lm.store.stats("whole").tokens > 0


def test_configurations_without_their_adapter_are_skipped(tmp_path) -> None:
    gates = tiny_lm(backend="knn", **SMALL)
    save_adapter(gates, tmp_path / "gates.safetensors", "knn-gates", {"command": "test"})
    config = TrainBenchConfig(fot_adapter=tmp_path / "missing.safetensors", knn_adapter=tmp_path / "gates.safetensors")
    variants, skipped = config.variants()
    assert [v.name for v in variants] == ["fot", "knn", "knn+gates"]
    assert list(skipped) == ["fot+lora"] and "missing.safetensors" in skipped["fot+lora"]


def test_gates_share_the_weights_and_matter_only_with_memory(tmp_path) -> None:
    trained = tiny_lm(backend="knn", **SMALL)
    with torch.no_grad():
        trained.backend.gate_bias.fill_(3.0)
    save_adapter(trained, tmp_path / "gates.safetensors", "knn-gates", {"command": "test"})
    base = tiny_lm(**SMALL)
    config = TrainBenchConfig(knn_adapter=tmp_path / "gates.safetensors")
    variants = {v.name: v for v in config.variants()[0]}
    settings = MemoryConfig(memory_dtype="float32", **SMALL)
    lms = {name: build(variants[name], base.model, base.tokenizer, None, settings) for name in ("fot", "knn+gates")}
    assert lms["knn+gates"].model is base.model and float(lms["knn+gates"].backend.gate_bias.detach()[0, 0]) == 3.0
    docs = [random_ids(64)]  # 48 tokens before the tail: more than the sinks and local window hold
    # Without memory layers the backend takes no part: bench train measures that once per weights.
    bare = [document_nlls(without_memory(lm), docs, 16, name) for name, lm in lms.items()]
    assert bare[0] == bare[1]
    fot = measure_perplexity(lms["fot"], docs, 16, "fot")
    gated = measure_perplexity(lms["knn+gates"], docs, 16, "knn+gates", bare_nlls=fot["nll_without_memory"])
    assert gated["without_memory"] == fot["without_memory"] and gated["with_memory"] != fot["with_memory"]
    assert all(math.isfinite(cell[key]) for cell in (fot, gated) for key in ("with_memory", "without_memory"))
