"""Training objectives for memory layers, on the same attention code as inference: a memory
is ingested (no gradient: memory keys are constants, as in Memorizing Transformers), then a
read-only `MemorySession` runs the tokens to learn from with gradients on.

- `gate_loss`: Memorizing-Transformer gates (knn backend), base model frozen: the loss of
  the answer to a generated task after its document was ingested.
- `crossbatch_loss`: Focused Transformer crossbatch. In the memory layers each document
  attends, in one softmax with its local keys, to its own previous context (positives) and
  to the previous contexts of d-1 other documents of the batch (negatives).
- `recurrent_loss`: RMT. A generated document is written segment by segment into notes with
  autograd on: each write learns the facts of its segment as targets, and the loss of the
  answer, read through the final notes, flows back through the writes of the last segments
  (truncated backpropagation through time).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from memlm.engine import MemoryLM
from memlm.memory.base import Session
from memlm.memory.session import MemorySession
from memlm.store.base import SearchResult, VectorStore
from memlm.store.buffered import merge_results
from memlm.tasks import Task, babilong, passkey
from memlm.train.data import TRAIN_SEED_BASE

# Every training example's retrieval takes the whole memory (FoT trains without kNN).
RETRIEVE_ALL = 1_000_000


class UnionStore:
    """Searches several memories as one: the crossbatch memory of a document is its own
    previous context plus the other documents'. Read-only."""

    def __init__(self, store: VectorStore, memories: list[str]):
        self.store, self.memories = store, memories

    def search(self, memory: str, layer: int, queries: np.ndarray, top_k: int) -> SearchResult:
        found = None
        for name in self.memories:  # ties go to the earlier memory: the document's own first
            found = merge_results(found, self.store.search(name, layer, queries, top_k), top_k)
        return found


def reading_session(lm: MemoryLM, memory: str, read_from: list[str] | None = None) -> MemorySession:
    """A read-only session over `memory`'s window that retrieves everything from `read_from`."""
    return MemorySession(
        lm.model,
        lm.shape,
        replace(lm.config, top_k=RETRIEVE_ALL),
        lm.backend,
        lm.store if read_from is None else UnionStore(lm.store, read_from),
        memory,
        writes=False,
        state=lm.store.load_state(memory),
    )


def example_seeds(seed: int, index: int) -> tuple[random.Random, int]:
    """Training example `index` of a run seeded `seed`: a random source for its choices
    (depths, kinds) and the seed of its generated task, far from every benchmark's."""
    return random.Random(seed * 7919 + index), TRAIN_SEED_BASE + seed * 100_003 + index


