"""`memlm bench realdoc`: free-form question answering on a real document that nobody in this
project wrote: the Vim user manual (`usr_01.txt` ... of the Debian package `vim-runtime`, read
where it is installed, else downloaded with apt at benchmark time; never committed), or any
text given with `--file` and its own questions.

The generated tasks of `memlm bench eval` place one clean fact in filler; a manual states many
similar facts (a dozen commands that delete something) in dense, repetitive technical prose.
This measures whether memory still finds the one passage a question needs there. Sixteen
questions with short, checkable answers (the command that deletes a word, what "u" does, ...)
are written for chapters 1-10 (about 53,000 tokens of the embedded model's tokenizer) and two
more for chapters 11-12; each names the sentence of the manual that states its answer (its
anchor), which gives the answer's depth in the document and lets a test check the answer is
really there.

Configurations side by side, all asked the same chat-template questions:
- `plain`: the model alone, the document cut to its window (not run, and scored wrong, when
  the answer's text is not in the part that fits, as in `memlm bench eval`);
- `in-window`: the model alone with only the chapter that holds the answer (a window-sized
  stretch around the anchor when the chapter does not fit). What the model can do with the
  passage in front of it: a memory backend below this is losing the passage, not the model
  failing to read it;
- the memory backends (`fot`, `knn`, `rmt` by default), the whole document ingested once.

Accuracy comes with a 95% Wilson interval; with 16 questions on one document the intervals
are wide, and the questions are not independent. Prints a table and writes `realdoc.json`
and `realdoc.png`.
"""

from __future__ import annotations

import bisect
import glob
import json
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

from memlm.bench.eval import config_lm, evidence_cell
from memlm.bench.report import (
    BENCH_DTYPE,
    accuracy_cell,
    adapter_names,
    check_names,
    interval_errors,
    report_header,
    save_report,
    saved_figure,
)
from memlm.bench.trials import prompt_text, run_config
from memlm.config import BACKENDS, MemoryConfig
from memlm.demo import read_document
from memlm.engine import MemoryLM
from memlm.model.loading import load_model
from memlm.store import FaissStore
from memlm.tasks import Task, score_answer

T = TypeVar("T")

# "plain": the model alone, its input cut to its window; "in-window": the model alone with the
# chapter that holds the answer; the rest are memory backends.
CONFIGS: tuple[str, ...] = ("plain", "in-window", *BACKENDS, "fot-words", "knn-words")  # -words: no dense index
DEFAULT_CONFIGS: tuple[str, ...] = ("plain", "in-window", "fot", "knn", "rmt")
DEFAULT_CHAPTERS: tuple[int, ...] = tuple(range(1, 11))  # 52,920 tokens of the embedded model's tokenizer
VIM_DOCS = "/usr/share/vim/vim*/doc"  # where Debian's vim-runtime installs the manual
PACKAGE = "vim-runtime"
ANSWER_TOKENS = 32  # free-form answers: room for a sentence around the command


@dataclass(frozen=True)
class Question:
    """A question written for the document, with the sentence of it that states the answer."""

    question: str
    answer: str  # the expected answer, as the document writes it
    anchor: str  # text of the document that states the answer (matched across any whitespace)
    chapter: int | None = None  # the manual's chapter that holds the anchor; None for a user's file
    variants: tuple[str, ...] = ()  # other ways to write a right answer
    distractors: tuple[str, ...] = ()  # wrong answers the document also offers (see Task.distractors)
    # Shares no rare word with its anchor: the read must find it by meaning, not by its words.
    paraphrased: bool = False


