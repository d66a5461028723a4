"""The passage read (memlm/memory/reading.py): the question's own queries, votes, passages in
document order, and the re-read that is a plain forward pass over them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from memlm.engine import quoted_prompt
from memlm.memory.reading import (
    HeadProfile,
    Passage,
    Words,
    add_votes,
    evidence_found,
    evidence_rank,
    fuse,
    lexical_scores,
    new_votes,
    question_sentences,
    question_span,
    reread_ids,
    select_passages,
    sentence_starts,
    term_weights,
    token_spans,
)
from memlm.store.base import SearchResult
from memlm.tasks import prose_needles
from tests.conftest import tiny_lm, tiny_model


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 120, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_question_span_is_what_differs_from_the_empty_template() -> None:
    template = [1, 2, 3, 4, 5]  # [system, user-start, (question), user-end, assistant-start]
    with_question = [1, 2, 3, 70, 71, 72, 4, 5]
    assert question_span(with_question, template) == slice(3, 6)
    with pytest.raises(ValueError, match="no tokens of its own"):
        question_span(template, template)


def test_the_embedded_chat_prompt_searches_with_the_question_tokens_only(embedded_lm) -> None:
    question = "Which city did Lena Sato move to?"
    prompt = embedded_lm.prompt_ids(question)
    span = embedded_lm.question_span(question)
    assert len(prompt) > 20  # the template's system text is most of the prompt
    asked = embedded_lm.tokenizer.decode(prompt[span])
    assert asked.strip() == question
    assert embedded_lm.question_span(question, chat=False) == slice(0, len(embedded_lm.prompt_ids(question, chat=False)))
    assert "Answer briefly." in embedded_lm.tokenizer.decode(embedded_lm.prompt_ids(question, system="Answer briefly."))


def test_the_quote_read_quotes_in_the_questions_turn_under_a_system_turn_of_its_own(embedded_lm, monkeypatch) -> None:
    """The quote read's chat prompt says the answer is in the quoted text (`quote_system`):
    under the template's own system turn the 135M model dropped the first token of quoted codes.
    Of chat turns, the last user turn is the question: read for and quoted in alone."""
    task = prose_needles(3_000, [0.2], seed=5)[0]
    embedded_lm.ingest(task.document, memory="system-turn", progress=False)
    try:
        session = embedded_lm.open_session("system-turn", writes=False)
        _, inputs, evidence, _ = embedded_lm._read_for(session, task.question, embedded_lm.prompt_ids(task.question), True)
        asked = embedded_lm.tokenizer.decode(inputs)
        assert embedded_lm.config.quote_system in asked and "SmolLM" not in asked
        assert task.evidence[0] in asked  # quoted
        assert asked.endswith(f"Question: {task.question}<|im_end|>\n<|im_start|>assistant\n")
        # The earlier turns (about the archive, another of the document's places) count less than
        # the question's own words (a follow-up leans on them): the same passage is read.
        turns = [{"role": "user", "content": "Is the archive open?"}, {"role": "assistant", "content": "Yes."},
                 {"role": "user", "content": task.question}]  # fmt: skip
        span = embedded_lm.question_span(turns)
        assert embedded_lm.tokenizer.decode(embedded_lm.prompt_ids(turns)[span]).strip() == task.question
        _, chat_inputs, chat_evidence, _ = embedded_lm._read_for(session, turns, embedded_lm.prompt_ids(turns), True)
        assert [(p.start, p.end) for p in chat_evidence] == [(p.start, p.end) for p in evidence]
        asked_in_chat = embedded_lm.tokenizer.decode(chat_inputs)
        assert asked_in_chat.endswith(asked[asked.index("<|im_start|>user") :])  # quoted in the last turn
        assert "Is the archive open?<|im_end|>" in asked_in_chat
        monkeypatch.setattr(embedded_lm.config, "quote_system", "")  # the template's own system turn
        _, inputs, _, _ = embedded_lm._read_for(session, task.question, embedded_lm.prompt_ids(task.question), True)
        assert "SmolLM" in embedded_lm.tokenizer.decode(inputs)
    finally:
        embedded_lm.forget("system-turn")


def found(starts: np.ndarray) -> SearchResult:
    """A search result whose blocks of 4 tokens start at `starts` (Hkv, G, k)."""
    heads, group, k = starts.shape
    positions = starts[..., None] + np.arange(4)
    empty = np.zeros((heads, group, k, 4, 2), np.float32)
    return SearchResult(empty, empty, positions, np.zeros((heads, group, k), np.float32))


def test_votes_count_each_heads_ranked_blocks_by_its_weight() -> None:
    starts = np.array([[[8, 4], [4, 0]], [[12, 8], [0, 4]]])  # 2 KV heads x 2 query heads, top 2 each
    votes = new_votes()
    add_votes(votes, found(starts), np.array([1.0, 2.0, 0.0, 1.0]))  # query head 2 does not vote
    # head 0: 8 -> 1, 4 -> 1/2; head 1 (x2): 4 -> 2, 0 -> 1; head 3: 0 -> 1, 4 -> 1/2.
    assert dict(votes) == pytest.approx({8: 1.0, 4: 3.0, 0: 2.0})


def test_passages_are_the_best_blocks_widened_to_blocks_merged_and_in_document_order() -> None:
    votes = {320: 5.0, 336: 4.0, 64: 3.0, 960: 1.0, 160: 2.0}
    passages = select_passages(votes, block_len=16, num_blocks=4, context=8, doc_len=400)
    # Each block widened by 8 tokens, then out to whole blocks: 320 -> [304, 352), 336 -> [320, 368)
    # (they merge), 64 -> [48, 96), 160 -> [144, 192); 960 is not among the best four.
    assert [(p.start, p.end) for p in passages] == [(48, 96), (144, 192), (304, 368)]
    assert [p.rank for p in passages] == [1, 2, 0]
    assert passages[2].score == pytest.approx(9.0)
    assert evidence_rank(passages, [(310, 320)]) == 0
    assert evidence_rank(passages, [(310, 320), (50, 60)]) == 1  # both read: the worse rank counts
    assert evidence_rank(passages, [(90, 100)]) is None  # cut across a gap: not read whole


def test_passages_follow_the_stores_block_grid_after_the_sinks() -> None:
    # Blocks of 4 start at 4, 8, 12, ... after 4 sink tokens; tokens before the grid stay as they are.
    assert [(p.start, p.end) for p in select_passages({12: 1.0}, 4, 1, 2, 100, grid=4)] == [(8, 20)]
    assert [(p.start, p.end) for p in select_passages({4: 1.0}, 4, 1, 2, 100, grid=4)] == [(2, 12)]


def test_lexical_scores_weigh_a_rare_word_over_common_ones() -> None:
    # Blocks of 4 after 2 sink tokens. "the" is everywhere; "door code" opens the fact (block
    # 10) and a look-alike sentence (block 2); "Ada", the name that tells them apart, falls in
    # the fact's next block (14). A block counts its neighbours' words too, so both blocks of
    # the straddling fact beat the look-alike, which alone has as many words as block 10.
    pieces = (["<s>", "\n"] + [" the", " door", " code", " x"] + [" the", " y", " y", " y"] + [" the", " z", " door", " code"]
              + [" Ada", " the", " y", " y"] + [" the", " y", " y", " y"] + [" Ada", " Ada"])  # fmt: skip
    scores = lexical_scores(Words.of(pieces), ["the", "door", "code", "ada"], block_len=4, grid=2, end=22)
    assert set(scores) == {2, 6, 10, 14, 18}  # the last two "Ada"s are in the window (from 22): not counted
    assert sorted(scores, key=lambda block: -scores[block])[:2] == [10, 14]
    assert scores[10] == scores[14] > 1.5 * scores[2] > 0


def test_words_join_the_tokens_of_a_word_and_fold_case() -> None:
    """A name split into two tokens at a paragraph's start is the word a question spells in
    one: matched on token ids, the question found only the surname, in another sentence."""
    words = Words.of(["\n\n", "B", "ram", " Iv", "anova", "'s", " city", ":", " Oslo", ".", " Bram", "2"])
    assert words.text.tolist() == ["bram", "ivanova", "s", "city", "oslo", "bram2"]
    assert words.starts.tolist() == [1, 3, 5, 6, 8, 10]
    holding = words.holding(["bram", "oslo", "paris"], block_len=4, start=0, end=12)
    assert {word: holds.tolist() for word, holds in holding.items()} == {
        "bram": [True, False, False], "oslo": [False, False, True], "paris": [False, False, False],
    }  # fmt: skip


def test_fusion_prefers_blocks_both_rankings_place_high() -> None:
    attention = {10: 3.0, 20: 2.0, 30: 1.0, 50: 0.5}
    lexical = {50: 9.0, 20: 8.0, 40: 7.0}
    fused = fuse([attention, lexical])
    assert max(fused, key=fused.get) == 20  # second in both beats first in one and fourth in the other
    assert set(fused) == {10, 20, 30, 40, 50}


def test_the_lexical_read_only_chooses_blocks_the_store_still_holds() -> None:
    """FIFO eviction drops the oldest blocks: a question whose words occur only there chooses
    none of them, whatever the token ids say (it falls back on the heads' votes, which search
    what the store holds). Passages without context: each is one chosen block."""
    lm = tiny_lm(segment_len=32, sink_len=4, local_len=32, block_len=4, max_memory_tokens=64, read_scoring="lexical",
                 read_context=0)  # fmt: skip
    document = [1] * 40 + [50, 51, 52] + [2] * 300  # the word "234" sits at 40..42 only
    lm.ingest_tokens(document, "doc", progress=False)
    held = lm.store.blocks_at("doc", 0, np.arange(4, 400, 4)).positions[:, 0]
    assert held.min() > 43  # evicted
    result = lm.generate_full("234", memory="doc", chat=False, max_new_tokens=1)
    assert result.evidence and all(p.start >= held.min() for p in result.evidence)  # nothing from the evicted start


@pytest.mark.parametrize("where", ["window", "sinks"])
def test_the_quote_read_quotes_a_fact_in_view_too(where: str) -> None:
    """A fact in the local window (or the sinks) is in view, but the embedded model, 512 tokens
    away from it, answered 1 of 12 such questions (eval_words): the quote read quotes it before
    the question as it quotes a stored one. The passages read places stored keys; those in
    view are there already."""
    fact = [50, 51, 52]  # the word "234"
    before, after = ([1] * 40 + [97, 98, 99] + [2] * 300, [2] * 10) if where == "window" else ([1], [2] * 352)
    document = before + fact + after  # "234" in the window, or at 1..3: in the sinks
    for read in ("quote", "passages"):
        lm = tiny_lm(segment_len=32, sink_len=4, local_len=32, block_len=4, read=read, read_scoring="lexical",
                     read_context=0, embedder=None)  # the words alone (not the embeddings of random text)
        lm.ingest_tokens(document, "doc", progress=False)
        session = lm.open_session("doc", writes=False)
        window_start = int(session.positions[session.sink_count])
        at = len(before)
        assert at >= window_start or at + 3 <= session.sink_count
        result = lm.generate_full("234", memory="doc", chat=False, max_new_tokens=1)
        if read == "quote":  # the word's block, with its neighbour (they score alike): quoted, in view or not
            assert any(p.start <= at and at + 3 <= p.end for p in result.evidence)
            assert all(p.start >= window_start or p.start < session.sink_count for p in result.evidence)
        else:  # no stored block holds the word: the heads' votes choose stored ones
            assert result.evidence and all(p.end <= window_start for p in result.evidence)


def test_reread_ids_keep_document_order_and_mark_the_gaps() -> None:
    tokens = list(range(1000, 1100))
    passages = [Passage(40, 44, 1.0, 1), Passage(10, 13, 2.0, 0)]
    kept = [0, 1, 2, 96, 97, 98, 99]  # sinks and the local window
    assert reread_ids(tokens, kept, passages, separator=[-1]) == [
        1000, 1001, 1002, -1, 1010, 1011, 1012, -1, 1040, 1041, 1042, 1043, -1, 1096, 1097, 1098, 1099,
    ]  # fmt: skip


def test_sentences_end_at_full_stops_and_blank_lines_not_at_wrapped_lines() -> None:
    pieces = ["To", " delete", " a", "\nword", ",", " use", " dw", ".", " Then", " 3", ".5", " is", " a", " number",
              "!", "\n\n", "Code", ":", "\n", "\n", "\tdd", ".", "\n", "Next"]  # fmt: skip
    # "3.5" is no full stop (no space after it); a single newline wraps a sentence; "\n\n" and
    # two newline tokens are blank lines; the white space between sentences ends the first.
    assert sentence_starts(pieces) == ([0, 8, 16, 20, 23], {0, 16, 20})


def test_question_sentences_keep_the_matching_ones_and_their_neighbours_in_the_paragraph() -> None:
    pieces = ["A", "."]
    for i in range(1, 10):  # ten sentences of two tokens each; sentence i at positions 50 + 2i, 51 + 2i
        pieces += [f" w{i}" if i in (1, 7, 9) else " B", "."]
    passage = Passage(50, 70, score=3.0, rank=1)
    # Sentence 1 holds "w1" (weight 4); sentence 7 "w7" (2: half of that); sentence 9 "w9"
    # (1: less). Sentences 1 and 7 are kept with a neighbour each side.
    weights = {"w1": 4.0, "w7": 2.0, "w9": 1.0, "absent": 9.0}
    assert question_sentences(passage, pieces, weights) == [Passage(50, 56, 3.0, 1), Passage(62, 68, 3.0, 1)]
    # No word of the question in the passage (an attention-chosen one): all of it.
    assert question_sentences(passage, pieces, {"absent": 1.0}) == [passage]
    # The best sentence is the last: nothing comes after it.
    assert question_sentences(passage, pieces, {"w9": 1.0}) == [Passage(66, 70, 3.0, 1)]
    # Neighbours stay within the paragraph: a blank line before sentence 7 and after it.
    pieces[13], pieces[15] = ".\n\n", ".\n\n"
    assert question_sentences(passage, pieces, {"w7": 1.0}) == [Passage(64, 66, 3.0, 1)]
    pieces[15] = "."
    assert question_sentences(passage, pieces, {"w7": 1.0}) == [Passage(64, 68, 3.0, 1)]


def test_term_weights_favour_words_in_few_blocks() -> None:
    holding = {"the": np.array([True, True, True, True]), "ada": np.array([False, True, False, False]),
               "absent": np.zeros(4, dtype=bool)}  # fmt: skip
    weights = term_weights(holding)
    assert set(weights) == {"the", "ada"}
    assert weights["ada"] > weights["the"]


def test_the_quote_goes_just_before_the_question() -> None:
    assert quoted_prompt("what now?", "Q: ") == "Q: what now?"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "what now?"}, {"role": "assistant", "content": "Well,"}]  # fmt: skip
    assert quoted_prompt(turns, "Q: ") == [*turns[:2], {"role": "user", "content": "Q: what now?"}, turns[3]]
    assert turns[2]["content"] == "what now?"  # the caller's turns are left as they were


@pytest.mark.parametrize("read", ["reread", "quote"])
def test_a_reread_is_the_stock_model_over_the_passages_and_the_prompt(read: str) -> None:
    """Both text reads run a plain forward pass of the stock model over a selection of the
    document: "reread" the sinks, the separator-joined passages and the window, then the
    prompt; "quote" the sinks and the window, then the prompt with the passages' text quoted
    just before the question."""
    lm = tiny_lm(segment_len=32, sink_len=4, local_len=32, block_len=4, read=read, read_scoring="hybrid", read_blocks=3,
                 read_context=4)
    document = random_ids(400, 1)
    lm.ingest_tokens(document, "doc", progress=False)
    prompt = [7, 8] + lm.prompt_ids("what now", chat=False) + [9]  # a template around the question
    question = slice(2, len(prompt) - 1)
    session = lm.open_session("doc", writes=False)
    passages, _ = lm.read_passages(session, prompt, question)
    assert 1 <= len(passages) <= 3
    separator = lm.tokenizer("\n\n")["input_ids"]
    kept = lm.store.load_state("doc")["window_positions"].tolist()
    if read == "reread":
        reread, inputs = lm.reread_session(session, passages, prompt)
        expected_inputs = reread_ids(document, kept, passages, separator) + prompt
        before = []
    else:  # the session has read the sinks and the window already (`prefix_session`)
        reread, inputs = lm.quote_session(session, passages, "what now", chat=False)
        quoted = "\n\n".join(lm.tokenizer.decode(document[p.start : p.end]).strip() for p in passages)
        expected_inputs = lm.tokenizer(f"From the document:\n{quoted}\n\nQuestion: what now")["input_ids"]
        before = reread_ids(document, kept, [], separator) + separator
    assert inputs == expected_inputs
    assert len(before + inputs) < 400  # a selection, not the document
    got = lm.forward(reread, inputs, logits="all")
    with torch.no_grad():
        expected = tiny_model()(torch.tensor([before + inputs])).logits[0, len(before) :]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # And a generation reads exactly these passages.
    plain_prompt = lm.prompt_ids("what now", chat=False)
    expected_passages, _ = lm.read_passages(lm.open_session("doc", writes=False), plain_prompt, slice(0, len(plain_prompt)))
    assert lm.generate_full("what now", memory="doc", chat=False, max_new_tokens=1).evidence == expected_passages


def test_questions_share_the_quote_reads_prefix_and_leave_it_as_it_was() -> None:
    """The quote read re-reads the sinks and the window once per memory state, at the end of
    the ingest: questions read on in a fork of the kept session, which what they read never
    reaches; the answers are those of a fresh re-read, and an ingest that moves the window
    makes a new prefix."""
    lm = tiny_lm(segment_len=32, sink_len=4, local_len=32, block_len=4, read_scoring="hybrid")
    lm.ingest_tokens(random_ids(400, 2), "doc", progress=False)
    (kept,) = lm._prefixes.values()
    end, keys = kept.window_end, [window.cache_keys for window in kept.windows]
    first = lm.generate_full("what now", memory="doc", chat=False, max_new_tokens=8)
    assert list(lm._prefixes.values()) == [kept]  # the question found the ingest's prefix
    assert lm.generate_full("what now", memory="doc", chat=False, max_new_tokens=8).token_ids == first.token_ids
    assert list(lm._prefixes.values()) == [kept]
    assert kept.window_end == end and all(window.cache_keys is k for window, k in zip(kept.windows, keys))
    lm._prefixes.clear()
    assert lm.generate_full("what now", memory="doc", chat=False, max_new_tokens=8).token_ids == first.token_ids
    lm.ingest_tokens(random_ids(50, 3), "doc", progress=False)
    assert len(lm._prefixes) == 2
    lm.generate_full("what now", memory="doc", chat=False, max_new_tokens=1)
    assert len(lm._prefixes) == 2


def test_stored_passages_sit_at_consecutive_positions_in_document_order() -> None:
    lm = tiny_lm(segment_len=32, sink_len=4, local_len=32, block_len=4, read="passages", read_scoring="hybrid",
                 read_blocks=3, read_context=4)
    lm.ingest_tokens(random_ids(400, 3), "doc", progress=False)
    session = lm.open_session("doc", writes=False)
    prompt = lm.prompt_ids("what now", chat=False)
    passages, _ = lm.read_passages(session, prompt, slice(0, len(prompt)))
    window = session.positions.tolist()
    session.place_passages(lm.fetch_passages(session, passages))
    in_view = session.positions.tolist()
    read = sorted(set(in_view) - set(window))
    assert read == sorted({t for p in passages for t in range(p.start, p.end)} - set(window))
    assert in_view == sorted(in_view)  # sinks, passages, window: document order
    assert session.positions_for(len(prompt)).tolist() == list(range(len(in_view), len(in_view) + len(prompt)))
    assert session._prefix_positions.tolist() == list(range(len(in_view)))  # consecutive, no gap


def test_a_passage_read_of_every_block_is_full_attention() -> None:
    """Reading every stored block back in document order puts each token at its own position:
    the answer is then the stock model's over document + prompt (the ingest is exact too:
    every block retrieved at its own position)."""
    lm = tiny_lm(segment_len=16, sink_len=4, local_len=16, block_len=4, top_k=10_000, position_mode="exact",
                 read="passages", read_scoring="hybrid", read_blocks=10_000)  # fmt: skip
    document = random_ids(150, 5)
    lm.ingest_tokens(document, "doc", progress=False)
    result = lm.generate_full("hello there", memory="doc", chat=False, max_new_tokens=10)
    assert [(p.start, p.end) for p in result.evidence] == [(0, 150)]
    stock = tiny_model()
    stock.generation_config.eos_token_id = None
    prompt = lm.prompt_ids("hello there", chat=False)
    expected = stock.generate(torch.tensor([document + prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert result.token_ids == expected[0, len(document) + len(prompt) :].tolist()


def test_only_voting_heads_choose_the_passages(monkeypatch) -> None:
    """With every vote given to one head of one layer, the passages are that head's choice."""
    lm = tiny_lm(segment_len=32, sink_len=4, local_len=32, block_len=4, read_blocks=1, read_context=0, read_top_k=1,
                 read_scoring="attention")
    lm.ingest_tokens(random_ids(400, 2), "doc", progress=False)
    weights = np.zeros_like(lm.head_profile.weights)
    weights[1, 3] = 1.0
    lm.head_profile = HeadProfile(weights)
    session = lm.open_session("doc", writes=False)
    prompt = lm.prompt_ids("what now", chat=False)
    choice = lm.search_with_question(session, prompt, slice(0, len(prompt)), layers=[1])[1].positions[1, 1, 0]
    [passage] = lm.generate_full("what now", memory="doc", chat=False, max_new_tokens=1).evidence
    assert (passage.start, passage.end) == (choice[0], choice[-1] + 1)


