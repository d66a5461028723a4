"""`memlm calibrate heads`: which (layer, query head) pairs retrieve evidence.

Only some attention heads look things up (retrieval heads, Wu et al. 2024); the rest attend
by position or syntax, and their votes for memory blocks are noise. Calibration asks
generated questions about generated documents, with seeds apart from every benchmark's,
and counts for each (layer, query head) how often the block holding the answer's sentence
is among its top `hit_k` blocks for the question's own queries. The profile keeps the
`keep` best heads with their hit rates as vote weights (`HeadProfile`), and the passage
read counts only their votes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from memlm.engine import MemoryLM
from memlm.memory.reading import HeadProfile, token_spans
from memlm.tasks import Task, handbook, prose_needles

# Seeds of the calibration documents: benchmarks use seeds below 10**8.
SEED_BASE = 900_000_000


@dataclass
class CalibrationConfig:
    documents: int = 4  # generated documents (half handbooks, half needles in the Vim manual)
    length: int = 8_000  # tokens per document
    questions_per_document: int = 6
    hit_k: int = 8  # a head hits when the evidence block is among its top hit_k blocks
    keep: int = 24  # heads kept in the profile
    out: Path = field(default_factory=lambda: Path("heads.json"))

    def validate(self) -> None:
        for name in ("documents", "length", "questions_per_document", "hit_k", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.length < 2_000:
            raise ValueError("length must be at least 2000 tokens: shorter documents leave the memory nearly empty")


def calibration_tasks(config: CalibrationConfig) -> list[list[Task]]:
    """Per document, its questions: evidence spread from 5% to 75% of the document (the
    last part stays in the local window, which needs no retrieval)."""
    n = config.questions_per_document
    depths = [0.05 + 0.7 * i / max(1, n - 1) for i in range(n)]
    documents = []
    for i in range(config.documents):
        seed = SEED_BASE + i
        if i % 2 == 0:
            documents.append(handbook(config.length, seed=seed, depths=depths)[1])
        else:
            documents.append(prose_needles(config.length, depths, seed=seed))
    return documents


def head_hits(lm: MemoryLM, memory: str, task: Task, evidence: tuple[int, int], hit_k: int) -> np.ndarray:
    """(layers, query heads) booleans: whose top `hit_k` blocks for the question reach into
    the task's evidence sentence, document tokens [start, end) (read with its neighbours,
    such a block brings the sentence in). Layers without memory stay False."""
    start, end = evidence
    session = lm.open_session(memory, writes=False)
    prompt = lm.prompt_ids(task.question)
    hits = np.zeros((lm.shape.num_layers, lm.shape.num_heads), dtype=bool)
    for layer, found in lm.search_with_question(session, prompt, lm.question_span(task.question)).items():
        top = found.positions[:, :, :hit_k]  # (Hkv, G, k, B)
        first, last = top[..., 0], top[..., -1]
        overlaps = ((first < end) & (last >= start)).any(axis=-1)  # (Hkv, G)
        hits[layer] = overlaps.reshape(-1)
    return hits


def calibrate_heads(lm: MemoryLM, config: CalibrationConfig) -> tuple[HeadProfile, dict]:
    """Measure every head's hit rate; returns the profile and what was measured."""
    config.validate()
    documents = calibration_tasks(config)
    total = sum(len(tasks) for tasks in documents)
    rows: list[np.ndarray] = []
    with tqdm(total=total, desc="calibrate heads", unit="question") as bar:
        for i, tasks in enumerate(documents):
            memory = f"calibrate-{i}"
            if memory in lm.memories():
                lm.forget(memory)
            lm.ingest(tasks[0].document, memory, progress=False)
            spans = token_spans(lm.tokenizer, tasks[0].document, [task.evidence[0] for task in tasks])  # tokenized once
            try:
                for task, span in zip(tasks, spans):
                    rows.append(head_hits(lm, memory, task, span, config.hit_k))
                    bar.update()
            finally:
                lm.forget(memory)
    rates = np.mean(rows, axis=0)  # (layers, heads)
    keep = min(config.keep, rates.size)
    threshold = np.sort(rates.ravel())[-keep]
    weights = np.where(rates >= threshold, rates, 0.0).astype(np.float32)
    if not weights.any():
        raise ValueError("no head found any evidence: is the model too small, or the documents too short?")
    best = np.argsort(-rates.ravel())[:keep]
    measured = {
        "questions": total,
        "documents": config.documents,
        "length": config.length,
        "hit_k": config.hit_k,
        "kept_heads": [[int(i // rates.shape[1]), int(i % rates.shape[1]), round(float(rates.ravel()[i]), 3)] for i in best],
    }
    return HeadProfile(weights, source="memlm calibrate heads"), measured


def run(config: CalibrationConfig, model: str | None = None) -> Path:
    """Calibrate the model at `model` (default: the embedded one) and write its profile."""
    from memlm.store import FaissStore

    lm = MemoryLM.load(model, store=FaissStore(None), default_adapter=False)
    profile, measured = calibrate_heads(lm, config)
    path = profile.save(config.out, model=Path(lm.model.name_or_path).name, **measured)
    print(f"wrote {path}: {config.keep} heads kept; best hit rates "
          + ", ".join(f"L{layer}H{head} {rate:.2f}" for layer, head, rate in measured["kept_heads"][:5]))  # fmt: skip
    return path
