"""MemoryLM behaviour on tiny random models: generation, FIFO, isolation, persistence, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_lm, tiny_model

from memlm.config import MemoryConfig
from memlm.engine import MemoryLM
from memlm.model.loading import ModelLoadError, load_model
from memlm.store import FaissStore, MemoryNotFound

EXACT = dict(segment_len=16, sink_len=4, local_len=16, block_len=4, top_k=10_000, position_mode="exact")


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 120, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_generation_from_memory_equals_stock_greedy_over_whole_context() -> None:
    """Decoding with the local KV cache and memory read at every step, with everything
    retrievable and exact positions, is greedy decoding over document + prompt."""
    lm = tiny_lm(**EXACT, read="bag")
    document, prompt = random_ids(150, 5), "hello there"
    lm.ingest_tokens(document, "doc", progress=False)
    result = lm.generate_full(prompt, memory="doc", chat=False, max_new_tokens=12)
    prompt_ids = lm.prompt_ids(prompt, chat=False)
    stock = tiny_model()
    stock.generation_config.eos_token_id = None
    expected = stock.generate(
        torch.tensor([document + prompt_ids]), max_new_tokens=12, do_sample=False, pad_token_id=0
    )[0, 150 + len(prompt_ids) :].tolist()
    assert result.token_ids == expected[: len(result.token_ids)]
    assert len(result.token_ids) >= 1


@pytest.mark.parametrize("read", ["passages", "bag"])
def test_generation_reads_memory_and_does_not_change_it(read: str) -> None:
    lm = tiny_lm(segment_len=16, sink_len=4, local_len=16, block_len=4, top_k=2, read=read, read_blocks=2,
                 read_candidates=2, read_context=4)
    lm.ingest_tokens(random_ids(300, 6), "doc", progress=False)
    before = lm.store.stats("doc"), lm.store.load_state("doc")["next_position"]
    result = lm.generate_full("what now", memory="doc", chat=False, max_new_tokens=5)
    # Random ids hold no word of the question: the (default) lexical read falls back on the votes.
    assert result.evidence, "the question must have read memory"
    if read == "bag":  # every head read its own top_k blocks
        assert all(r.positions.shape[2] == 2 for r in result.retrieved.values())
    else:  # two blocks, each widened by 4 tokens on either side
        assert not result.retrieved and sum(p.end - p.start for p in result.evidence) <= 2 * (4 + 4 + 4)
    assert (lm.store.stats("doc"), lm.store.load_state("doc")["next_position"]) == before


def test_sampling_is_seeded_and_respects_stop_strings() -> None:
    lm = tiny_lm(segment_len=16, sink_len=4, local_len=16, block_len=4)
    first = lm.generate("abc", chat=False, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert first == lm.generate("abc", chat=False, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    greedy = lm.generate_full("abc", chat=False, max_new_tokens=10)
    assert greedy.finish_reason in ("length", "stop")
    stop_at = greedy.text[3:5]
    stopped = lm.generate_full("abc", chat=False, max_new_tokens=10, stop=[stop_at])
    assert stopped.finish_reason == "stop" and stopped.text == greedy.text[: greedy.text.index(stop_at)]


def test_fifo_keeps_the_newest_entries() -> None:
    lm = tiny_lm(segment_len=16, sink_len=4, local_len=16, block_len=4, max_memory_tokens=40)
    lm.ingest_tokens(random_ids(300, 7), "doc", progress=False)
    stats = lm.store.stats("doc")
    assert stats.tokens == 40
    found = lm.store.search("doc", 0, np.random.default_rng(0).normal(size=(2, 1, 16)).astype(np.float32), 100)
    positions = np.unique(found.positions)
    newest_evicted = 300 - 16  # the local window holds 16..19 of the last tokens
    assert positions.min() >= newest_evicted - 40 - 4 and len(positions) == 40


def test_memories_are_isolated_by_name() -> None:
    store = FaissStore(None)
    alone = tiny_lm(store=store, **EXACT)
    alone.ingest_tokens(random_ids(200, 8), "a", progress=False)
    expected = alone.generate_full("question", memory="a", chat=False, max_new_tokens=6).token_ids
    shared = tiny_lm(store=FaissStore(None), **EXACT)
    shared.ingest_tokens(random_ids(200, 8), "a", progress=False)
    shared.ingest_tokens(random_ids(400, 9), "b", progress=False)
    assert shared.generate_full("question", memory="a", chat=False, max_new_tokens=6).token_ids == expected
    assert shared.generate_full("question", memory="b", chat=False, max_new_tokens=6).token_ids != expected
    shared.forget("b")
    assert shared.memories() == ["a"]


def test_ingest_then_ask_in_two_processes(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, json
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from conftest import tiny_lm
        from memlm.store import FaissStore
        lm = tiny_lm(store=FaissStore({str(tmp_path / "store")!r}), segment_len=16, sink_len=4, local_len=16,
                     block_len=4, top_k=3)
        if sys.argv[1] == "ingest":
            lm.ingest_tokens(list(range(5, 105)) * 3, "doc", progress=False)
        else:
            print(json.dumps(lm.generate_full("q?", memory="doc", chat=False, max_new_tokens=8).token_ids))
        """
    )
    run = lambda step: subprocess.run(  # noqa: E731
        [sys.executable, "-c", script, step], capture_output=True, text=True, check=True
    ).stdout
    run("ingest")
    in_other_process = run("ask")
    lm = tiny_lm(segment_len=16, sink_len=4, local_len=16, block_len=4, top_k=3)
    lm.ingest_tokens(list(range(5, 105)) * 3, "doc", progress=False)
    assert in_other_process.strip() == str(lm.generate_full("q?", memory="doc", chat=False, max_new_tokens=8).token_ids)


