"""The dense index (memlm/memory/dense.py): windows embedded while the ingest runs, into the
memory's own store (FAISS files, LanceDB, the gRPC store), committed, rolled back and
persisted with the memory; a memory refuses a reader set to another embedder; the fused
first stage finds a paraphrased fact that shares no rare word with its question; a
follow-up question reads for the subject an earlier turn named. Tiny random LMs with the
real all-MiniLM-L6-v2 embedder (the read needs no trained LM to pick its passages)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from memlm.engine import IngestCancelled
from memlm.memory.dense import DENSE_LAYER, search_windows, window_spans
from memlm.memory.reading import Passage, Words, question_sentences, sentence_starts
from memlm.model.embedder import Embedder, embedder_dir
from memlm.store import open_store
from tests.conftest import tiny_lm
from tests.store_fixtures import free_port, running_server

SETTINGS = dict(segment_len=128, sink_len=8, local_len=64, block_len=8, read_context=16, dense_window=12,
                dense_stride=6)  # fmt: skip

# Facts of one kind each, so that a question's common words ("the", "is") do not tell them apart.
FACTS = [
    "The museum on Harbour Street opens its doors at nine every weekday morning.",
    "The swimming pool on Mill Lane opens at seven, before the schools start.",
    "Our bakery sells rye bread, cinnamon buns and almond cakes until the afternoon.",
    "The chess club meets in the library basement on Thursday evenings.",
    "Parking permits for residents are issued by the town hall on the main square.",
    "The swimming pool closes for cleaning during the first week of August.",
    "Volunteers repaint the old lighthouse every spring before the tourists arrive.",
    "The Varholm ferry leaves from pier nine at dawn and returns at dusk.",
    "A choir of sixty singers performs in the cathedral at Christmas.",
    "The town's football team trains on the field behind the secondary school.",
    "Farmers bring cheese, apples and honey to the market every Saturday.",
]


def document(repeats: int = 3) -> str:
    """The facts in several orders: a document of some 2,000 characters (tokens: bytes)."""
    rng = np.random.default_rng(0)
    return "\n\n".join(" ".join(FACTS[i] for i in rng.permutation(len(FACTS))) for _ in range(repeats))


def dense_blocks(store, memory: str) -> int:
    return store.stats(memory).blocks_per_layer.get(DENSE_LAYER, 0)


@pytest.fixture(params=["faiss", "lance", "grpc"])
def store_url(request, tmp_path):
    if request.param == "faiss":
        yield f"faiss://{tmp_path / 'faiss'}"
    elif request.param == "lance":
        yield f"lance://{tmp_path / 'lance'}"
    else:
        port = free_port()
        with running_server(tmp_path / "served", port=port):
            yield f"grpc://127.0.0.1:{port}"


def test_the_dense_index_is_written_committed_rolled_back_and_kept_across_a_restart(store_url: str) -> None:
    lm = tiny_lm(store=open_store(store_url), **SETTINGS)
    text = document()
    lm.ingest(text, "doc", progress=False)
    pieces = lm.token_texts(lm.text_ids(text))
    spans, _ = window_spans(pieces, SETTINGS["dense_window"], SETTINGS["dense_stride"], final=True)
    assert dense_blocks(lm.store, "doc") == len(spans) > 10  # written in step, segment by segment
    query = lm.embedder.embed(["When does the boat to the island depart?"])[0]
    before = search_windows(lm.store, "doc", query, 5)
    assert [(w.start, w.end) for w in before][0] in spans

    # A cancelled ingest into the same memory leaves its dense index as it was.
    segments = iter(range(100))
    with pytest.raises(IngestCancelled):
        lm.ingest(text, "doc", progress=False, cancelled=lambda: next(segments) >= 2)
    assert dense_blocks(lm.store, "doc") == len(spans)
    assert search_windows(lm.store, "doc", query, 5) == before

    # An ingest that appends goes on from where the index stopped: no window twice, none missed.
    more = "The ferry timetable changes in winter, when the boat sails only on Sundays."
    lm.ingest(more, "doc", progress=False)
    grown = dense_blocks(lm.store, "doc")
    assert grown > len(spans)
    close = getattr(lm.store, "close", None)
    if close is not None:
        close()

    # A new process (a new store object over the same data) finds the same index.
    reopened = tiny_lm(store=open_store(store_url), **SETTINGS)
    assert dense_blocks(reopened.store, "doc") == grown
    windows = search_windows(reopened.store, "doc", query, grown)
    starts = sorted(w.start for w in windows)
    assert starts[0] == 0 and max(w.end for w in windows) == len(lm.text_ids(text)) + len(lm.text_ids(more))
    assert len(set(starts)) == grown


def test_a_memory_refuses_a_reader_set_to_another_embedder(tmp_path) -> None:
    lm = tiny_lm(store=open_store(f"faiss://{tmp_path / 'store'}"), **SETTINGS)
    lm.ingest(document(1), "doc", progress=False)
    other = tmp_path / "my-embedder"
    shutil.copytree(embedder_dir("all-MiniLM-L6-v2"), other)  # the same weights, under another name
    for embedder in (str(other), None):
        reader = tiny_lm(store=open_store(f"faiss://{tmp_path / 'store'}"), **{**SETTINGS, "embedder": embedder})
        with pytest.raises(ValueError, match="indexed with embedder 'all-MiniLM-L6-v2'"):
            reader.generate("When does the ferry leave?", memory="doc", chat=False, max_new_tokens=1)
    # A checkpoint directory works as an embedder of its own name; a missing one is refused at load.
    assert Embedder.load(str(other)).name == "my-embedder"
    with pytest.raises(ValueError, match="no embedder at"):
        tiny_lm(**{**SETTINGS, "embedder": str(tmp_path / "missing")})


def paraphrase_lm(**settings):
    lm = tiny_lm(**{**SETTINGS, "read_blocks": 1, **settings})
    lm.ingest(document(), "doc", progress=False)
    return lm


def evidence_text(lm, result) -> str:
    """What the read quoted, with its bytes as the tiny tokenizer keeps them (`seen`)."""
    return " ".join(lm.tokenizer.decode(lm.store.load_state("doc")["token_ids"][p.start : p.end]) for p in result.evidence)


def seen(lm, text: str) -> str:
    """`text` as the tiny tokenizer gives it back (a byte >= 120 wraps around: "y" is "\x01")."""
    return lm.tokenizer.decode(lm.text_ids(text))


def test_fusion_puts_a_paraphrased_fact_first() -> None:
    """The question shares no rare word with the ferry's sentence: words alone rank other
    facts first; fused with the dense index, the ferry's passage is read."""
    question = "When does the boat to the island depart?"
    fused = paraphrase_lm()
    result = fused.generate_full(question, memory="doc", chat=False, max_new_tokens=1)
    assert seen(fused, "Varholm ferry leaves") in evidence_text(fused, result)
    assert result.candidates and min(p.rank for p in result.candidates) == 0
    words_only = paraphrase_lm(embedder=None)
    result = words_only.generate_full(question, memory="doc", chat=False, max_new_tokens=1)
    assert seen(words_only, "Varholm ferry leaves") not in evidence_text(words_only, result)


