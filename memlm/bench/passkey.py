"""`memlm bench passkey`: passkey retrieval at several lengths for the plain model and the
memory configurations side by side, plus ingest throughput against a plain segmented
forward pass, decode time per token with a full memory against an empty one, and memory
bytes per token. Prints a table and writes `passkey.json` and `passkey.png`.

By default the key is an access code of letters and digits in an ordinary sentence inside
the Vim manual's prose, asked in the chat template as users ask (`haystack="filler"`: the
classic repeated "The grass is green." filler; `chat=False`: the raw continuation prompt)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from memlm.bench.report import BENCH_DTYPE, check_names, report_header, save_report, saved_figure
from memlm.bench.trials import Question, memory_answer, plain_answers, prompt_text
from memlm.config import MemoryConfig
from memlm.engine import MemoryLM
from memlm.model.loading import load_model
from memlm.store import FaissStore
from memlm.tasks import Task, passkey, prose_needles

# name -> MemoryConfig overrides; "plain" is the model alone, its input cut to its window.
CONFIGS: dict[str, dict | None] = {
    "plain": None,
    "fot-window": dict(backend="fot", position_mode="window"),
    "fot-bag": dict(backend="fot", read="bag"),
    "fot-zero": dict(backend="fot", position_mode="zero"),
    "fot-exact": dict(backend="fot", position_mode="exact"),
    "knn-window": dict(backend="knn", position_mode="window"),
}
DEFAULT = "fot-window"


@dataclass
class Trial:
    length: int
    tokens: int
    depth: float
    answer: str
    output: str
    right: bool
    ingest_s: float
    evidence_rank: int | None = None  # rank of the passage that held the key's sentence
    evidence_read: bool | None = None  # None: nothing was read from a store (plain)


@dataclass
class ConfigResult:
    name: str
    settings: dict | None
    trials: list[Trial] = field(default_factory=list)

    def accuracy(self, length: int) -> float:
        hits = [t.right for t in self.trials if t.length == length]
        return sum(hits) / len(hits) if hits else float("nan")

    def evidence_recall(self, length: int) -> float | None:
        read = [t.evidence_read for t in self.trials if t.length == length and t.evidence_read is not None]
        return sum(read) / len(read) if read else None


def passkey_task(length: int, depth: float, seed: int, haystack: str) -> Task:
    if haystack == "filler":
        return passkey(length, depth=depth, seed=seed)
    if haystack == "prose":
        return prose_needles(length, [depth], seed=seed)[0]
    raise ValueError(f"unknown haystack {haystack!r}; choose prose or filler")


def run_trials(
    lm: MemoryLM | None, base: MemoryLM, name: str, lengths: list[int], trials: int, haystack: str, chat: bool
) -> ConfigResult:
    result = ConfigResult(name, CONFIGS[name])
    bar = tqdm(total=len(lengths) * trials, desc=f"passkey {name}", unit="trial")
    for length in lengths:
        for trial in range(trials):
            depth = (trial + 0.5) / trials  # spread evenly over the document
            task = passkey_task(length, depth, 10_000 * length + trial, haystack)
            started = time.perf_counter()
            rank = read = None
            if lm is None:
                [output] = plain_answers(base, task.document, [Question.of(task, prompt_text(base, task, chat))])
                ran = output is not None
                output = output if ran else "(the key lies outside the model's window: not run)"
                ingest_s, tokens = 0.0, len(base.tokenizer(task.document)["input_ids"])
            else:
                stats = lm.ingest(task.document, memory="bench", progress=False)
                ingest_s, tokens = time.perf_counter() - started, stats.tokens
                found = memory_answer(lm, task, "bench", chat)
                output, rank, read = found.output, found.evidence_rank, found.evidence_read
                lm.forget("bench")
            right = task.score(output) if lm is not None or ran else False
            result.trials.append(Trial(length, tokens, depth, task.answer, output, right, ingest_s, rank, read))
            bar.set_postfix(length=length, acc=f"{result.accuracy(length):.2f}")
            bar.update()
    bar.close()
    return result


@torch.inference_mode()
def throughput(lm: MemoryLM, length: int, repeats: int = 2) -> dict:
    """Ingest tokens/s against the plain model's segmented forward pass over the same text
    (same segment length, no LM head in either), and decode ms/token with a full memory
    against an empty one. Measurements alternate and the best of `repeats` counts, so that
    other work on a shared machine biases neither side."""
    task = passkey(length, depth=0.5, seed=1)
    ids = lm.tokenizer(task.document, add_special_tokens=False)["input_ids"]
    segment = lm.config.segment_len

    def plain_s() -> float:
        started = time.perf_counter()
        for start in range(0, len(ids), segment):
            lm.model.model(input_ids=torch.tensor([ids[start : start + segment]]))
        return time.perf_counter() - started

    def ingest_s(embedder: str | None = lm.config.embedder) -> float:
        """An ingest, with the dense index's embedder or (None) without one."""
        lm.forget("bench-full") if "bench-full" in lm.memories() else None
        configured, lm.config = lm.config, replace(lm.config, embedder=embedder)
        try:
            return lm.ingest_tokens(ids, "bench-full", progress=False).seconds
        finally:
            lm.config = configured

    def decode_ms(memory: str | None, steps: int = 32) -> float:
        session = lm.open_session(memory, writes=False)
        lm.forward(session, lm.prompt_ids(task.prompt, chat=False), logits="last")
        started = time.perf_counter()
        for _ in range(steps):
            lm.forward(session, [42], logits="last")
        return (time.perf_counter() - started) / steps * 1000

    def first_token_s(read: str) -> float:
        """A question asked in the chat template, to its first token, with the `read` mode."""
        configured, lm.config = lm.config, replace(lm.config, read=read)
        try:
            started = time.perf_counter()
            lm.generate_full(task.question, memory="bench-full", max_new_tokens=1)
            return time.perf_counter() - started
        finally:
            lm.config = configured

    # Without the dense index first: the memory the rest reads is the default one.
    timings = [(plain_s(), ingest_s(None), ingest_s()) for _ in range(repeats)]
    plain, words, ingest = (min(t[i] for t in timings) for i in range(3))
    decodes = [(decode_ms("bench-full"), decode_ms(None)) for _ in range(repeats)]
    full_ms, empty_ms = min(d[0] for d in decodes), min(d[1] for d in decodes)
    default_read = MemoryConfig().read  # against the per-head read, the default before the passage reads
    # The quote read's re-read of the sinks and window (`MemoryLM.prefix_session`) is made by
    # the ingest: the first question starts from it (when it did not, it took 1.02 s at 32k
    # against a later question's 0.29 s).
    first_question_s = first_token_s(default_read)
    first_tokens = [(first_token_s(default_read), first_token_s("bag")) for _ in range(repeats)]
    read_s, bag_s = min(f[0] for f in first_tokens), min(f[1] for f in first_tokens)
    stats = lm.store.stats("bench-full")
    window_tokens = len(lm.store.load_state("bench-full").get("window_positions", ()))  # rmt has no window
    lm.forget("bench-full")
    return {
        "length": len(ids),
        "plain_tokens_per_s": len(ids) / plain,
        "ingest_tokens_per_s": len(ids) / ingest,
        "ingest_ratio": plain / ingest,
        "embedder": lm.config.embedder,
        "ingest_tokens_per_s_without_embedder": len(ids) / words,
        "ingest_ratio_embedder": words / ingest,  # ingest speed with the dense index / without
        "decode_ms_full_memory": full_ms,
        "decode_ms_empty_memory": empty_ms,
        "decode_ratio": full_ms / empty_ms,
        "first_token_read": default_read,
        "first_token_s_read": read_s,
        "first_token_s_read_first_question": first_question_s,
        "first_token_s_bag": bag_s,
        "first_token_ratio": read_s / bag_s,
        "memory_tokens": stats.tokens,
        "memory_bytes_per_token": stats.bytes / max(1, stats.tokens),
        "window_tokens": window_tokens,
    }


