"""Document QA: ingest a long document into memory, answer questions about it, and show
where in the document the memory that the model read came from.

The model runs in this process (a RAM store, so the demo never mixes with or leaves behind
a user's memories), or in a running `memlm serve` (`server="host:port"`), where the demo
writes a memory of its own name and deletes it at the end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from memlm.engine import GenerationResult, MemoryLM
from memlm.store import FaissStore
from memlm.tasks import Task, handbook

QUICK_TOKENS = 2_000  # --quick: a handbook the embedded model reads in seconds
QUICK_FACTS = 4


@dataclass
class Source:
    start: int  # first document token of a passage the question read
    end: int  # one past its last
    rank: int  # 0 = the passage the memory's read ranked first
    snippet: str


@dataclass
class Answer:
    task: Task
    text: str
    seconds: float
    sources: list[Source] = field(default_factory=list)

    @property
    def right(self) -> bool | None:
        return self.task.score(self.text) if self.task.answer else None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def read_document(path: Path) -> str:
    """Text of a .txt/.md file (any suffix but .html/.htm/.pdf is read as UTF-8 text);
    .html and .pdf are converted to text. Raises ValueError with one line that says what
    is wrong (missing, a folder, unreadable, not text, a damaged PDF, no text in it)."""
    if not path.exists():
        raise ValueError(f"no such file: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    suffix = path.suffix.lower()
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or _first_line(error)}") from error
    if suffix in (".html", ".htm"):
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(raw, "html.parser")  # finds the encoding from the bytes and <meta charset>
        for hidden in soup(["script", "style", "noscript", "template"]):
            hidden.decompose()  # code and styles are not part of what a reader sees
        text = soup.get_text("\n")
    elif suffix == ".pdf":
        import io

        from pypdf import PdfReader

        try:
            text = "\n".join(page.extract_text() or "" for page in PdfReader(io.BytesIO(raw)).pages)
        except Exception as error:  # pypdf raises many kinds on damaged files
            raise ValueError(f"cannot read {path} as PDF: {_first_line(error)}") from error
        if not text.strip():
            raise ValueError(f"{path} holds no text (a scanned PDF has no text layer: run OCR on it first)")
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path} is not UTF-8 text (byte {error.start}); convert it, or pass a .txt, .md, .html or .pdf file"
            ) from error
    if not text.strip():
        raise ValueError(f"{path} holds no text")
    return text


def sources(lm: MemoryLM, memory: str, result: GenerationResult, top: int = 3) -> list[Source]:
    """The `top` best-ranked passages the question read (`GenerationResult.evidence`)."""
    token_ids = lm.store.load_state(memory)["token_ids"]
    best = sorted(result.evidence, key=lambda passage: passage.rank)[:top]
    return [
        Source(p.start, p.end, p.rank, " ".join(lm.tokenizer.decode(token_ids[p.start : p.end].tolist()).split()))
        for p in best
    ]


# -- where the model runs ---------------------------------------------------------------------


@dataclass
class Ingested:
    tokens: int | None  # None when the server does not say
    seconds: float
    window: int | None  # the model's own context, when known


class Reader(Protocol):
    """A model with a memory holding the demo's document."""

    def ingest(self, document: str) -> Ingested: ...

    def ask(self, question: str, max_new_tokens: int) -> Iterator[str]: ...

    def sources(self) -> list[Source]: ...  # of the last answer

    def close(self) -> None: ...


class LocalReader:
    def __init__(self, lm: MemoryLM, memory: str):
        self.lm, self.memory = lm, memory
        self._last = GenerationResult("", [], "", 0, {})
        if memory in lm.memories():  # a caller's model may hold an earlier run's memory
            lm.forget(memory)

    def ingest(self, document: str) -> Ingested:
        stats = self.lm.ingest(document, memory=self.memory)  # shows a progress bar
        return Ingested(stats.tokens, stats.seconds, self.lm.max_positions)

    def ask(self, question: str, max_new_tokens: int) -> Iterator[str]:
        generation = self.lm.stream(question, memory=self.memory, max_new_tokens=max_new_tokens)
        for piece in generation:
            yield piece.text
        self._last = generation.result

    def sources(self) -> list[Source]:
        return sources(self.lm, self.memory, self._last)

    def close(self) -> None:
        self.lm.forget(self.memory)


class RemoteReader:
    """A running `memlm serve`. It streams answers but does not report what memory was
    read, so there are no sources to show."""

    CHUNK_CHARS = 16_000  # text per Ingest call: the progress bar moves once per call

    def __init__(self, address: str):
        from memlm.serve.client import MemoryClient

        self.client = MemoryClient(address)
        self.memory = f"demo-{uuid.uuid4().hex[:8]}"  # never appends to someone else's memory
        self._created = False

    def ingest(self, document: str) -> Ingested:
        started, tokens = time.perf_counter(), 0
        with tqdm(total=len(document), unit="char", desc=f"ingest {self.memory}") as bar:
            for chunk in _chunks(document, self.CHUNK_CHARS):
                # Later calls append to the memory the first one created (create_only).
                reply = self.client.ingest(chunk, memory=self.memory, create_only=not self._created)
                self._created = True
                tokens += reply.tokens
                bar.update(len(chunk))
        return Ingested(tokens, time.perf_counter() - started, None)

    def ask(self, question: str, max_new_tokens: int) -> Iterator[str]:
        for piece in self.client.generate(question, memory=self.memory, max_new_tokens=max_new_tokens):
            yield piece.text

    def sources(self) -> list[Source]:
        return []

    def close(self) -> None:
        try:
            if self._created:
                self.client.delete(self.memory)
        finally:
            self.client.close()


