"""Asking a configuration the questions of generated or real documents, and keeping its
answers: the plain model (its input cut to its window) or a memory backend (the document
ingested once, all its questions asked), one `Trial` per question. A long run appends each
answered document's trials to a checkpoint as it goes; `answered_before` reads them (or an
earlier report) back, and `run_config` then skips the documents answered there."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from memlm.bench.families import Document
from memlm.engine import MemoryLM
from memlm.memory.reading import evidence_found, token_spans
from memlm.tasks import Task

DocumentKey = tuple[str, str, int, int]  # (config, family, length, seed)


@dataclass
class Trial:
    config: str
    family: str
    kind: str
    length: int  # the requested length; `tokens` is what the tokenizer counted
    tokens: int
    depth: float
    seed: int
    question: str
    answer: str
    output: str
    right: bool
    # Plain model only: whether the answer lay in the part of the document that fits its
    # window (when not, it was not run: it cannot know the answer). None for the backends.
    visible: bool | None = None
    # Memory backends: whether the task's evidence sentences were in front of the model (in the
    # passages or blocks read, or in the sinks and local window), and the worst rank of the
    # passages that brought them from memory (None: none needed, or missed); both None for
    # the plain model.
    evidence_rank: int | None = None
    evidence_read: bool | None = None
    # The passage read's first stage (words and embeddings fused): whether the evidence was in
    # view or among its `read_candidates` passages, and the worst rank of those holding it.
    candidate_rank: int | None = None
    candidate_found: bool | None = None


# -- asking -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    prompt: str  # what follows the document
    answer: str  # the text that must lie in the window for the model to be able to know it
    max_new_tokens: int = 8

    @classmethod
    def of(cls, task: Task, prompt: str) -> Question:
        """The plain model's question for `task`; for a question about several needles, the
        earliest one decides whether all are inside its window."""
        answer = min(task.answers, key=task.document.find) if task.answers else task.answer
        return cls(prompt, answer, task.answer_tokens)


def prompt_text(lm: MemoryLM, task: Task, chat: bool = True) -> str:
    """What follows the document for the plain model: its question in the chat template as
    text (the tokens `MemoryLM.prompt_ids(question)` gives the backends), or with `chat`
    False the task's raw prompt where it has one."""
    if task.prompt is not None and not chat:
        return task.prompt
    if lm.tokenizer.chat_template:
        messages = [{"role": "user", "content": task.question}]
        return lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"Question: {task.question}\nAnswer:"


def plain_answers(lm: MemoryLM, document: str, questions: list[Question]) -> list[str | None]:
    """The stock model on each question: the document's last tokens that fit its window
    (the same cut for every question, made for the longest one), then the question's prompt.

    The document's tokens run through the model once; each question continues from that
    cache, which is then cut back to the document (`crop`) for the next: what answering each
    alone would compute. None for a question whose answer is not in the tokens that fit: the
    model cannot know it then, and running it (tens of seconds per question on a CPU for a
    window of thousands of tokens) would only measure luck.
    """
    doc_ids = lm.tokenizer(document, add_special_tokens=False)["input_ids"]
    prompts = [lm.prompt_ids(q.prompt, chat=False) for q in questions]
    room = lm.max_positions - max(len(p) + q.max_new_tokens for p, q in zip(prompts, questions))
    kept = doc_ids[-room:]
    window_text = lm.tokenizer.decode(kept)
    visible = [q.answer in window_text for q in questions]
    if not any(visible):
        return [None] * len(questions)
    outputs: list[str | None] = []
    with torch.inference_mode():
        cache = DynamicCache(config=lm.model.config)
        lm.model(torch.tensor([kept]), past_key_values=cache, use_cache=True)
        for question, prompt_ids, seen in zip(questions, prompts, visible):
            if not seen:
                outputs.append(None)
                continue
            input_ids = torch.tensor([kept + prompt_ids])
            out = lm.model.generate(input_ids, past_key_values=cache, max_new_tokens=question.max_new_tokens,
                                    do_sample=False, pad_token_id=0)  # fmt: skip
            outputs.append(lm.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))
            cache.crop(len(kept) - cache.get_seq_length())  # drop what this question added
    return outputs


@dataclass
class MemoryAnswer:
    output: str
    evidence_rank: int | None = None  # see Trial
    evidence_read: bool | None = None
    candidate_rank: int | None = None
    candidate_found: bool | None = None


def memory_answer(lm: MemoryLM, task: Task, memory: str, chat: bool = True) -> MemoryAnswer:
    """A backend's answer to `task`'s question about the document in `memory`: in the chat
    template, or with `chat` False the task's raw prompt where it has one. The evidence is
    scored, in what was read and among the first stage's candidates, when the read reports
    what it placed in front of the model and the task names its evidence sentences."""
    if chat or task.prompt is None:
        answer = lm.generate_full(task.question, memory=memory, chat=True, max_new_tokens=task.answer_tokens)
    else:
        answer = lm.generate_full(task.prompt, memory=memory, chat=False, max_new_tokens=task.answer_tokens)
    found = MemoryAnswer(answer.text)
    if (answer.evidence or answer.in_view) and task.evidence:
        spans = token_spans(lm.tokenizer, task.document, task.evidence)
        found.evidence_rank, found.evidence_read = evidence_found(answer.evidence, answer.in_view, spans)
        if answer.candidates:
            found.candidate_rank, found.candidate_found = evidence_found(answer.candidates, answer.in_view, spans)
    return found


