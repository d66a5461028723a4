"""The real-document benchmark's written questions: well formed, spread over the manual, and
each answer really stated where its anchor says (when the Vim manual is installed here); the
same for the Python tutorial's questions, whose paraphrased half shares no content word with
its anchors (the tutorial is downloaded with apt-get when not installed; skipped offline); the
questions file format loads and is checked. No model runs."""

from __future__ import annotations

import json

import pytest

from memlm.bench import pytutorial, realdoc
from memlm.bench.pytutorial import content_words
from memlm.bench.realdoc import QUESTIONS, RealDocument, build_tasks, load_questions, parse_chapters
from memlm.tasks import score_answer

MANUAL = realdoc._manual_dir(realdoc.VIM_DOCS)


def test_questions_are_well_formed_and_spread():
    assert len({q.question for q in QUESTIONS}) == len(QUESTIONS)
    for q in QUESTIONS:
        assert q.question.strip() and q.answer.strip() and q.chapter is not None
        # The anchor states the answer in one of its written forms, and the scorer accepts it.
        assert any(score_answer(q.anchor, answer) for answer in (q.answer, *q.variants)), q.question
        assert not any(score_answer(q.answer, wrong) for wrong in q.distractors), q.question
    default = [q for q in QUESTIONS if q.chapter in realdoc.DEFAULT_CHAPTERS]
    assert len(default) >= 16
    assert {q.chapter for q in default} == set(realdoc.DEFAULT_CHAPTERS)  # every default chapter asked about


def test_parse_chapters():
    assert parse_chapters("1-3,5") == [1, 2, 3, 5]
    assert parse_chapters("2,1,2") == [1, 2]
    with pytest.raises(ValueError, match="chapters must look like"):
        parse_chapters("one")


@pytest.mark.skipif(MANUAL is None, reason=f"the Vim user manual is not installed ({realdoc.VIM_DOCS})")
def test_every_answer_is_in_the_manual():
    chapters = sorted({q.chapter for q in QUESTIONS})
    check_anchors(realdoc.vim_manual(chapters), QUESTIONS, last_depth=0.9)


def check_anchors(document, questions, last_depth: float) -> None:
    """Every question's anchor and answer are in its chapter, the anchor where its text first
    occurs, and the questions run from the start of the text to its end."""
    tasks = build_tasks(document, list(questions))  # raises when an anchor or answer is missing
    for q, task in zip(questions, tasks):
        start, end = document.chapters[q.chapter]
        assert task.chapter == q.chapter and start <= task.offset < end, q.question
        assert q.answer in document.text[start:end], q.question
        # Evidence recall finds the evidence by its first occurrence: it must be the anchor's.
        assert document.text.find(task.evidence[0]) == task.offset, q.question
    depths = [t.depth for t in tasks]
    assert depths == sorted(depths) and depths[0] < 0.1 and depths[-1] > last_depth  # start to end of the text


def test_questions_file(tmp_path):
    text = "Chapter one. The launch code of the station is 4711. Chapter two. Nothing else."
    path = tmp_path / "questions.json"
    question = {"question": "What is the launch code?", "answer": "4711",
                "anchor": "launch code of the station is 4711", "distractors": ["1234"]}  # fmt: skip
    path.write_text(json.dumps([question]))
    questions = load_questions(path)
    (task,) = build_tasks(RealDocument(text, "inline"), questions)
    assert task.offset == text.index("launch code") and task.chapter is None
    assert task.evidence == ("launch code of the station is 4711",)
    assert task.score("It is 4711.") and not task.score("1234, or maybe 4711")

    path.write_text(json.dumps([{"question": "What is the launch code?"}]))
    with pytest.raises(ValueError, match="needs non-empty"):
        load_questions(path)
    path.write_text(json.dumps([{"question": "What is the code?", "answer": "9999"}]))
    with pytest.raises(ValueError, match="not in the document"):
        build_tasks(RealDocument(text, "inline"), load_questions(path))


# -- the Python tutorial ------------------------------------------------------------------------


def test_python_questions_are_well_formed():
    questions = pytutorial.QUESTIONS
    assert len(questions) >= 24 and len({q.question for q in questions}) == len(questions)
    for q in questions:
        assert q.question.strip() and q.answer.strip() and q.chapter is not None, q.question
        assert 1 <= q.chapter <= len(pytutorial.CHAPTERS), q.question
        assert any(score_answer(q.anchor, answer) for answer in (q.answer, *q.variants)), q.question
        assert not any(score_answer(q.answer, wrong) for wrong in q.distractors), q.question
        # The question does not give its answer away.
        assert not any(score_answer(q.question, answer) for answer in (q.answer, *q.variants)), q.question
        shared = content_words(q.question) & content_words(q.anchor)
        if q.paraphrased:  # found by meaning only: no content word, nor a form of one, in common
            assert not shared, (q.question, shared)
        else:  # found by its words, as most first questions are
            assert shared, q.question
    paraphrased = sum(q.paraphrased for q in questions)
    assert abs(paraphrased - (len(questions) - paraphrased)) <= 1
    assert {q.chapter for q in questions} == set(range(1, len(pytutorial.CHAPTERS) + 1))  # every chapter asked about
    # Both kinds from the start of the text to its end, not one kind bunched in a few chapters.
    for kind in (True, False):
        chapters = [q.chapter for q in questions if q.paraphrased is kind]
        assert min(chapters) <= 2 and max(chapters) >= 15, kind


def test_content_words():
    assert content_words("Which keyword stops the loops?") == content_words("keyword stop loop")
    assert content_words("sorted uses") == content_words("sort used")
    assert content_words("The classes of it") == content_words("class")
    assert not content_words("What is the one that does it?")


def test_every_python_answer_is_in_the_tutorial():
    try:  # installed, or downloaded with apt-get: skipped where neither works (offline, not Debian)
        document = pytutorial.python_tutorial()
    except ValueError as error:
        pytest.skip(str(error))
    assert sorted(document.chapters) == list(range(1, len(pytutorial.CHAPTERS) + 1))
    check_anchors(document, pytutorial.QUESTIONS, last_depth=0.85)


def test_vim_questions_marked_paraphrased_share_no_rare_word_with_their_anchor():
    """Half the Vim questions paraphrase their anchor: the words they share with it are the
    manual's two commonest ("vim", "command"), never a rare one; the rest are literal."""
    common = {"vim", "command"}
    default = [q for q in QUESTIONS if q.chapter in realdoc.DEFAULT_CHAPTERS]
    assert sum(q.paraphrased for q in default) == len(default) // 2
    for q in QUESTIONS:
        shared = pytutorial.content_words(q.question) & pytutorial.content_words(q.anchor)
        assert not q.paraphrased or shared <= common, (q.question, shared)
