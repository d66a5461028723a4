"""Generated tasks: deterministic under a seed, facts where they are said to be, scorers that
accept the right answer and reject wrong ones; the eval suite's bookkeeping on a tiny model."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, replace

import pytest
import torch
from conftest import tiny_lm

from memlm.bench import eval as suite
from memlm.tasks import (
    PEOPLE,
    ROOMS,
    Task,
    babilong,
    handbook,
    kv_lines,
    multi_needle,
    passkey,
    prose_needles,
    score_answer,
)

DEPTHS = [0.1, 0.35, 0.6, 0.85]
GENERATORS = {
    "passkey": lambda n, seed: [passkey(n, 0.3, seed)],
    "kv-lines": lambda n, seed: kv_lines(n, DEPTHS, seed),
    "multi-needle": lambda n, seed: multi_needle(n, DEPTHS, seed),
    "babilong": lambda n, seed: babilong(n, DEPTHS, seed),
    "docqa": lambda n, seed: handbook(n, seed, depths=DEPTHS)[1],
    "prose-needles": lambda n, seed: prose_needles(n, DEPTHS, seed),
}


def anchor(task: Task) -> str:
    """The text whose place in the document is the task's depth (rooms repeat across bAbI
    facts; the person or the picked-up thing does not)."""
    if task.kind == "babilong-1fact":
        return task.question.removeprefix("Where is ").rstrip("?") + " "
    if task.kind == "babilong-2fact":
        return "picked up the " + task.question.removeprefix("Where is the ").rstrip("?")
    return task.answer


def fields(tasks: list[Task]) -> list[tuple]:
    return [(t.document, t.question, t.answer, t.depth, t.prompt, t.kind, t.answers, t.distractors) for t in tasks]


@pytest.mark.parametrize("name", GENERATORS)
def test_every_task_is_deterministic_under_its_seed(name: str) -> None:
    make = GENERATORS[name]
    assert fields(make(3_000, 7)) == fields(make(3_000, 7))
    assert make(3_000, 7)[0].document != make(3_000, 8)[0].document


@pytest.mark.parametrize("name", GENERATORS)
def test_every_task_states_its_answer_near_its_depth(name: str) -> None:
    for task in GENERATORS[name](4_000, 3):
        assert task.kind and task.question and task.answer
        for answer in task.answers or (task.answer,):
            at = task.document.find(answer)
            assert at >= 0, f"{task.kind}: {answer!r} is not in the document"
        if not task.answers:  # one fact: it sits where the task says
            assert abs(task.document.find(anchor(task)) / len(task.document) - task.depth) < 0.08, task.kind
        # The sentences that answer it are in the document as written (evidence recall finds them).
        assert task.evidence and all(sentence in task.document for sentence in task.evidence), task.kind
        # The right answer passes its own scorer; distractors are never the answer.
        assert task.score(f"{task.answer}.")
        assert task.answer not in task.distractors


@pytest.mark.slow
@pytest.mark.parametrize("name", GENERATORS)
def test_lengths_are_close_to_the_requested_tokens(name: str, embedded_lm) -> None:
    for length in (2_000, 16_000):
        document = GENERATORS[name](length, 1)[0].document
        tokens = len(embedded_lm.tokenizer(document, add_special_tokens=False)["input_ids"])
        assert 0.85 * length < tokens < 1.15 * length, (name, length, tokens)


def test_score_answer_on_hand_made_answers() -> None:
    assert score_answer("The pass key is 48213.", "48213")
    assert score_answer("  48213", "48213")
    assert not score_answer("482130", "48213")  # a whole number, not a prefix
    assert not score_answer("48212", "48213")
    assert score_answer("She is in the Kitchen now", "kitchen")
    assert not score_answer("kitchenette", "kitchen")
    # A distractor named before the answer is a wrong answer (or a list of every candidate);
    # named after it, it is commentary.
    rooms = ("garden", "office")
    assert score_answer("the kitchen", "kitchen", rooms)
    assert score_answer("the kitchen, not the garden", "kitchen", rooms)
    assert not score_answer("the garden", "kitchen", rooms)
    assert not score_answer("garden, kitchen or office", "kitchen", rooms)
    assert not score_answer("", "kitchen", rooms)


def test_scorers_of_each_task_on_hand_made_answers() -> None:
    key = passkey(1_000, 0.5, 1)
    assert key.score(f"The pass key is {key.answer}.") and not key.score("I do not know")

    lines = kv_lines(2_000, [0.5], 1)[0]
    assert lines.score(f"{lines.answer}>") and lines.prompt.endswith("REGISTER_CONTENT is <")
    wrong = lines.distractors[0]
    assert not lines.score(f"{wrong}>") and not lines.score(f"{wrong}> or {lines.answer}>")
    assert f"REGISTER_CONTENT is <{lines.answer}>" in lines.document

    *ones, every = multi_needle(2_000, [0.2, 0.5, 0.8], 1)
    assert [t.kind for t in ones] == ["multi-needle-one"] * 3 and every.kind == "multi-needle-all"
    assert ones[0].score(ones[0].answer) and not ones[0].score(ones[1].answer)
    assert every.answers == tuple(t.answer for t in ones) and every.depth == 0.2
    assert every.score(" ".join(reversed(every.answers)))  # any order
    assert not every.score(" ".join(every.answers[:2]))  # all of them, or wrong

    for task in babilong(3_000, DEPTHS, 2):
        assert task.score(f" {task.answer}.")
        for other in task.distractors:
            assert not task.score(f" {other}.")

    facts = handbook(3_000, 1, depths=DEPTHS)[1]
    for task in facts:
        assert task.kind == "docqa" and task.prompt is None
        assert task.score(f"The answer is {task.answer}.")
        assert not task.score("I am not sure.")


def test_babilong_facts_are_the_only_mentions_of_people_and_rooms() -> None:
    tasks = babilong(6_000, DEPTHS, 5)
    document = tasks[0].document
    sentences = re.split(r"(?<=\.) ", document)
    facts = [s for s in sentences if any(re.search(rf"\b{p}\b", s) for p in PEOPLE)]
    rooms = [s for s in sentences if any(re.search(rf"\b{r}\b", s) for r in ROOMS)]
    assert set(rooms) <= set(facts)  # the filler never names a person or a room
    kinds = [t.kind for t in tasks]
    assert kinds.count("babilong-1fact") == kinds.count("babilong-2fact") == 2
    for task in tasks:
        if task.kind == "babilong-2fact":  # X picked up the thing, later X went to the room
            thing = task.question.removeprefix("Where is the ").rstrip("?")
            picked = next(s for s in facts if f"picked up the {thing}." in s)
            person = picked.split()[0]
            moved = next(s for s in facts if s.startswith(person) and task.answer in s)
            assert document.index(picked) < document.index(moved)
        else:
            person = task.question.removeprefix("Where is ").rstrip("?")
            assert any(s.startswith(person) and s.endswith(f"the {task.answer}.") for s in facts)


def test_the_default_handbook_is_the_demos() -> None:
    """The demo's handbook keeps its facts at 5%..85% and its defaults."""
    document, tasks = handbook(6_000, seed=0)
    assert len(tasks) == 8 and all(t.document is document for t in tasks)
    assert tasks[0].depth < 0.1 and 0.8 < tasks[-1].depth < 0.9