def test_a_head_profile_for_another_model_is_refused(tmp_path) -> None:
    path = HeadProfile(np.ones((3, 4), np.float32)).save(tmp_path / "heads.json", model="tiny")
    assert HeadProfile.load(path, 3, 4).weights.shape == (3, 4)
    with pytest.raises(ValueError, match="run `memlm calibrate heads"):
        HeadProfile.load(path, 30, 9)
    path.write_text(json.dumps({"weights": [[0.0] * 4] * 3}))
    with pytest.raises(ValueError, match="not all 0"):
        HeadProfile.load(path, 3, 4)


def test_calibrate_refuses_bad_settings_in_one_line(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "memlm.cli", "calibrate", "heads", "--length", "100",
                           "--out", str(tmp_path / "h.json")], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1 and "length must be at least 2000 tokens" in done.stderr
    assert not (tmp_path / "h.json").exists()


@pytest.mark.slow
def test_the_embedded_model_answers_from_beyond_its_window(embedded_lm) -> None:
    """About 12k tokens of the Vim manual (more than the model's 8,192-token window) with an
    access code and a fact about a person in its first half, asked through the chat template:
    the passages read from memory hold both sentences, and the model answers both (accuracy
    over many documents is measured in `memlm bench eval`; this one is a fixed seed)."""
    tasks = prose_needles(12_000, [0.2, 0.4], seed=2)
    document = tasks[0].document
    assert len(embedded_lm.tokenizer(document, add_special_tokens=False)["input_ids"]) > embedded_lm.max_positions
    embedded_lm.ingest(document, memory="prose", progress=False)
    try:
        for task in tasks:
            result = embedded_lm.generate_full(task.question, memory="prose", max_new_tokens=task.answer_tokens)
            spans = token_spans(embedded_lm.tokenizer, document, task.evidence)
            rank, read = evidence_found(result.evidence, result.in_view, spans)
            assert read and rank is not None, (task.question, spans, result.evidence)  # from memory
            # The needle's sentence (its own paragraph), not the ~270 tokens of the passage.
            assert sum(p.end - p.start for p in result.evidence) < 96, result.evidence
            assert task.score(result.text), (task.question, task.answer, result.text)
    finally:
        embedded_lm.forget("prose")