def _chunks(text: str, size: int) -> Iterator[str]:
    """Pieces of about `size` characters, each cut just before whitespace, so that no word is
    split across two ingests (and the pieces tokenize as the whole text does, nearly)."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            end = cut if cut > start else end
        yield text[start:end]
        start = end


# -- the demo ---------------------------------------------------------------------------------


def run_demo(
    tokens: int = 50_000,
    file: Path | None = None,
    questions: list[str] | None = None,
    backend: str = "fot",
    model: str | None = None,
    seed: int = 0,
    lm: MemoryLM | None = None,
    quick: bool = False,
    server: str | None = None,
    max_new_tokens: int = 48,
) -> float | None:
    """Run the demo; returns accuracy on the built-in questions (None for a user's file).
    `quick`: a short handbook with fewer questions. `server`: host:port of a running `memlm
    serve`, whose model and backend answer (`backend` and `model` are then unused)."""
    if file is not None:
        document, tasks = read_document(Path(file)), []
        name, what = "demo-file", f"the file {file}"
    else:
        tokens, facts = (QUICK_TOKENS, QUICK_FACTS) if quick else (tokens, 8)
        document, tasks = handbook(tokens, seed=seed, num_facts=facts)
        name, what = "demo-handbook", "a generated handbook"
    tasks = tasks + [Task(document, q, "") for q in questions or [] if q.strip()]
    if not tasks:
        raise ValueError("no questions: pass --question for your own file")
    if server is not None:
        reader: Reader = RemoteReader(server)  # the server's model and backend
        print(f"\nIngesting {what} into memory {reader.memory!r} on {server}...")
    else:
        # The demo keeps its memory in RAM: it never mixes with, or leaves behind, a user's memories.
        reader = LocalReader(lm or MemoryLM.load(model=model, backend=backend, store=FaissStore(None)), name)
        print(f"\nIngesting {what} into memory {name!r} ({backend} backend)...")
    try:
        ingested = reader.ingest(document)
        window = f"; the model's own window is {ingested.window} tokens" if ingested.window else ""
        print(f"{ingested.tokens} tokens in {ingested.seconds:.1f} s "
              f"({(ingested.tokens or 0) / max(ingested.seconds, 1e-9):.0f} tokens/s){window}.\n")  # fmt: skip
        answers = [ask(reader, task, max_new_tokens) for task in tasks]
    finally:
        reader.close()
    return summarize(ingested, answers)


def ask(reader: Reader, task: Task, max_new_tokens: int) -> Answer:
    """Ask one question, streaming the answer, then say whether it was right and what was read."""
    print(f"Q: {task.question}\nA: ", end="", flush=True)
    started, text = time.perf_counter(), ""
    for piece in reader.ask(task.question, max_new_tokens):
        print(piece, end="", flush=True)
        text += piece
    answer = Answer(task, text, time.perf_counter() - started, reader.sources())
    print()
    if answer.right is not None:
        print(f"   expected: {task.answer}  [{'right' if answer.right else 'wrong'}]"
              f"  (fact at {task.depth:.0%} of the document)")  # fmt: skip
    for source in answer.sources:
        print(f"   read #{source.rank + 1}, tokens {source.start}-{source.end}: {_around(source.snippet, task.answer)}")
    print()
    return answer


def _around(snippet: str, answer: str, width: int = 160) -> str:
    """`width` characters of a passage, centred on the expected answer when it is there."""
    at = snippet.find(answer) if answer else -1
    start = max(0, min(at - width // 2, len(snippet) - width)) if at >= 0 else 0
    return ("..." if start else "") + snippet[start : start + width] + ("..." if start + width < len(snippet) else "")


def summarize(ingested: Ingested, answers: list[Answer]) -> float | None:
    """Print the closing summary; returns accuracy on the questions with a known answer."""
    scored = [a for a in answers if a.right is not None]
    right = sum(bool(a.right) for a in scored)
    seconds = sum(a.seconds for a in answers)
    print(f"Summary: {ingested.tokens} tokens ingested in {ingested.seconds:.1f} s; {len(answers)} questions "
          f"answered in {seconds:.1f} s ({seconds / max(1, len(answers)):.1f} s each)")  # fmt: skip
    if scored:
        marks = ", ".join(f"{'right' if a.right else 'wrong'} at {a.task.depth:.0%}" for a in scored)
        print(f"         built-in questions right: {right}/{len(scored)} ({marks})")
    return right / len(scored) if scored else None