def test_a_follow_up_question_reads_for_the_earlier_turns_subject() -> None:
    """"When does it open?" names no place: read for the conversation, the earlier turn
    decides whose opening time is read."""
    lm = paraphrase_lm()
    for place, fact in (("the museum on Harbour Street", "museum on Harbour Street opens"),
                        ("the swimming pool on Mill Lane", "swimming pool on Mill Lane opens")):  # fmt: skip
        turns = [{"role": "user", "content": f"I would like to visit {place}."},
                 {"role": "assistant", "content": "That is a good idea."},
                 {"role": "user", "content": "When does it open?"}]  # fmt: skip
        result = lm.generate_full(turns, memory="doc", chat=False, max_new_tokens=1)
        assert seen(lm, fact) in evidence_text(lm, result), place


def test_the_trim_keeps_the_sentence_most_like_the_question_and_what_a_colon_announces() -> None:
    pieces = list("Vim has many commands. To leave and throw away changes, there is one: >\n\n\t:q!\n\nUnrelated text here.")
    passage = Passage(0, len(pieces), 1.0, 0)
    texts = []

    def similarity(sentences: list[str]) -> np.ndarray:
        texts.extend(sentences)
        return np.array([1.0 if "throw away" in s else 0.0 for s in sentences])

    (kept,) = question_sentences(passage, pieces, {}, similarity)  # no word of the question matched
    text = "".join(pieces[kept.start : kept.end])
    assert "throw away changes" in text and ":q!" in text and "Unrelated" not in text
    starts, _ = sentence_starts(pieces)
    assert len(texts) == len(starts)
    assert question_sentences(passage, pieces, {}) == [passage]  # nothing picks a sentence: the whole passage
    assert Words.of(pieces).text[0] == "vim"
