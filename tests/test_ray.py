"""The model's layers in Ray actors (memlm/serve/ray_pipeline.py): blocks of layers give the
stock model's logits, and a 2-shard pipeline on a local Ray cluster (1 CPU per shard) gives
the same tokens as one process, directly and through the gRPC service."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyTokenizer, tiny_lm, tiny_model

from memlm.serve.client import MemoryClient
from memlm.serve.model_server import ModelServerConfig, serve
from memlm.serve.ray_pipeline import PipelineConfig, layer_blocks, load_pipelines, shard_model

SETTINGS = dict(segment_len=32, sink_len=4, local_len=16, block_len=4, top_k=2, query_chunk=8)
DOC = "The passkey is 7291. Remember it. " + "The grass is green and the sky is blue. " * 6
QUESTION = "What is the passkey?"


def test_layer_blocks():
    assert layer_blocks(30, 4) == [(0, 8), (8, 15), (15, 22), (22, 30)]
    assert layer_blocks(3, 1) == [(0, 3)]
    with pytest.raises(ValueError, match="shards must lie between 1 and"):
        layer_blocks(3, 4)


@torch.inference_mode()
def test_shards_chained_give_the_stock_logits():
    model = tiny_model("llama")
    ids = torch.randint(0, 120, (1, 20))
    first, second = (shard_model(model, block) for block in layer_blocks(3, 2))
    hidden = first.model(input_ids=ids).last_hidden_state
    logits = second(inputs_embeds=hidden).logits
    torch.testing.assert_close(logits, model(input_ids=ids).logits)


@pytest.fixture(scope="module")
def pipeline():
    config = PipelineConfig(shards=2, cpus_per_shard=1, store="memory", settings=dict(SETTINGS, memory_dtype="float32"))
    (engine,) = load_pipelines(config, model=tiny_model("llama"), tokenizer=TinyTokenizer())
    yield engine
    engine.close()


@pytest.mark.slow
def test_two_shards_give_the_same_tokens_as_one_process(pipeline):
    reference = tiny_lm(**SETTINGS, read="bag")  # the pipeline's read (PipelineConfig.memory_config)
    got, expected = pipeline.ingest(DOC, "doc", progress=False), reference.ingest(DOC, "doc", progress=False)
    assert (got.tokens, got.segments, got.memory_tokens) == (expected.tokens, expected.segments, expected.memory_tokens)
    assert got.memory_tokens > 0
    expected_tokens = [p.token_id for p in reference.stream(QUESTION, memory="doc", max_new_tokens=16)]
    assert [p.token_id for p in pipeline.stream(QUESTION, memory="doc", max_new_tokens=16)] == expected_tokens

    # The same through the gRPC service, which sees the pipeline as any MemoryLM.
    server = serve(ModelServerConfig(port=0, host="127.0.0.1"), engine=[pipeline])
    try:
        client = MemoryClient(f"127.0.0.1:{server.port}")
        client.ingest(DOC, memory="doc2")
        pieces = client.generate(QUESTION, memory="doc2", max_new_tokens=16)
        assert [token for piece in pieces for token in piece.token_ids] == expected_tokens
        assert [info.name for info in client.memories()] == ["doc", "doc2"]
        client.delete("doc2")
        assert [info.name for info in client.memories()] == ["doc"]
    finally:
        server.running.stop(0)  # the fixture closes the pipeline

    with pytest.raises(KeyError, match="no memory named 'nope'"):
        list(pipeline.stream(QUESTION, memory="nope"))
    pipeline.forget("doc")
    assert pipeline.memories() == []
