"""How a question reads memory, side by side on the demo's handbooks: each read (`read`,
`read_scoring`, `read_blocks`, `read_context`, `read_sentences`) answers the same questions
from one ingest.
Reports answers right and evidence recall (the fact's sentence in front of the model, and
the rank of the passage that brought it) per read, with 95% Wilson intervals.

    .venv/bin/python scripts/bench_read.py --seeds 0,1,2            # ~7 min a seed on a 2-core CPU

Writes benchmarks/results/read.json and read.png.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from memlm.bench.report import accuracy_cell, accuracy_text, interval_errors, report_header, save_report, saved_figure
from memlm.bench.trials import Question, memory_answer, plain_answers, prompt_text
from memlm.engine import MemoryLM
from memlm.store import FaissStore
from memlm.memory.reading import token_spans
from memlm.tasks import Task, handbook

# name: the MemoryConfig settings of a read; the first two were the defaults before this
# benchmark's runs chose the third.
READS: dict[str, dict] = {
    "passages, hybrid, 8 blocks": dict(read="passages", read_scoring="hybrid", read_blocks=8, read_context=48),
    "quote, lexical, 1 block, whole passage": dict(read="quote", read_sentences=False),
    "quote, lexical, 1 block, sentences (default)": dict(read="quote"),
    "quote, lexical, 2 blocks, sentences": dict(read="quote", read_blocks=2),
    "quote, hybrid, 1 block, sentences": dict(read="quote", read_scoring="hybrid"),
    "reread, lexical, 1 block, sentences": dict(read="reread"),
    "passages, lexical, 1 block": dict(read="passages"),
    "bag (every head its own top-k)": dict(read="bag"),
}
# What the model can do with the fact in its window: the plain model given the tokens around
# the fact's sentence (half before, half after), then the question, through the chat template.
REFERENCE = "plain model, 1.5k tokens around the fact"
REFERENCE_TOKENS = 1_500


def seed_list(value: str) -> list[int]:
    try:
        return [int(s) for s in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are whole numbers separated by commas, got {value!r}") from None


def around_fact(lm: MemoryLM, task: Task) -> str:
    """The text of the REFERENCE_TOKENS document tokens centred on the task's evidence sentence."""
    ids = lm.tokenizer(task.document, add_special_tokens=False)["input_ids"]
    start, end = token_spans(lm.tokenizer, task.document, task.evidence)[0]
    first = max(0, (start + end - REFERENCE_TOKENS) // 2)
    return lm.tokenizer.decode(ids[first : first + REFERENCE_TOKENS])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=seed_list, default="0,1,2", help="handbook seeds, e.g. 0,1 (the demo: 0)")
    parser.add_argument("--tokens", type=int, default=50_000, help="handbook length (the demo's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    seeds = args.seeds
    lm = MemoryLM.load(store=FaissStore(None))  # dtype "auto"
    trials = {name: [] for name in [*READS, REFERENCE]}
    started = time.perf_counter()
    for seed in seeds:
        document, tasks = handbook(args.tokens, seed=seed, num_facts=8)
        lm.ingest(document, "handbook")
        default = lm.config
        for name, settings in tqdm(READS.items(), desc=f"reads, handbook {seed}"):
            lm.config = replace(default, **settings)
            for task in tasks:
                asked = time.perf_counter()
                answer, rank, read_it = memory_answer(lm, task, "handbook")
                trials[name].append({"seed": seed, "question": task.question, "expected": task.answer,
                                     "answer": answer, "right": task.score(answer), "evidence_read": read_it,
                                     "evidence_rank": rank, "seconds": time.perf_counter() - asked})  # fmt: skip
        lm.config = default
        lm.forget("handbook")
        for task in tqdm(tasks, desc=f"reference, handbook {seed}"):
            asked = time.perf_counter()
            answer = plain_answers(lm, around_fact(lm, task), [Question.of(task, prompt_text(lm, task))])[0] or ""
            trials[REFERENCE].append({"seed": seed, "question": task.question, "expected": task.answer,
                                      "answer": answer, "right": task.score(answer), "evidence_read": True,
                                      "evidence_rank": 0, "seconds": time.perf_counter() - asked})  # fmt: skip
    summary = {
        name: {
            "settings": {**READS[name]} if name in READS else None,
            "right": accuracy_cell(sum(t["right"] for t in rows), len(rows)),
            "evidence": accuracy_cell(sum(t["evidence_read"] for t in rows), len(rows)),
            "evidence_first": accuracy_cell(sum(t["evidence_rank"] == 0 for t in rows), len(rows)),
            "seconds_per_question": sum(t["seconds"] for t in rows) / max(1, len(rows)),
        }
        for name, rows in trials.items()
    }
    print(f"\n{'read':46s} {'right':>24s} {'evidence read':>24s} {'read first':>24s}  s/question")
    for name, cells in summary.items():
        print(f"{name:46s} {accuracy_text(cells['right']):>24s} {accuracy_text(cells['evidence']):>24s} "
              f"{accuracy_text(cells['evidence_first']):>24s}  {cells['seconds_per_question']:.1f}")  # fmt: skip
    header = {**report_header(None, lm.model.dtype), "chat": True}
    report = {**header, "seeds": seeds, "tokens": args.tokens, "seconds": time.perf_counter() - started,
              "summary": summary, "trials": trials}  # fmt: skip

    def plot(path: Path) -> None:
        names = list(summary)
        with saved_figure(path, figsize=(9, 4)) as (_, axes):
            for offset, (key, label) in enumerate([("right", "answer right"), ("evidence", "evidence read")]):
                cells = [summary[name][key] for name in names]
                means = [cell["accuracy"] for cell in cells]
                axes.barh([i + 0.4 * offset for i in range(len(names))], means, height=0.4, label=label,
                          xerr=interval_errors(cells, means), capsize=3)  # fmt: skip
            axes.set_yticks([i + 0.2 for i in range(len(names))], names)
            axes.invert_yaxis()
            axes.set_xlim(0, 1)
            axes.set_xlabel(f"share of {len(seeds) * 8} handbook questions ({args.tokens // 1000}k tokens), 95% CI")
            axes.legend(loc="lower right")
            axes.figure.tight_layout()

    save_report(report, args.out / "read", {"": plot})


if __name__ == "__main__":
    main()