# -- the suite's bookkeeping --------------------------------------------------------------------


def test_wilson_interval() -> None:
    low, high = suite.wilson(0, 10)
    assert low == 0.0 and math.isclose(high, 0.2775, abs_tol=1e-4)  # the textbook value
    low, high = suite.wilson(5, 5)
    assert math.isclose(low, 0.5655, abs_tol=1e-4) and high == 1.0
    low, high = suite.wilson(50, 100)
    assert math.isclose(low, 0.4038, abs_tol=1e-4) and math.isclose(high, 0.5962, abs_tol=1e-4)
    assert suite.wilson(0, 0) == (0.0, 1.0)


def test_depths_cover_the_document_evenly_and_documents_are_shared_by_configs() -> None:
    depths = sorted(d for doc in range(5) for d in suite.document_depths(doc, 5, 4))
    assert depths == pytest.approx([(i + 0.5) / 20 for i in range(20)])
    assert min(suite.document_depths(0, 5, 4)) < 0.1 and max(suite.document_depths(0, 5, 4)) > 0.75
    config = suite.EvalConfig(lengths=[600], window_length=300, trials=2)
    first, second = suite.documents(config), suite.documents(config)
    assert [(f, n, s, fields(t)) for f, n, s, t in first] == [(f, n, s, fields(t)) for f, n, s, t in second]
    assert len(first) == len(suite.FAMILIES) * 2 * 2
    assert len({seed for _, _, seed, _ in first}) == len(first)


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        suite.EvalConfig(families=["passkey", "nope"]).validate()
    with pytest.raises(ValueError, match="unknown configuration"):
        suite.EvalConfig(configs=["rnn"]).validate()