def answer_loss(lm: MemoryLM, session: Session, task: Task) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the task's answer after its raw prompt, read through `session` with
    autograd on; and the tokens run."""
    prompt = lm.prompt_ids(task.prompt, chat=False)
    answer = lm.tokenizer(" " + task.answer, add_special_tokens=False)["input_ids"]
    logits = session.forward(prompt + answer, logits="all")
    loss = F.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(answer, device=logits.device))
    return loss, len(prompt) + len(answer)


def gate_loss(lm: MemoryLM, length: int, needs_memory: bool, seed: int) -> Callable[[int], tuple[torch.Tensor, int]]:
    """Passkey examples; `needs_memory` puts the key deep in the document (only memory has
    it), otherwise at its very end (in the local window, memory holds filler only)."""

    def loss(index: int) -> tuple[torch.Tensor, int]:
        rng, task_seed = example_seeds(seed, index)
        depth = rng.uniform(0.05, 0.5) if needs_memory else 1.0
        task = passkey(length, depth=depth, seed=task_seed)
        lm.ingest(task.document, memory="train-gate", progress=False)
        try:
            return answer_loss(lm, lm.open_session("train-gate", writes=False), task)
        finally:
            lm.forget("train-gate")

    return loss


def crossbatch_size(index: int, total: int, max_docs: int) -> int:
    """d grows from 1 (positives only) to max_docs over the run, in equal stages."""
    stage = index * max_docs // max(1, total)
    return min(max_docs, 1 + stage)


def crossbatch_loss(
    lm: MemoryLM,
    document: Callable[[int], list[int]],
    context_len: int,
    total_examples: int,
    max_docs: int,
) -> Callable[[int], tuple[torch.Tensor, int]]:
    """Example `index`: d documents; each one's first `context_len` tokens are ingested into
    its own memory, then its remaining tokens are predicted reading the union of all d."""

    def loss(index: int) -> tuple[torch.Tensor, int]:
        docs = [document(index * 1000 + j) for j in range(crossbatch_size(index, total_examples, max_docs))]
        names = [f"crossbatch-{j}" for j in range(len(docs))]
        try:
            for name, doc in zip(names, docs):
                lm.ingest_tokens(doc[:context_len], name, progress=False)
            total, tokens = 0.0, 0
            for j, doc in enumerate(docs):
                session = reading_session(lm, names[j], read_from=[names[j], *names[:j], *names[j + 1 :]])
                target = doc[context_len:]
                logits = session.forward(target, logits="all")
                total = total + F.cross_entropy(logits[:-1], torch.tensor(target[1:], device=logits.device))
                tokens += len(target)
        finally:
            for name in names:
                if name in lm.store.memories():
                    lm.forget(name)
        return total / len(docs), tokens

    return loss


def curriculum_segments(index: int, total: int, max_segments: int, min_segments: int = 1) -> int:
    """Document segments of example `index`: from min_segments up to max_segments over the
    run, in equal stages (RMT's curriculum: short recurrences first)."""
    stages = max_segments - min_segments + 1
    return min(max_segments, min_segments + index * stages // max(1, total))


def recurrent_task(index: int, num_tokens: int, seed: int) -> Task:
    """Training example `index`: a passkey or a BABILong question on a document of one to
    four facts' questions (as the benchmarks ask), in turn, facts anywhere in the document
    (seeds far from the benchmarks')."""
    rng, task_seed = example_seeds(seed, index)
    if index % 3 == 0:
        return passkey(num_tokens, depth=rng.uniform(0.0, 1.0), seed=task_seed)
    depths = [rng.uniform(0.0, 0.9) for _ in range(rng.randint(1, 4))]
    return rng.choice(babilong(num_tokens, depths, seed=task_seed))


def segment_notes(tokenizer, task: Task, segment_len: int) -> tuple[list[int], list[list[int]]]:
    """The document's token ids, and per segment the notes an rmt write should add: the
    task's facts that end in that segment, in document order, after a space."""
    encoded = tokenizer(task.document, add_special_tokens=False, return_offsets_mapping=True)
    spans = sorted((start + len(fact), fact) for fact in task.facts if (start := task.document.find(fact)) >= 0)
    token_ends = np.searchsorted([end for _, end in encoded["offset_mapping"]], [end for end, _ in spans])
    per_segment: list[list[str]] = [[] for _ in range(0, len(encoded["input_ids"]), segment_len)]
    for (_, fact), token_end in zip(spans, token_ends):  # the segment holding the fact's last token
        per_segment[min(int(token_end) // segment_len, len(per_segment) - 1)].append(fact)
    encode = lambda facts: tokenizer(" " + " ".join(facts), add_special_tokens=False)["input_ids"]  # noqa: E731
    return encoded["input_ids"], [encode(facts) if facts else [] for facts in per_segment]


def recurrent_loss(
    lm: MemoryLM, total_examples: int, max_segments: int, bptt: int, seed: int, min_segments: int = 1
) -> Callable[[int], tuple[torch.Tensor, int]]:
    """RMT objective on a generated document read segment by segment: every write's
    cross-entropy against the notes it should add (the facts of its segment, then the end
    token), plus the answer's cross-entropy read through the final memory, whose gradient
    flows back through the notes written in the last `bptt` segments."""
    if lm.config.backend != "rmt":
        raise ValueError(f"recurrent_loss trains the rmt backend, not {lm.config.backend!r}")
    segment_len, end = lm.config.segment_len, lm.backend.end_token_id

    def loss(index: int) -> tuple[torch.Tensor, int]:
        segments = curriculum_segments(index, total_examples, max_segments, min_segments)
        # 5% short of the segment budget: the generators' token counts are estimates.
        task = recurrent_task(index, int(segments * segment_len * 0.95), seed)
        document, notes = segment_notes(lm.tokenizer, task, segment_len)
        writer = lm.open_session("train-rmt", writes=True)
        write_loss = torch.zeros((), device=lm.model.device)
        for number, start in enumerate(range(0, len(document), segment_len)):
            if number == len(notes) - bptt:
                writer.cut()
            target = notes[number] + [end]
            logits = writer.learn(document[start : start + segment_len], notes[number])
            write_loss = write_loss + F.cross_entropy(logits, torch.tensor(target, device=logits.device))
        answer, asked = answer_loss(lm, writer.reader(), task)
        return answer + write_loss / len(notes), len(document) + asked

    return loss


def freeze_all_but(lm: MemoryLM, trainable: dict[str, torch.nn.Parameter]) -> None:
    for p in lm.model.parameters():
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