def run(
    lengths: list[int],
    trials: int = 20,
    configs: str = "all",
    model: str | None = None,
    out_dir: Path = Path("benchmarks/results"),
    throughput_length: int = 32_000,
    name: str = "passkey",
    haystack: str = "prose",
    chat: bool = True,
) -> dict:
    names = list(CONFIGS) if configs == "all" else configs.split(",")
    check_names("configuration", names, CONFIGS)
    passkey_task(100, 0.5, 0, haystack)  # an unknown haystack fails before the model loads
    hf_model, tokenizer = load_model(model, dtype=BENCH_DTYPE)
    base = MemoryLM(hf_model, tokenizer, FaissStore(None), MemoryConfig())
    results = []
    speed = throughput(base, throughput_length) if throughput_length else {}
    for config in names:
        settings = CONFIGS[config]
        lm = None if settings is None else MemoryLM(hf_model, tokenizer, FaissStore(None), replace(MemoryConfig(), **settings))
        results.append(run_trials(lm, base, config, lengths, trials, haystack, chat))
        so_far = report_of(results, speed, lengths, trials, model, base.max_positions, haystack, chat)
        save_report(so_far, out_dir / name, {"": partial(plot, so_far)})  # partial results survive a stop
    report = report_of(results, speed, lengths, trials, model, base.max_positions, haystack, chat)
    print_table(report)
    save_report(report, out_dir / name, {"": partial(plot, report)})
    return report