def trial(config: str, kind: str, length: int, right: bool, depth: float = 0.5) -> suite.Trial:
    return suite.Trial(config, "f", kind, length, length, depth, 0, "q", "a", "o", right)


def test_retention_is_accuracy_over_the_plain_models_in_window_accuracy() -> None:
    config = suite.EvalConfig(lengths=[8_000], window_length=2_000, families=["passkey"], configs=["plain", "fot"])
    trials = [trial("plain", "passkey", 2_000, r) for r in (True, True, True, False)]  # 0.75 in the window
    trials += [trial("plain", "passkey", 8_000, r) for r in (True, False, False, False)]
    trials += [trial("fot", "passkey", 2_000, True)] * 4 + [trial("fot", "passkey", 8_000, r) for r in (1, 1, 1, 0)]
    accuracy, retention, _ = suite.summarize(trials, config)
    cell = accuracy["passkey"]["fot"]["8000"]
    assert (cell["right"], cell["n"], cell["accuracy"]) == (3, 4, 0.75)
    assert cell["ci95"] == pytest.approx(list(suite.wilson(3, 4)))
    assert retention["passkey"]["fot"]["8000"] == pytest.approx(1.0)
    assert retention["passkey"]["plain"]["8000"] == pytest.approx(0.25 / 0.75)
    assert retention["passkey"]["fot"]["2000"] == pytest.approx(1 / 0.75)


def test_the_suite_runs_on_a_tiny_model_and_writes_its_report(tmp_path) -> None:
    """Every family, the plain model and a memory backend, through to the table, JSON and
    plots (a random model answers nothing right: this checks the plumbing, not accuracy)."""
    base = tiny_lm()
    lm = tiny_lm(segment_len=256, sink_len=4, local_len=64, block_len=4, top_k=2, query_chunk=16)
    config = suite.EvalConfig(lengths=[120], window_length=60, trials=1, configs=["plain", "fot"])
    # Two new tokens an answer: a random model never stops, and its words do not matter here.
    docs = [(family, n, seed, [replace(t, answer_tokens=2) for t in tasks]) for family, n, seed, tasks in
            suite.documents(config)]  # fmt: skip
    trials = suite.run_config("plain", None, base, docs) + suite.run_config("fot", lm, base, docs)
    questions = sum(len(tasks) for *_, tasks in docs)
    assert len(trials) == 2 * questions and lm.memories() == []
    # Every memory answer says whether the read held its evidence; the plain model reads nothing.
    assert all(t.evidence_read is not None for t in trials if t.config == "fot")
    assert all(t.evidence_read is None and t.evidence_rank is None for t in trials if t.config == "plain")
    accuracy, retention, evidence = suite.summarize(trials, config)
    assert all(evidence[kind]["fot"]["120"]["n"] > 0 and evidence[kind]["plain"]["120"]["n"] == 0 for kind in evidence)
    assert set(accuracy) == {kind for family in suite.FAMILIES.values() for kind in family.kinds}
    report = {"configs": config.configs, "lengths": config.all_lengths, "model": "tiny", "model_window": 4096,
              "accuracy": accuracy, "retention": retention, "evidence": evidence,
              "retention_reference": "plain at 60 tokens",
              "trials": [suite.asdict(t) for t in trials]}  # fmt: skip
    suite.print_table(report)
    json.dumps(report, allow_nan=False)  # valid JSON: no NaN
    suite.plot_heatmaps(report, tmp_path / "eval.png")
    suite.plot_accuracy(report, tmp_path / "eval_accuracy.png")
    assert (tmp_path / "eval.png").stat().st_size > 10_000 and (tmp_path / "eval_accuracy.png").stat().st_size > 10_000