class FailingStore(FaissStore):
    """Breaks on the n-th add, as a full disk or a killed ingest would."""

    def __init__(self, root, fail_at: int):
        super().__init__(root)
        self.adds, self.fail_at = 0, fail_at

    def add(self, memory, layer, blocks):
        self.adds += 1
        if self.adds == self.fail_at:
            raise KeyboardInterrupt("interrupted mid-ingest")
        super().add(memory, layer, blocks)


@pytest.mark.parametrize("persisted", [False, True])
def test_failed_ingest_leaves_memory_as_it_was(tmp_path, persisted: bool) -> None:
    store = FailingStore(tmp_path if persisted else None, fail_at=10**9)
    lm = tiny_lm(store=store, segment_len=16, sink_len=4, local_len=16, block_len=4, max_memory_tokens=64)
    lm.ingest_tokens(random_ids(200, 10), "doc", progress=False)
    before = lm.generate_full("q", memory="doc", chat=False, max_new_tokens=6).token_ids
    stats = store.stats("doc")
    store.adds, store.fail_at = 0, 20
    with pytest.raises(KeyboardInterrupt):
        lm.ingest_tokens(random_ids(300, 11), "doc", progress=False)
    assert store.stats("doc") == stats
    assert lm.generate_full("q", memory="doc", chat=False, max_new_tokens=6).token_ids == before
    store.adds, store.fail_at = 0, 5
    with pytest.raises(KeyboardInterrupt):
        lm.ingest_tokens(random_ids(300, 12), "new", progress=False)
    assert store.memories() == ["doc"]
    if persisted:
        assert FaissStore(tmp_path).stats("doc") == stats


def test_bad_input_is_refused_with_a_clear_message() -> None:
    lm = tiny_lm(segment_len=16, sink_len=4, local_len=16, block_len=4)
    lm.ingest_tokens(random_ids(100, 13), "doc", progress=False)
    stats = lm.store.stats("doc")
    with pytest.raises(ValueError, match="empty"):
        lm.ingest("   ", "doc")
    for name in ("../etc", "probe\n", "a" * 129):  # "$" matches before a final newline: the name is checked whole
        with pytest.raises(ValueError, match="bad memory name"):
            lm.ingest("text", name)
    assert lm.memories() == ["doc"]
    with pytest.raises(ValueError, match="token ids"):
        lm.ingest_tokens([1, 2, 999], "doc")
    with pytest.raises(MemoryNotFound, match="known memories: doc"):
        lm.generate("q", memory="nope")
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate("q", memory="doc", max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        lm.generate("q", memory="doc", temperature=-1)
    with pytest.raises(ValueError, match="prompt is empty"):
        lm.generate("", memory="doc")
    assert lm.store.stats("doc") == stats


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        MemoryConfig(top_k=0).validate(3, 4096)
    with pytest.raises(ValueError, match="more than the model's context"):
        MemoryConfig(segment_len=8192).validate(3, 4096)
    with pytest.raises(ValueError, match="out of range"):
        MemoryConfig(memory_layers=[5]).validate(3, 4096)
    with pytest.raises(ValueError, match="unknown backend"):
        tiny_lm(backend="nope")
    with pytest.raises(ModelLoadError, match="no model at"):
        load_model("/nonexistent/model")
    with pytest.raises(ValueError, match="unknown dtype"):
        MemoryLM.load(dtype="int3")


def test_reading_a_memory_with_other_storage_settings_is_refused() -> None:
    store = FaissStore(None)
    tiny_lm(store=store, segment_len=16, sink_len=4, local_len=16, block_len=4).ingest_tokens(
        random_ids(100, 14), "doc", progress=False
    )
    other = tiny_lm(store=store, segment_len=16, sink_len=4, local_len=16, block_len=8)
    with pytest.raises(ValueError, match="was written with"):
        other.generate("q", memory="doc")


def test_rmt_state_round_trips_and_memories_never_mix(tmp_path) -> None:
    """The saved memory state continues in a new process exactly as in the old one, and
    ingesting one memory leaves another untouched."""
    from memlm.store import FaissStore

    settings = dict(backend="rmt", segment_len=16, num_mem_tokens=4)
    a = torch.randint(0, 120, (48,), generator=torch.Generator().manual_seed(6)).tolist()  # whole segments
    b = torch.randint(0, 120, (40,), generator=torch.Generator().manual_seed(7)).tolist()
    lm = tiny_lm(store=FaissStore(tmp_path / "store"), **settings)
    lm.ingest_tokens(a, "a", progress=False)
    state_a = lm.store.load_state("a")["rmt_notes"].tolist()
    lm.ingest_tokens(b, "b", progress=False)
    assert lm.store.load_state("a")["rmt_notes"].tolist() == state_a and len(state_a) == 4
    assert lm.store.load_state("b")["rmt_notes"].tolist() != state_a
    expected = lm.generate("question", memory="a", max_new_tokens=6, chat=False)
    assert lm.generate("question", memory="b", max_new_tokens=6, chat=False) != expected

    # A new process: the same weights, the store reopened from disk.
    reopened = tiny_lm(store=FaissStore(tmp_path / "store"), **settings)
    assert reopened.generate("question", memory="a", max_new_tokens=6, chat=False) == expected
    # Appending continues from the saved state: a, then more == one ingest of a + more.
    reopened.ingest_tokens(b[:16], "a", progress=False)
    whole = tiny_lm(**settings)
    whole.ingest_tokens(a + b[:16], "whole", progress=False)
    notes = lambda lm, name: lm.store.load_state(name)["rmt_notes"].tolist()  # noqa: E731
    assert notes(reopened, "a") == notes(whole, "whole")