def report_of(
    results: list[ConfigResult],
    speed: dict,
    lengths: list[int],
    trials: int,
    model: str | None,
    model_window: int,
    haystack: str,
    chat: bool,
) -> dict:
    return {
        **report_header(model),
        "model_window": model_window,  # tokens: where the plain model starts to cut documents
        "haystack": haystack,
        "chat": chat,
        "lengths": lengths,
        "trials_per_length": trials,
        "accuracy": {r.name: {str(n): r.accuracy(n) for n in lengths} for r in results},
        "evidence_recall": {r.name: {str(n): r.evidence_recall(n) for n in lengths} for r in results},
        "throughput": speed,
        "trials": {r.name: [asdict(t) for t in r.trials] for r in results},
    }


def print_table(report: dict) -> None:
    lengths = report["lengths"]
    print(f"\npasskey accuracy ({report['trials_per_length']} trials per length; {report['haystack']} haystack, "
          f"{'chat' if report['chat'] else 'raw'} prompts); in brackets, evidence recall (key's sentence read)")  # fmt: skip
    print(f"{'config':<12}" + "".join(f"{n:>14}" for n in lengths))
    for name, by_length in report["accuracy"].items():
        recall = report["evidence_recall"][name]
        cells = [f"{by_length[str(n)]:.2f}" + ("" if recall[str(n)] is None else f" [{recall[str(n)]:.2f}]") for n in lengths]
        print(f"{name:<12}" + "".join(f"{c:>14}" for c in cells))
    s = report["throughput"]
    if not s:
        return
    print(
        f"\ningest {s['ingest_tokens_per_s']:.0f} tok/s vs plain forward {s['plain_tokens_per_s']:.0f} tok/s "
        f"(ratio {s['ingest_ratio']:.2f}); without the dense index {s['ingest_tokens_per_s_without_embedder']:.0f} "
        f"tok/s (with it {s['ingest_ratio_embedder']:.2f}x that); decode {s['decode_ms_full_memory']:.1f} ms/token with "
        f"{s['memory_tokens']} tokens of memory vs {s['decode_ms_empty_memory']:.1f} empty "
        f"(ratio {s['decode_ratio']:.2f}); {s['memory_bytes_per_token'] / 1024:.1f} KiB of memory per token"
    )
    if "first_token_s_read" in s:
        print(f"time to first token: {s['first_token_read']!r} read {s['first_token_s_read']:.2f} s vs per-head read "
              f"{s['first_token_s_bag']:.2f} s (ratio {s['first_token_ratio']:.2f}); the first question after the "
              f"ingest {s['first_token_s_read_first_question']:.2f} s")


def plot(report: dict, path: Path) -> None:
    with saved_figure(path, 1, 2, figsize=(11, 4), dpi=120) as (figure, (accuracy, speed)):
        for name, by_length in report["accuracy"].items():
            accuracy.plot(report["lengths"], [by_length[str(n)] for n in report["lengths"]], marker="o", label=name)
        accuracy.axvline(report["model_window"], color="grey", linestyle=":", label="model window")
        accuracy.set(xscale="log", xlabel="document tokens", ylabel="passkey accuracy", ylim=(-0.05, 1.05))
        accuracy.legend(fontsize=8)
        s = report["throughput"] or {"ingest_ratio": 0.0, "decode_ratio": 0.0, "length": 0}
        speed.bar(["ingest / plain forward", "decode full / empty"], [s["ingest_ratio"], s["decode_ratio"]])
        speed.axhline(1.0, color="grey", linestyle=":")
        speed.set(title=f"ratios at {s['length']} tokens", ylabel="ratio")
        figure.tight_layout()
