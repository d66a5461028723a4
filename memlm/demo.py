"""Document QA: ingest a long document into memory, answer questions about it, and show
where in the document the memory that the model read came from."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from memlm.engine import GenerationResult, MemoryLM
from memlm.store import FaissStore
from memlm.tasks import Task, handbook


@dataclass
class Source:
    start: int  # first token position of a retrieved block
    end: int
    votes: int  # how many (layer, head) retrievals chose it
    snippet: str


def read_document(path: Path) -> str:
    """Text of a .txt/.md file; .html and .pdf are converted to text."""
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        from bs4 import BeautifulSoup

        return BeautifulSoup(path.read_text(encoding="utf-8", errors="replace"), "html.parser").get_text("\n")
    if suffix == ".pdf":
        from pypdf import PdfReader

        try:
            return "\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
        except Exception as error:  # pypdf raises many kinds on damaged files
            raise ValueError(f"cannot read {path} as PDF: {error}") from error
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); convert it or pass a .html/.pdf file") from error


def sources(lm: MemoryLM, memory: str, result: GenerationResult, top: int = 3) -> list[Source]:
    """The memory blocks most often retrieved for the question, across layers and heads."""
    votes: Counter[tuple[int, int]] = Counter()
    for retrieval in result.retrieved.values():
        blocks = retrieval.positions.reshape(-1, retrieval.positions.shape[-1])  # (H*C*k, B)
        votes.update((int(block[0]), int(block[-1])) for block in blocks)
    token_ids = lm.store.load_state(memory)["token_ids"]
    found = []
    for (start, end), count in votes.most_common(top):
        text = lm.tokenizer.decode(token_ids[max(0, start - 8) : end + 9].tolist())
        found.append(Source(start, end, count, " ".join(text.split())))
    return found


def run_demo(
    tokens: int = 50_000,
    file: Path | None = None,
    questions: list[str] | None = None,
    backend: str = "fot",
    model: str | None = None,
    seed: int = 0,
    lm: MemoryLM | None = None,
) -> float | None:
    """Run the demo; returns accuracy on the built-in questions (None for a user's file)."""
    if file is not None:
        document, tasks = read_document(Path(file)), []
        if not document.strip():
            raise ValueError(f"{file} holds no text")
        name = "demo-file"
    else:
        document, tasks = handbook(tokens, seed=seed)
        name = "demo-handbook"
    tasks = tasks + [Task(document, q, "") for q in questions or []]
    if not tasks:
        raise ValueError("no questions: pass --question for your own file")
    # The demo keeps its memory in RAM: it never mixes with, or leaves behind, a user's memories.
    lm = lm or MemoryLM.load(model=model, backend=backend, store=FaissStore(None))
    print(f"\nIngesting {'the file ' + str(file) if file else 'a generated handbook'} into memory {name!r}...")
    stats = lm.ingest(document, memory=name)
    print(f"{stats.tokens} tokens in {stats.seconds:.0f} s ({stats.tokens_per_second:.0f} tokens/s); "
          f"the model's own window is {lm.max_positions} tokens.\n")
    right, asked, started = 0, 0, time.perf_counter()
    for task in tasks:
        print(f"Q: {task.question}\nA: ", end="", flush=True)
        result = GenerationResult("", [], "", 0, {})
        for piece in lm.stream(task.question, memory=name, max_new_tokens=48, result=result):
            print(piece.text, end="", flush=True)
        print()
        if task.answer:
            asked += 1
            right += task.score(result.text)
            print(f"   expected: {task.answer}  [{'right' if task.score(result.text) else 'wrong'}]"
                  f"  (fact at {task.depth:.0%} of the document)")
        for source in sources(lm, name, result):
            print(f"   read tokens {source.start}-{source.end} ({source.votes} heads): ...{source.snippet[:150]}...")
        print()
    accuracy = right / asked if asked else None
    print(f"Summary: {stats.tokens} tokens ingested in {stats.seconds:.0f} s; {len(tasks)} questions in "
          f"{time.perf_counter() - started:.0f} s" + (f"; built-in questions right: {right}/{asked}" if asked else ""))
    return accuracy