# Written for the Vim 9.0 user manual; every anchor is checked against the text by
# tests/test_realdoc.py. Answers are scored whole-word and case-blind (`score_answer`), so
# no answer here differs from another command only by case ("u" and "U").
QUESTIONS: tuple[Question, ...] = (
    Question("Which program teaches Vim with a hands-on tutorial?", "vimtutor",
             "Instead of reading the text (boring!) you can use the vimtutor to learn", 1,
             variants=("gvimtutor",), paraphrased=True),
    Question("In Vim's Normal mode, which command deletes the whole current line?", "dd",
             'To delete a whole line use the "dd" command.', 2, distractors=("x", "dw")),
    Question('What does the "u" command do in Vim?', "undo",
             'The "u" command undoes the last edit.', 2, variants=("undoes", "undoing", "undone")),
    Question("Which Vim command quits and throws away all changes?", ":q!",
             "Vim has a quit-and-throw-things-away command. It is: > :q!", 2,
             variants=("q!",), distractors=(":wq", "ZZ", ":x")),
    Question("Which key moves the cursor to the end of a line in Vim?", "$",
             'The "$" command moves the cursor to the end of a line.', 3,
             variants=("<End>",), distractors=("0", "^")),
    Question("Which Vim command moves the cursor to the matching parenthesis?", "%",
             '"%" command is very handy: It moves to the matching paren.', 3),
    Question("Which Vim command deletes a word?", "dw",
             'The "dw" command deletes a word.', 4, variants=("daw", "diw"), distractors=("dd", "x")),
    Question('Which two-letter Vim command swaps two characters, to fix a typo such as "teh"?', "xp",
             'and execute the command "xp".', 4, paraphrased=True),
    Question("On Unix, which file in your home directory holds the settings Vim reads when it starts?",
             "~/.vimrc", "For Unix and Macintosh this file is always used and is recommended: ~/.vimrc", 5,
             variants=("vimrc",)),
    Question("Which Vim command switches on syntax highlighting?", ":syntax enable",
             "It all starts with one simple command: > :syntax enable", 6,
             variants=("syntax enable", "syntax on")),
    Question("Which Vim command saves the current file and moves on to the next file in the argument list?",
             ":wnext", "There is a special command for this: > :wnext", 7, variants=("wnext",), paraphrased=True),
    Question("Which Vim command closes all windows except the current one?", ":only",
             "this command will be useful: > :only", 8, variants=("CTRL-W o", "ctrl+w o"), paraphrased=True),
    Question("Which command, typed in a shell, starts Vim showing the differences between two files?",
             "vimdiff", "vimdiff main.c~ main.c", 8, paraphrased=True),
    Question("Which command starts Vim with its graphical user interface?", "gvim",
             "gvim file.txt vim -g file.txt", 9, variants=("vim -g",), paraphrased=True),
    Question("After recording a macro into register a in Vim, which command replays it?", "@a",
             'command "@a" three times.', 10, distractors=("qa",), paraphrased=True),
    Question("Which Vim command finds the lines that match a pattern and executes a command on each of them?",
             ":global", 'The ":global" command is one of the more powerful features of Vim.', 10,
             variants=(":g",), paraphrased=True),
    Question("Which command-line argument makes Vim recover a file from its swap file after a crash?", "-r",
             'with the "-r" argument added: > vim -r help.txt', 11),
    Question("Which Vim Normal-mode command counts the words in the whole file?", "g CTRL-G",
             "When the whole file is what you want to count the words in, use this command: > g CTRL-G", 12,
             variants=("g ctrl+g", "g<c-g>", "g^g")),
)  # fmt: skip


@dataclass
class RealDocument:
    text: str
    source: str  # what it is, for the report
    package: str | None = None  # the Debian package it came from, and its version
    version: str | None = None
    chapters: dict[int, tuple[int, int]] = field(default_factory=dict)  # chapter -> (start, end) character

    def span(self, chapter: int | None) -> tuple[int, int]:
        """Characters of a chapter; the whole text for None or a chapter it does not have."""
        return self.chapters.get(chapter, (0, len(self.text))) if chapter is not None else (0, len(self.text))

    def chapter_at(self, offset: int) -> int | None:
        return next((n for n, (start, end) in self.chapters.items() if start <= offset < end), None)