def test_the_plain_model_reads_a_document_once_and_answers_each_question_as_alone() -> None:
    """plain_answers shares the document's cache between questions; each answer must equal
    the stock model's greedy answer on [window cut ; that prompt] alone, and a question whose
    answer fell out of the window is not run."""
    from memlm.bench.trials import Question, plain_answers

    lm = tiny_lm()
    letters = torch.randint(0, 26, (5_000,), generator=torch.Generator().manual_seed(0))
    document = "".join(chr(97 + i) for i in letters.tolist())  # longer than the 4096-token window
    ids = lm.tokenizer(document)["input_ids"]
    start, end = lm.tokenizer.decode(ids[:40]), lm.tokenizer.decode(ids[-40:])
    questions = [Question("Where?", end, 5), Question("Who is it, then?", start, 5), Question("What?", end, 3)]
    outputs = plain_answers(lm, document, questions)
    assert outputs[1] is None
    room = lm.max_positions - max(len(lm.prompt_ids(q.prompt, chat=False)) + q.max_new_tokens for q in questions)
    for question, output in ((questions[0], outputs[0]), (questions[2], outputs[2])):
        tokens = ids[-room:] + lm.prompt_ids(question.prompt, chat=False)
        alone = []  # greedy by whole forward passes: the model's definition, no cache involved
        with torch.inference_mode():
            for _ in range(question.max_new_tokens):
                alone.append(int(lm.model(torch.tensor([tokens + alone])).logits[0, -1].argmax()))
        assert output == lm.tokenizer.decode(alone)


def test_an_interrupted_run_continues_from_its_checkpoint_without_asking_again(tmp_path) -> None:
    """Each answered document lands in the checkpoint; resuming from it reruns only the
    documents missing there, with the same answers, and refuses another model's answers."""
    base = tiny_lm()
    lm = tiny_lm(segment_len=256, sink_len=4, local_len=64, block_len=4, top_k=2, query_chunk=16)
    config = suite.EvalConfig(lengths=[120], window_length=60, trials=1, families=["passkey", "babilong"])
    docs = [(family, n, seed, [replace(t, answer_tokens=2) for t in tasks]) for family, n, seed, tasks in
            suite.documents(config)]  # fmt: skip
    header = {"model": "tiny", "dtype": "bfloat16", "defaults": {}, "chat": True}
    checkpoint = tmp_path / "eval.trials.jsonl"
    checkpoint.write_text(json.dumps(header) + "\n")
    full = suite.run_config("fot", lm, base, docs, checkpoint=checkpoint)
    assert [suite.Trial(**json.loads(line)) for line in checkpoint.read_text().splitlines()[1:]] == full

    first_document = len(docs[0][3])  # interrupted after the first document
    lines = checkpoint.read_text().splitlines()[: 1 + first_document]
    checkpoint.write_text("\n".join(lines) + "\n")
    reuse = suite.answered_before([checkpoint], header)
    assert len(reuse) == 1
    ingested = []
    ingest = lm.ingest
    lm.ingest = lambda text, **kw: (ingested.append(text), ingest(text, **kw))[1]
    resumed = suite.run_config("fot", lm, base, docs, reuse)
    assert resumed == full
    assert ingested == [tasks[0].document for *_, tasks in docs[1:]]

    # The same seed asked at other depths (another number of documents per cell) is run again.
    moved = {key: [replace(t, depth=t.depth / 2) for t in trials] for key, trials in reuse.items()}
    ingested.clear()
    suite.run_config("fot", lm, base, docs, moved)
    assert len(ingested) == len(docs)
    with pytest.raises(ValueError, match="another model"):
        suite.answered_before([checkpoint], {**header, "model": "other"})
    # Other memory settings: the plain model's answers still hold, the memory's do not.
    plain = suite.run_config("plain", None, base, docs[:1])
    checkpoint.write_text("\n".join([json.dumps(header), *(json.dumps(asdict(t)) for t in [*full, *plain])]) + "\n")

    def documents_of(trials: list[suite.Trial]) -> set[tuple]:
        return {(t.config, t.family, t.length, t.seed) for t in trials}

    assert set(suite.answered_before([checkpoint], header)) == documents_of(full + plain)
    assert set(suite.answered_before([checkpoint], {**header, "defaults": {"top_k": 1}})) == documents_of(plain)
    checkpoint.write_text(json.dumps(header) + "\n" + json.dumps({"config": "fot"}) + "\n")
    with pytest.raises(ValueError, match="other than benchmark trials"):
        suite.answered_before([checkpoint], header)
