"""Exactness: the memory model against the stock transformers model it wraps."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
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


def test_installed_model_without_memory_is_the_stock_model_after_a_cached_prefix() -> None:
    """Outside memory attention the model must stay stock, also when a chunk of several tokens
    follows cached ones (a prompt after a cached document) and in greedy generation from that cache."""
    stock, installed = tiny_model(), tiny_lm().model
    ids = torch.randint(0, 120, (1, 300), generator=torch.Generator().manual_seed(2))
    prompt = torch.tensor([[5, 6, 7, 8]])
    outputs = []
    with torch.inference_mode():
        for model in (stock, installed):
            cache = DynamicCache(config=model.config)
            model(ids, past_key_values=cache)
            logits = model(prompt, past_key_values=cache).logits[0]
            cache.crop(-prompt.shape[1])
            tokens = model.generate(torch.cat([ids, prompt], 1), past_key_values=cache, max_new_tokens=6,
                                    do_sample=False, pad_token_id=0)  # fmt: skip
            outputs.append((logits, tokens))
    torch.testing.assert_close(outputs[1][0], outputs[0][0])
    assert outputs[1][1].tolist() == outputs[0][1].tolist()


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


def test_xl_keeps_its_attention_sink_in_view() -> None:
    """The first sink_len tokens stay visible to every later segment (a pretrained model needs
    its sink); a token just after them, older than the window reaches, is forgotten."""
    lm = tiny_lm(backend="xl", segment_len=16, local_len=32, sink_len=4)
    ids = torch.randint(0, 120, (203,), generator=torch.Generator().manual_seed(6))

    def last_segment(tokens: torch.Tensor, name: str) -> torch.Tensor:
        return lm.ingest_tokens(tokens.tolist(), name, progress=False, return_logits=True).logits[-16:]

    base = last_segment(ids, "base")
    in_sink, past_sink = ids.clone(), ids.clone()
    in_sink[2], past_sink[10] = (ids[2] + 1) % 120, (ids[10] + 1) % 120
    assert not torch.allclose(last_segment(in_sink, "sink"), base, atol=1e-4)
    torch.testing.assert_close(last_segment(past_sink, "forgotten"), base)


def test_xl_cache_carries_no_gradient() -> None:
    """Segment 2's loss reaches the weights through segment 2 alone: the cache of segment 1
    is a constant (stop-gradient), so its values get no gradient and are leaves."""
    from memlm.memory.session import MemorySession

    lm = tiny_lm(backend="xl", segment_len=16, local_len=64)
    session = MemorySession(lm.model, lm.shape, lm.config, lm.backend, lm.store, "doc", writes=True)
    for start in (0, 16):
        logits = session.forward(list(range(start + 1, start + 17)), logits="all")
    assert all(not w.keys.requires_grad and not w.values.requires_grad for w in session.windows)
    logits.sum().backward()
    assert lm.model.model.embed_tokens.weight.grad is not None


# -- rmt ----------------------------------------------------------------------------------


def stock_greedy_notes(model, inputs: torch.Tensor, max_notes: int, end: int) -> list[int]:
    """What the stock model writes after `inputs` (T, hidden), greedily, without a cache."""
    notes: list[int] = []
    embed = model.get_input_embeddings()
    while len(notes) < max_notes:
        x = torch.cat([inputs, embed(torch.tensor(notes, dtype=torch.long))]).unsqueeze(0)
        next_id = int(model(inputs_embeds=x).logits[0, -1].argmax())
        if next_id == end:
            break
        notes.append(next_id)
    return notes


def test_rmt_segments_are_the_stock_model_on_notes_segment_write_prompt() -> None:
    """Each rmt ingest segment is the unchanged model run on [sink ; notes ; tokens ; write
    prompt], the notes it adds are the stock model's greedy continuation of that, and the
    memory keeps the last num_mem_tokens notes."""
    lm = tiny_lm(backend="rmt", segment_len=16, num_mem_tokens=5)
    ids = torch.randint(0, 120, (32,), generator=torch.Generator().manual_seed(4)).tolist()
    logits = lm.ingest_tokens(ids, "doc", progress=False, return_logits=True).logits
    model = tiny_model()
    prompt, end = lm.backend.write_prompt.detach(), lm.backend.end_token_id
    notes: list[int] = []
    with torch.no_grad():
        embed = model.get_input_embeddings()
        for number, start in enumerate(range(0, 32, 16)):
            read = embed(torch.tensor([model.config.bos_token_id, *notes]))
            inputs = torch.cat([read, embed(torch.tensor(ids[start : start + 16])), prompt])
            expected = model(inputs_embeds=inputs.unsqueeze(0)).logits[0, len(read) : len(read) + 16]
            torch.testing.assert_close(logits[start : start + 16], expected)
            notes = (notes + stock_greedy_notes(model, inputs, 5, end))[-5:]
    assert lm.store.load_state("doc")["rmt_notes"].tolist() == notes and len(notes) == 5


def test_rmt_answer_gradient_reaches_the_first_write_through_three_segments() -> None:
    """In training, a loss on what a generation reads after three segments reaches the write
    prompt through the notes the first segment wrote (the later ones write none), and only
    through them: cut the recurrence after the first segment and the gradient is gone."""
    lm = tiny_lm(backend="rmt", segment_len=8, num_mem_tokens=4)
    ids = torch.randint(0, 120, (24,), generator=torch.Generator().manual_seed(5)).tolist()

    def grad_of_answer(cut_after_first: bool) -> torch.Tensor | None:
        lm.backend.write_prompt.grad = None
        writer = lm.open_session("x", writes=True)
        for number, start in enumerate(range(0, 24, 8)):
            writer.learn(ids[start : start + 8], notes=[5, 6] if number == 0 else [])
            if number == 0 and cut_after_first:
                writer.cut()
        assert writer.notes == [5, 6]
        logits = writer.reader().forward([1, 2, 3], logits="all")
        logits[-1, 7].backward()
        return lm.backend.write_prompt.grad

    grad = grad_of_answer(cut_after_first=False)
    assert grad is not None and grad.abs().sum() > 0
    cut = grad_of_answer(cut_after_first=True)
    assert cut is None or cut.abs().sum() == 0