@dataclass
class RealdocTask(Task):
    """A Task whose answer may be written several ways."""

    variants: tuple[str, ...] = ()
    chapter: int | None = None
    offset: int = 0  # character where the anchor starts in the document
    paraphrased: bool = False  # see Question

    def score(self, output: str) -> bool:
        return any(score_answer(output, answer, self.distractors) for answer in (self.answer, *self.variants))


DOCUMENTS: tuple[str, ...] = ("vim", "python")  # the Vim user manual; the Python tutorial (memlm/bench/pytutorial.py)


@dataclass
class RealdocConfig:
    document: str = "vim"  # which real document (DOCUMENTS), when no --file is given
    chapters: list[int] = field(default_factory=lambda: list(DEFAULT_CHAPTERS))  # of the Vim manual
    file: Path | None = None  # another text instead of the manual; needs `questions_file`
    questions_file: Path | None = None  # JSON list of Question fields
    configs: list[str] = field(default_factory=lambda: list(DEFAULT_CONFIGS))
    model: str | None = None
    out_dir: Path = Path("benchmarks/results")
    name: str = "realdoc"

    def validate(self) -> None:
        check_names("configuration", self.configs, CONFIGS)
        check_names("document", [self.document], DOCUMENTS)
        if not self.configs:
            raise ValueError("no configuration to run")
        if self.file is not None and self.questions_file is None:
            raise ValueError("--file needs --questions-file: the built-in questions are about the Vim manual")
        if self.file is None and not self.chapters:
            raise ValueError("no chapters given")


def parse_chapters(text: str) -> list[int]:
    """ "1-10", "1,2,5" or "1-3,11" -> sorted chapter numbers."""
    chapters: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, _, last = part.partition("-")
            chapters.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"chapters must look like 1-10 or 1,2,5; got {text!r}") from None
    return sorted(chapters)


# -- the document -------------------------------------------------------------------------------


def _run(command: list[str], cwd: Path | None = None) -> str:
    """stdout of a command; ValueError with its last error line when it fails."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=True)
    except subprocess.CalledProcessError as error:
        lines = (error.stderr or error.stdout or "").strip().splitlines()
        raise ValueError(f"{' '.join(command)} failed: {lines[-1] if lines else f'exit {error.returncode}'}") from None
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ValueError(f"{' '.join(command)} failed: {error}") from None
    return done.stdout


def installed_version(package: str) -> str | None:
    try:
        return _run(["dpkg-query", "-W", "-f=${Version}", package]).strip() or None
    except ValueError:
        return None


def _manual_dir(pattern: str) -> Path | None:
    found = [Path(d) for d in sorted(glob.glob(pattern)) if (Path(d) / "usr_01.txt").is_file()]
    return found[-1] if found else None  # the newest vimNN when several are installed


def _read_chapters(doc_dir: Path, chapters: list[int]) -> dict[int, str]:
    missing = [n for n in chapters if not (doc_dir / f"usr_{n:02d}.txt").is_file()]
    if missing:
        have = sorted(int(p.stem[4:]) for p in doc_dir.glob("usr_[0-9][0-9].txt"))
        raise ValueError(f"no chapter {missing} in {doc_dir}; it has {', '.join(map(str, have))}")
    return {n: (doc_dir / f"usr_{n:02d}.txt").read_text(encoding="utf-8", errors="replace") for n in chapters}


def package_files(package: str, pattern: str, find: Callable[[str], Path | None], read: Callable[[Path], T],
                  what: str) -> tuple[T, str | None, str]:  # fmt: skip
    """`read(folder)` of a Debian package's folder (`find(pattern)`: the folder, or None) where
    the package is installed, else in the package downloaded (not installed) into a temporary
    folder; with the package's version and where it was read."""
    found = find(pattern)
    if found is not None:
        return read(found), installed_version(package), str(found)
    with tempfile.TemporaryDirectory(prefix="memlm-realdoc-") as folder:
        tmp = Path(folder)
        try:
            _run(["apt-get", "download", package], cwd=tmp)
            deb = next(tmp.glob(f"{package}_*.deb"))
            _run(["dpkg-deb", "-x", str(deb), str(tmp / "root")])
        except (ValueError, StopIteration) as error:
            why = str(error) or "no .deb downloaded"
            raise ValueError(f"{what} is not installed ({pattern}) and fetching {package} failed: {why}; "
                             f"install {package} or pass --file") from None  # fmt: skip
        found = find(str(tmp / "root" / pattern.lstrip("/")))
        if found is None:
            raise ValueError(f"{deb.name} holds no {what} ({pattern})")
        version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
        return read(found), version, f"{deb.name}, downloaded at benchmark time"


