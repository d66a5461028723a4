"""Exactness: the memory model against the stock transformers model it wraps."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_lm, tiny_model

from memlm.memory.attention import attend, rotate, softmax_attention


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["window", "zero", "exact"])
def test_empty_memory_matches_stock_model(family: str, mode: str) -> None:
    lm = tiny_lm(family, segment_len=32, sink_len=4, local_len=64, position_mode=mode)
    ids = torch.randint(0, 120, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny_model(family)(ids).logits[0]
    stats = lm.ingest_tokens(ids[0].tolist(), "doc", progress=False, return_logits=True)
    assert stats.memory_tokens == 0, "nothing should have left the local window"
    torch.testing.assert_close(stats.logits, expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("block_len,query_chunk", [(4, 8), (1, 5)])
def test_fot_with_all_memory_retrieved_is_full_attention(family: str, block_len: int, query_chunk: int) -> None:
    """Exact positions and top_k >= memory size: segmented fot equals one causal pass."""
    lm = tiny_lm(
        family,
        segment_len=16,
        sink_len=4,
        local_len=16,
        block_len=block_len,
        top_k=10_000,
        query_chunk=query_chunk,
        position_mode="exact",
    )
    ids = torch.randint(0, 120, (1, 203), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = tiny_model(family)(ids).logits[0]
    stats = lm.ingest_tokens(ids[0].tolist(), "doc", progress=False, return_logits=True)
    assert stats.memory_tokens > 150, "most of the sequence must have come from memory"
    torch.testing.assert_close(stats.logits, expected)


def test_fot_with_too_small_top_k_is_not_full_attention() -> None:
    """The exactness test above can fail: with little retrieved, logits differ."""
    lm = tiny_lm(segment_len=16, sink_len=4, local_len=16, block_len=4, top_k=1, position_mode="exact")
    ids = torch.randint(0, 120, (1, 203), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = tiny_model()(ids).logits[0]
    got = lm.ingest_tokens(ids[0].tolist(), "doc", progress=False, return_logits=True).logits
    assert not torch.allclose(got[-50:], expected[-50:], atol=1e-4)


def test_knn_gate_closed_ignores_memory_and_open_uses_it() -> None:
    ids = torch.randint(0, 120, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    settings = dict(segment_len=16, sink_len=4, local_len=16, block_len=4, top_k=8, position_mode="zero")
    closed = tiny_lm(backend="knn", gate_init=-40.0, **settings).ingest_tokens(ids, "d", False, True).logits
    no_memory = tiny_lm(memory_layers=[], **settings).ingest_tokens(ids, "d", False, True).logits
    torch.testing.assert_close(closed, no_memory)
    opened = tiny_lm(backend="knn", gate_init=0.0, **settings).ingest_tokens(ids, "d", False, True).logits
    assert not torch.allclose(opened[-50:], no_memory[-50:], atol=1e-3)


def test_rotation_composes_and_inverts() -> None:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    x = torch.randn(2, 5, 16)
    positions = torch.tensor([0, 3, 100, 4000, 8191])
    there = rotate(x, positions, inv_freq)
    torch.testing.assert_close(rotate(there, -positions, inv_freq), x, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(rotate(rotate(x, positions, inv_freq), positions, inv_freq), rotate(x, 2 * positions, inv_freq), atol=1e-4, rtol=1e-4)


def test_local_attention_kernel_matches_masked_softmax() -> None:
    """The fused kernel path (prefix + causal, merged by log-sum-exp) against plain maths."""
    g = torch.Generator().manual_seed(4)
    queries, prefix = torch.randn(2, 3, 7, 8, generator=g), 5
    keys, values = torch.randn(2, prefix + 7, 8, generator=g), torch.randn(2, prefix + 7, 8, generator=g)
    got = attend(queries, keys[:, :prefix], values[:, :prefix], keys[:, prefix:], values[:, prefix:], 0.3)
    scores = torch.einsum("hgtd,hld->hgtl", queries, keys) * 0.3
    visible = torch.arange(prefix + 7)[None, :] <= torch.arange(7)[:, None] + prefix
    scores = scores.masked_fill(~visible, float("-inf"))
    torch.testing.assert_close(got.out, torch.einsum("hgtl,hld->hgtd", scores.softmax(-1), values))
    torch.testing.assert_close(got.lse, scores.logsumexp(-1))
    plain = softmax_attention(queries, keys[:, None], values[:, None], 0.3, causal=False)
    torch.testing.assert_close(plain.lse, (torch.einsum("hgtd,hld->hgtl", queries, keys) * 0.3).logsumexp(-1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_xl_with_mem_len_covering_the_past_is_full_attention(family: str) -> None:
    lm = tiny_lm(family, backend="xl", segment_len=16, local_len=256)
    ids = torch.randint(0, 120, (1, 203), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = tiny_model(family)(ids).logits[0]
    stats = lm.ingest_tokens(ids[0].tolist(), "doc", progress=False, return_logits=True)
    torch.testing.assert_close(stats.logits, expected)
    assert lm.store.stats("doc").tokens == 0, "xl keeps its cache in the memory's state, not in the vector store"


def test_xl_forgets_beyond_mem_len() -> None:
    """Past mem_len, the oldest tokens are gone: logits differ from full attention."""
    lm = tiny_lm(backend="xl", segment_len=16, local_len=32)
    ids = torch.randint(0, 120, (1, 203), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = tiny_model()(ids).logits[0]
    got = lm.ingest_tokens(ids[0].tolist(), "doc", progress=False, return_logits=True).logits
    torch.testing.assert_close(got[:48], expected[:48])  # everything still inside mem_len + segment
    assert not torch.allclose(got[-50:], expected[-50:], atol=1e-4)


def test_xl_cache_carries_no_gradient() -> None:
    """Segment 2's loss reaches the weights through segment 2 alone: the cache of segment 1
    is a constant (stop-gradient), so its values get no gradient and are leaves."""
    from memlm.memory.session import MemorySession

    lm = tiny_lm(backend="xl", segment_len=16, local_len=64)
    session = MemorySession(lm.shape, lm.config, lm.backend, lm.store, "doc", writes=True)
    for start in (0, 16):
        segment = list(range(start + 1, start + 17))
        positions = session.positions_for(16).unsqueeze(0)
        logits = lm.model(input_ids=torch.tensor([segment]), position_ids=positions, memory_session=session).logits
        session.advance(segment)
    assert all(not w.keys.requires_grad and not w.values.requires_grad for w in session.windows)
    logits.sum().backward()
    assert lm.model.model.embed_tokens.weight.grad is not None


# -- rmt ----------------------------------------------------------------------------------


def test_rmt_segment_is_the_stock_model_on_memory_segment_memory() -> None:
    """An rmt ingest segment is the unchanged model run on [sink ; memory ; tokens ; memory]."""
    lm = tiny_lm(backend="rmt", segment_len=16, num_mem_tokens=3)
    ids = torch.randint(0, 120, (16,), generator=torch.Generator().manual_seed(4)).tolist()
    logits = lm.ingest_tokens(ids, "doc", progress=False, return_logits=True).logits
    model = tiny_model()
    memory = lm.backend.memory.detach()
    with torch.no_grad():
        embed = model.get_input_embeddings()
        sink = embed(torch.tensor([model.config.bos_token_id]))
        inputs = torch.cat([sink, memory, embed(torch.tensor(ids)), memory]).unsqueeze(0)
        out = model(inputs_embeds=inputs, output_hidden_states=True)
    torch.testing.assert_close(logits, out.logits[0, 4:-3])
    state = lm.store.load_state("doc")["rmt_state"]
    torch.testing.assert_close(torch.from_numpy(state), lm.backend.written(model, out.hidden_states[-1][0, -3:]).detach())


def test_rmt_gradients_reach_memory_tokens_through_three_segments() -> None:
    """A loss on what a generation reads after three segments reaches the initial memory
    tokens, and only through the memory: cut the recurrence and the gradient is gone."""
    lm = tiny_lm(backend="rmt", segment_len=8, num_mem_tokens=2)
    ids = torch.randint(0, 120, (24,), generator=torch.Generator().manual_seed(5)).tolist()

    def grad_of_answer(cut_after_first: bool) -> torch.Tensor:
        lm.backend.memory.grad = None
        writer = lm._new_session("x", writes=True, state=None)
        for number, start in enumerate(range(0, 24, 8)):
            writer.forward(ids[start : start + 8], logits="none")
            if number == 0 and cut_after_first:
                writer.memory_state = writer.memory_state.detach()
        logits = writer.reader().forward([1, 2, 3], logits="all")
        logits[-1, 7].backward()
        return lm.backend.memory.grad

    grad = grad_of_answer(cut_after_first=False)
    assert grad is not None and grad.abs().sum() > 0
    assert grad_of_answer(cut_after_first=True) is None