# -- the run of one configuration ------------------------------------------------------------------


def run_config(
    name: str,
    lm: MemoryLM | None,
    base: MemoryLM,
    docs: Sequence[Document],
    reuse: dict[DocumentKey, list[Trial]] | None = None,
    checkpoint: Path | None = None,
    chat: bool = True,
    keep_memories: bool = False,
) -> list[Trial]:
    """Ask every question of every document; `lm` None is the plain model (`base`, cut to its window).
    A document in `reuse` (answered_before) keeps its earlier trials; each newly answered
    document's trials are appended to `checkpoint` once all its questions are answered.
    A document already in `lm`'s store (ingested by another read of the same backend) is not
    ingested again; `keep_memories` leaves each document's memory there for the next one."""
    trials: list[Trial] = []
    bar = tqdm(total=sum(len(tasks) for *_, tasks in docs), desc=f"eval {name}", unit="question")
    for family, length, seed, tasks in docs:
        earlier = (reuse or {}).get((name, family, length, seed))
        if reusable(earlier, tasks):
            trials += earlier
            bar.update(len(earlier))
            continue
        done_before = len(trials)
        document = tasks[0].document
        tokens = len(base.tokenizer(document, add_special_tokens=False)["input_ids"])
        if lm is None:
            # The plain model reads the document once for all its questions; it is skipped (None)
            # on a question whose answer lies outside its window.
            questions = [Question.of(task, prompt_text(base, task, chat)) for task in tasks]
            answered = plain_answers(base, document, questions)
        else:
            memory = f"eval-{family}-{length}-{seed}"
            if memory not in lm.memories():
                lm.ingest(document, memory=memory, progress=False)
        for index, task in enumerate(tasks):
            if lm is None:
                found, visible = MemoryAnswer(answered[index] or ""), answered[index] is not None
            else:
                found, visible = memory_answer(lm, task, memory, chat), None
            trials.append(Trial(name, family, task.kind, length, tokens, task.depth, seed, task.question,
                                task.answer, found.output, task.score(found.output), visible, found.evidence_rank,
                                found.evidence_read, found.candidate_rank, found.candidate_found))  # fmt: skip
            right = [t.right for t in trials if t.length == length]
            bar.set_postfix(task=family, length=str(length), acc=f"{sum(right) / len(right):.2f}")
            bar.update()
        if lm is not None and not keep_memories:
            lm.forget(memory)
        keep(checkpoint, trials[done_before:])
    bar.close()
    return trials


# -- checkpoint and resume --------------------------------------------------------------------------


def answered_before(paths: Sequence[Path], header: dict) -> dict[DocumentKey, list[Trial]]:
    """The trials of every document answered in earlier runs, from their reports (`.json`) or
    checkpoints (`.trials.jsonl`: a header line, then one trial a line). Later files win.
    A run with another model, dtype or prompt style is refused: its answers are not ours; of a
    run with other memory settings only the plain model's answers, which never read a memory."""
    answered: dict[DocumentKey, list[Trial]] = {}
    for path in paths:
        if path.suffix == ".jsonl":
            earlier, *rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            earlier = json.loads(path.read_text())
            rows = earlier.get("trials", [])
        for key in ("model", "dtype", "chat"):
            if earlier.get(key) != header[key]:
                raise ValueError(f"{path} was run with another {key}; its answers cannot be reused")
        plain_only = earlier.get("defaults") != header["defaults"]
        if plain_only:
            print(f"{path} was run with other memory settings: reusing its plain model's answers only")
        found: dict[DocumentKey, list[Trial]] = {}
        for row in rows:
            try:
                trial = Trial(**row)
            except TypeError as error:
                raise ValueError(f"{path} holds something other than benchmark trials ({error})") from None
            if plain_only and trial.config != "plain":
                continue
            found.setdefault((trial.config, trial.family, trial.length, trial.seed), []).append(trial)
        answered.update(found)
    return answered


def reusable(earlier: list[Trial] | None, tasks: list[Task]) -> bool:
    """Whether earlier trials answered exactly these questions (the depths of a seed's facts
    depend on the number of documents per cell, so the seed alone does not say)."""
    return earlier is not None and [(t.depth, t.question, t.answer) for t in earlier] == [
        (task.depth, task.question, task.answer) for task in tasks
    ]


def keep(checkpoint: Path | None, trials: list[Trial]) -> None:
    if checkpoint is not None:
        with checkpoint.open("a") as file:
            file.writelines(json.dumps(asdict(t)) + "\n" for t in trials)