def vim_manual(chapters: list[int]) -> RealDocument:
    """The chosen chapters of the Vim user manual, from the installed vim-runtime, else from
    the package downloaded (not installed) into a temporary folder."""
    texts, version, where = package_files(PACKAGE, VIM_DOCS, _manual_dir, partial(_read_chapters, chapters=chapters),
                                          "the Vim manual")  # fmt: skip
    text, spans = "", {}
    for number, chapter in texts.items():
        spans[number] = (len(text), len(text) + len(chapter))
        text += chapter
    listed = ",".join(map(str, chapters))
    return RealDocument(text, f"Vim user manual, chapters {listed} ({where})", PACKAGE, version, spans)


def load_questions(path: Path) -> list[Question]:
    """Questions from a JSON list of objects with `question`, `answer` and optionally `anchor`
    (default: the answer itself), `variants` and `distractors`."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read questions from {path}: {error}") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path} must hold a non-empty JSON list of questions")
    questions = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip()
                                                 for k in ("question", "answer")):  # fmt: skip
            raise ValueError(f"{path}: question {i} needs non-empty 'question' and 'answer' strings")
        questions.append(Question(item["question"], item["answer"], item.get("anchor") or item["answer"],
                                  variants=tuple(item.get("variants", ())),
                                  distractors=tuple(item.get("distractors", ())),
                                  paraphrased=bool(item.get("paraphrased", False))))  # fmt: skip
    return questions


def find_anchor(text: str, anchor: str) -> re.Match | None:
    """Where `anchor` is in `text`, whatever the whitespace between its words (the manual
    wraps lines and indents examples with tabs)."""
    return re.search(r"\s+".join(map(re.escape, anchor.split())), text)


def build_tasks(document: RealDocument, questions: list[Question]) -> list[RealdocTask]:
    """One task per question; ValueError naming the first question whose anchor is not in the
    document (in its chapter, when it names one), or whose anchor does not state its answer."""
    tasks = []
    for q in questions:
        start, end = document.span(q.chapter)
        found = find_anchor(document.text[start:end], q.anchor)
        if found is None:
            raise ValueError(f"the anchor of {q.question!r} is not in the document: {q.anchor!r}")
        if not any(score_answer(found.group(), answer) for answer in (q.answer, *q.variants)):
            raise ValueError(f"the anchor of {q.question!r} does not contain its answer {q.answer!r}")
        if q.answer not in document.text:  # the plain model's window check looks for it as written
            raise ValueError(f"the answer {q.answer!r} of {q.question!r} is not in the document as written")
        offset = start + found.start()
        # The anchor as the document writes it is the evidence a memory's read must bring.
        tasks.append(RealdocTask(document.text, q.question, q.answer, offset / len(document.text), kind="realdoc",
                                 evidence=(found.group(),), distractors=q.distractors, answer_tokens=ANSWER_TOKENS,
                                 variants=q.variants, chapter=document.chapter_at(offset), offset=offset,
                                 paraphrased=q.paraphrased))  # fmt: skip
    return tasks


def document_and_tasks(config: RealdocConfig) -> tuple[RealDocument, list[RealdocTask]]:
    if config.file is not None:
        document = RealDocument(read_document(Path(config.file)), str(config.file))
        return document, build_tasks(document, load_questions(config.questions_file))
    if config.document == "python":
        from memlm.bench.pytutorial import QUESTIONS as PYTHON_QUESTIONS
        from memlm.bench.pytutorial import python_tutorial

        document = python_tutorial()
        questions = load_questions(config.questions_file) if config.questions_file else list(PYTHON_QUESTIONS)
        return document, build_tasks(document, questions)
    document = vim_manual(config.chapters)
    if config.questions_file is not None:
        return document, build_tasks(document, load_questions(config.questions_file))
    questions = [q for q in QUESTIONS if q.chapter in config.chapters]
    if not questions:
        chapters = sorted({q.chapter for q in QUESTIONS})
        raise ValueError(f"no written question falls in chapters {config.chapters}; they cover chapters {chapters}")
    return document, build_tasks(document, questions)


def in_window_text(base: MemoryLM, document: RealDocument, task: RealdocTask) -> str:
    """The chapter that holds the answer; when it (or a user's whole file) does not fit the
    model's window beside the prompt and answer, the window-sized stretch centred on the anchor."""
    start, end = document.span(task.chapter)
    text = document.text[start:end]
    room = base.max_positions - len(base.prompt_ids(prompt_text(base, task), chat=False)) - task.answer_tokens
    spans = base.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(spans) <= room:
        return text
    at = bisect.bisect_right([s for s, _ in spans], task.offset - start) - 1
    first = max(0, min(at - room // 2, len(spans) - room))
    return text[spans[first][0] : spans[first + room - 1][1]]


# -- the run ------------------------------------------------------------------------------------


def evaluate(config: RealdocConfig) -> dict:
    """Ask every configuration every question; returns the report (see `run`)."""
    config.validate()
    document, tasks = document_and_tasks(config)
    hf_model, tokenizer = load_model(config.model, dtype=BENCH_DTYPE)
    base = MemoryLM(hf_model, tokenizer, FaissStore(None), MemoryConfig())
    tokens = len(tokenizer(document.text, add_special_tokens=False)["input_ids"])
    print(f"{document.source}: {tokens} tokens, {len(tasks)} questions; the model's window is "
          f"{base.max_positions} tokens")  # fmt: skip
    paraphrased = {task.question: task.paraphrased for task in tasks}
    whole = [("realdoc", tokens, 0, list(tasks))]  # one document, ingested once per backend
    trials, seconds = [], {}
    for name in config.configs:
        started = time.perf_counter()
        if name == "in-window":
            # One document per question: its chapter, read by the plain model.
            docs = [("realdoc", tokens, 0, [replace(task, document=in_window_text(base, document, task))])
                    for task in tasks]  # fmt: skip
            trials += run_config(name, None, base, docs)
        else:
            lm = config_lm(name, hf_model, tokenizer, config.model)
            trials += run_config(name, lm, base, whole)
            del lm  # a backend with an adapter holds its own copy of the model
        seconds[name] = time.perf_counter() - started
    accuracy = {name: realdoc_cell([t for t in trials if t.config == name]) for name in config.configs}
    # Literal questions repeat a rare word of their answer's sentence; paraphrased ones do not.
    by_kind = {kind: {name: realdoc_cell([t for t in trials if t.config == name and
                                          paraphrased[t.question] == (kind == "paraphrased")])
                      for name in config.configs} for kind in ("literal", "paraphrased")}  # fmt: skip
    return {
        "document": {"source": document.source, "package": document.package, "version": document.version,
                     "chapters": sorted(document.chapters) or None, "characters": len(document.text),
                     "tokens": tokens},  # fmt: skip
        **report_header(config.model),
        "model_window": base.max_positions,
        "adapters": adapter_names(config.configs, config.model),
        "configs": config.configs,
        "questions": [{"question": t.question, "answer": t.answer, "variants": list(t.variants),
                       "distractors": list(t.distractors), "chapter": t.chapter, "offset": t.offset,
                       "depth": round(t.depth, 4), "paraphrased": t.paraphrased} for t in tasks],  # fmt: skip
        "accuracy": accuracy,
        "by_kind": by_kind,
        "seconds": seconds,
        # Trial.tokens: what that configuration's document held (for in-window, the chapter);
        # visible False: the plain model's window lacked the answer, so it was not run.
        "trials": [asdict(t) for t in trials],
    }


def realdoc_cell(trials: list) -> dict:
    """Accuracy with its Wilson interval, how many the plain model could not run, and for the
    memory backends that read passages, evidence recall and the first stage's (`evidence_cell`)."""
    return {**accuracy_cell(sum(t.right for t in trials), len(trials)),
            "not_run": sum(t.visible is False for t in trials), "evidence": evidence_cell(trials)}  # fmt: skip


def run(config: RealdocConfig) -> dict:
    report = evaluate(config)
    print_table(report)
    save_report(report, config.out_dir / config.name, {"": partial(plot, report)})
    return report


def print_table(report: dict) -> None:
    doc = report["document"]
    package = f" [{doc['package']} {doc['version']}]" if doc["package"] else ""
    print(f"\n{doc['source']}{package}: {doc['tokens']} tokens; model window {report['model_window']} tokens")
    print(f"{'config':<11}{'questions':<12}{'accuracy':>9}  {'95% Wilson':<13}{'right':>7}{'not run':>9}"
          f"  evidence read (the anchor in front of the model) / first stage (among the candidates)")  # fmt: skip
    rows = [("all", report["accuracy"])] + list(report.get("by_kind", {}).items())
    for name in report["configs"]:
        for kind, cells in rows:
            cell = cells[name]
            if not cell["n"]:
                continue
            evidence = cell["evidence"]
            read = "-"
            if evidence["n"]:
                read = (f"{evidence['read']}/{evidence['n']} [{evidence['ci95'][0]:.2f},{evidence['ci95'][1]:.2f}]"
                        f" / {evidence['first_stage']}/{evidence['n']}")  # fmt: skip
            print(f"{name:<11}{kind:<12}{cell['accuracy']:>9.2f}  [{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}]"
                  f"{cell['right']:>5}/{cell['n']:<3}{cell['not_run']:>7}  {read}")  # fmt: skip
    print("seconds: " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in report["seconds"].items()))
    configs = report["configs"]
    print(f"\n{'question':<52}{'answer':<15}{'depth':>6}" + "".join(f"{n:>11}" for n in configs))
    for q in report["questions"]:
        marks = []
        for name in configs:
            trial = next(t for t in report["trials"] if t["config"] == name and t["question"] == q["question"])
            marks.append("not run" if trial["visible"] is False else "right" if trial["right"] else "wrong")
        text = q["question"] if len(q["question"]) <= 50 else q["question"][:47] + "..."
        print(f"{text:<52}{q['answer']:<15}{q['depth']:>6.0%}" + "".join(f"{m:>11}" for m in marks))


def plot(report: dict, path: Path) -> None:
    """Accuracy per configuration with its Wilson interval."""
    names = report["configs"]
    cells = [report["accuracy"][n] for n in names]
    mean = [c["accuracy"] for c in cells]
    size = (max(4.5, 1.2 * len(names) + 1.5), 3.8)
    with saved_figure(path, figsize=size, layout="constrained") as (figure, ax):
        colours = ["#999999" if n in ("plain", "in-window") else "#3b75af" for n in names]  # without memory: grey
        ax.bar(range(len(names)), mean, yerr=interval_errors(cells, mean), capsize=4, color=colours)
        ax.set_xticks(range(len(names)), [f"{n}\n{c['right']}/{c['n']}" for n, c in zip(names, cells)])
        ax.set(ylim=(0, 1.05), ylabel="accuracy (95% Wilson interval)")
        doc = report["document"]
        ax.set_title(f"{report['model']} (window {report['model_window']} tokens):\n{len(report['questions'])} "
                     f"questions on {doc['tokens']} tokens of {doc['package'] or Path(doc['source']).name}",
                     fontsize=9)  # fmt: skip
