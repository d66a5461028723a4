"""`memlm bench eval`: the generated long-context tasks of `memlm/tasks.py`, each scored
automatically, for the plain model (its input cut to its window) and each memory backend
side by side, at several document lengths and once with the whole document inside the
model's window.

Memory cannot add abilities the model lacks (DESIGN.md), so next to absolute accuracy the
report gives retention: accuracy at a length divided by the plain model's accuracy on the
same task when the whole document sits inside its window. Accuracy comes with a 95% Wilson
interval. One document carries several questions (facts at several depths) and is ingested
once per backend; questions on one document are not independent, so read the intervals as
a little too narrow. Prints a table and writes `<name>.json`, `<name>.png` (length x depth
heat maps, as needle-in-a-haystack plots) and `<name>_accuracy.png`.

A long run keeps every answered document in `<name>.trials.jsonl` as it goes (removed once the
report is written); `resume` takes such a file or an earlier report, and the documents answered
there are not run again, so an interrupted run continues, and a new length is added to an
earlier report's table without repeating it.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from memlm.bench.common import check_names, report_header
from memlm.bench.passkey import Question, plain_answers, prompt_text
from memlm.config import BACKENDS, READ_MODES, MemoryConfig
from memlm.engine import MemoryLM
from memlm.memory.reading import evidence_found, token_spans
from memlm.model.loading import load_model
from memlm.store import FaissStore
from memlm.tasks import Task, babilong, handbook, kv_lines, multi_needle, passkey, prose_needles
from memlm.train.adapter import shipped_adapter
from memlm.train.data import TRAIN_SEED_BASE

# "plain": the model alone, its input cut to its window; "<backend>-<variant>": fot or knn with
# the passage read scored by the retrieval heads alone, the re-read, or the per-head read
# (MemoryConfig.read_scoring, .read).
CONFIGS: tuple[str, ...] = ("plain", *BACKENDS, "fot-attention", "fot-reread", "fot-bag", "knn-bag")
DEFAULT_CONFIGS: tuple[str, ...] = ("plain", *BACKENDS)
LONG_LENGTH = 128_000
DEPTH_BINS = 5


@dataclass(frozen=True)
class Family:
    """One kind of generated document and the questions asked about it."""

    build: Callable[[int, list[float], int], list[Task]]  # (tokens, depths, seed) -> tasks on one document
    questions: int  # depths (facts) per document
    kinds: tuple[str, ...]  # the task kinds its questions have


FAMILIES: dict[str, Family] = {
    "prose-needles": Family(prose_needles, 6, ("prose-passkey", "prose-fact")),
    "passkey": Family(lambda n, depths, seed: [passkey(n, depths[0], seed)], 1, ("passkey",)),
    "kv-lines": Family(kv_lines, 4, ("kv-lines",)),
    "multi-needle": Family(multi_needle, 4, ("multi-needle-one", "multi-needle-all")),
    "babilong": Family(babilong, 4, ("babilong-1fact", "babilong-2fact")),
    "docqa": Family(lambda n, depths, seed: handbook(n, seed, depths=depths)[1], 4, ("docqa",)),
}


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


@dataclass
class EvalConfig:
    lengths: list[int] = field(default_factory=lambda: [4_000, 16_000, 32_000])
    window_length: int = 2_000  # the in-window reference length (whole document visible)
    trials: int = 5  # documents per task family, length and configuration
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    configs: list[str] = field(default_factory=lambda: list(DEFAULT_CONFIGS))
    model: str | None = None
    seed: int = 0
    # Questions in the model's chat template, as users ask them (`memlm ask`, the demo, gRPC
    # Generate); False: each task's raw continuation prompt where it has one.
    chat: bool = True
    out_dir: Path = Path("benchmarks/results")
    name: str = "eval"
    resume: list[Path] = field(default_factory=list)  # earlier reports or checkpoints; later ones win

    def validate(self) -> None:
        check_names("task", self.families, FAMILIES)
        check_names("configuration", self.configs, CONFIGS)
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if any(n < 100 for n in [*self.lengths, self.window_length]):
            raise ValueError("lengths must be at least 100 tokens")

    @property
    def all_lengths(self) -> list[int]:
        return sorted({self.window_length, *self.lengths})

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / f"{self.name}.trials.jsonl"


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (sound at 0/n and n/n, unlike p ± z·se)."""
    if n == 0:
        return (0.0, 1.0)
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def document_seed(seed: int, family: str, length: int, document: int) -> int:
    """The same documents for every configuration, different ones per family, length and index;
    below TRAIN_SEED_BASE, where training seeds start, so evaluation never sees training data."""
    return (seed * 1_000_003 + zlib.crc32(f"{family}:{length}:{document}".encode())) % TRAIN_SEED_BASE


def document_depths(document: int, documents: int, questions: int) -> list[float]:
    """Depths of one document's facts: all documents' facts together cover 0..1 evenly,
    and each document spans the range."""
    total = documents * questions
    return [(j * documents + document + 0.5) / total for j in range(questions)]


Document = tuple[str, int, int, list[Task]]  # (family, length, seed, the tasks on one document)
DocumentKey = tuple[str, str, int, int]  # (config, family, length, seed)


def documents(config: EvalConfig) -> list[Document]:
    """Every document of the run, with its questions."""
    found = []
    for family in config.families:
        spec = FAMILIES[family]
        for length in config.all_lengths:
            for document in range(config.trials):
                seed = document_seed(config.seed, family, length, document)
                depths = document_depths(document, config.trials, spec.questions)
                found.append((family, length, seed, spec.build(length, depths, seed)))
    return found


def answered_before(paths: Sequence[Path], header: dict) -> dict[DocumentKey, list[Trial]]:
    """The trials of every document answered in earlier runs, from their reports (`.json`) or
    checkpoints (`.trials.jsonl`: a header line, then one trial a line). Later files win.
    A run with another model, dtype or memory settings is refused: its answers are not ours."""
    answered: dict[DocumentKey, list[Trial]] = {}
    for path in paths:
        if path.suffix == ".jsonl":
            earlier, *rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            earlier = json.loads(path.read_text())
            rows = earlier.get("trials", [])
        for key in ("model", "dtype", "defaults", "chat"):
            if earlier.get(key) != header[key]:
                raise ValueError(f"{path} was run with another {key}; its answers cannot be reused")
        found: dict[DocumentKey, list[Trial]] = {}
        for row in rows:
            try:
                trial = Trial(**row)
            except TypeError as error:
                raise ValueError(f"{path} holds something other than benchmark trials ({error})") from None
            found.setdefault((trial.config, trial.family, trial.length, trial.seed), []).append(trial)
        answered.update(found)
    return answered


def reusable(earlier: list[Trial] | None, tasks: list[Task]) -> bool:
    """Whether earlier trials answered exactly these questions (the depths of a seed's facts
    depend on the number of documents per cell, so the seed alone does not say)."""
    return earlier is not None and [(t.depth, t.question, t.answer) for t in earlier] == [
        (task.depth, task.question, task.answer) for task in tasks
    ]


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
        prompts = [prompt_text(base, task, chat) for task in tasks]
        if lm is None:
            # The plain model reads the document once for all its questions; it is skipped (None)
            # on a question whose answer lies outside its window; for a question about several
            # needles, the earliest one decides whether all are inside.
            questions = [Question(prompt, min(task.answers, key=document.find) if task.answers else task.answer,
                                  task.answer_tokens) for prompt, task in zip(prompts, tasks)]  # fmt: skip
            answered = plain_answers(base, document, questions)
        else:
            memory = f"eval-{family}-{length}-{seed}"
            if memory not in lm.memories():
                lm.ingest(document, memory=memory, progress=False)
        for index, (task, prompt) in enumerate(zip(tasks, prompts)):
            rank, read = None, None
            if lm is None:
                output, visible = answered[index] or "", answered[index] is not None
            else:
                asked = dict(prompt=task.question, chat=True) if chat or task.prompt is None else dict(prompt=prompt, chat=False)
                result = lm.generate_full(**asked, memory=memory, max_new_tokens=task.answer_tokens)
                output, visible = result.text, None
                if (result.evidence or result.in_view) and task.evidence:
                    spans = token_spans(base.tokenizer, document, task.evidence)
                    rank, read = evidence_found(result.evidence, result.in_view, spans)
            trials.append(Trial(name, family, task.kind, length, tokens, task.depth, seed, task.question,
                                task.answer, output, task.score(output), visible, rank, read))  # fmt: skip
            right = [t.right for t in trials if t.length == length]
            bar.set_postfix(task=family, length=str(length), acc=f"{sum(right) / len(right):.2f}")
            bar.update()
        if lm is not None and not keep_memories:
            lm.forget(memory)
        keep(checkpoint, trials[done_before:])
    bar.close()
    return trials


def keep(checkpoint: Path | None, trials: list[Trial]) -> None:
    if checkpoint is not None:
        with checkpoint.open("a") as file:
            file.writelines(json.dumps(asdict(t)) + "\n" for t in trials)


def summarize(trials: list[Trial], config: EvalConfig) -> tuple[dict, dict, dict]:
    """accuracy[kind][config][length] = {right, n, accuracy, ci95}; retention[kind][config][length]
    = accuracy / the plain model's in-window accuracy on that kind (None when that is 0);
    evidence[kind][config][length] = {read, n, recall, ci95, median_rank} for the configurations
    that read passages or blocks (n = 0 for the others)."""
    kinds = [kind for family in config.families for kind in FAMILIES[family].kinds]
    accuracy: dict = {}
    retention: dict = {}
    evidence: dict = {}
    for kind in kinds:
        accuracy[kind], retention[kind], evidence[kind] = {}, {}, {}
        for name in config.configs:
            accuracy[kind][name], evidence[kind][name] = {}, {}
            for length in config.all_lengths:
                cell = [t for t in trials if t.kind == kind and t.config == name and t.length == length]
                right, n = sum(t.right for t in cell), len(cell)
                accuracy[kind][name][str(length)] = {
                    "right": right, "n": n, "accuracy": right / n if n else None, "ci95": list(wilson(right, n)),
                }  # fmt: skip
                scored = [t for t in cell if t.evidence_read is not None]
                read = sum(t.evidence_read for t in scored)
                ranks = [t.evidence_rank for t in scored if t.evidence_rank is not None]  # read from memory
                evidence[kind][name][str(length)] = {
                    "read": read, "n": len(scored), "recall": read / len(scored) if scored else None,
                    "ci95": list(wilson(read, len(scored))),
                    "median_rank": float(np.median(ranks)) if ranks else None,
                }  # fmt: skip
        reference = in_window_reference(accuracy[kind], config)
        for name in config.configs:
            retention[kind][name] = {
                str(length): None if not reference or cell["accuracy"] is None else cell["accuracy"] / reference
                for length, cell in ((n, accuracy[kind][name][str(n)]) for n in config.all_lengths)
            }
    return accuracy, retention, evidence


def in_window_reference(by_config: dict, config: EvalConfig) -> float | None:
    """What the model can do with the whole document visible: the plain model at the
    in-window length (else the first configuration run, when plain was left out)."""
    name = "plain" if "plain" in by_config else config.configs[0]
    return by_config[name][str(config.window_length)]["accuracy"]


def config_adapter(name: str, model: str | None) -> Path | None:
    """The adapter a configuration runs with: the one shipped for its backend, on the
    embedded model only (as `MemoryLM.load` does)."""
    return shipped_adapter(name.partition("-")[0]) if model is None else None


def config_lm(name: str, hf_model, tokenizer, model: str | None, store: FaissStore | None = None) -> MemoryLM | None:
    """The MemoryLM of a configuration; "plain" is None. "<backend>-<variant>" sets the read
    (`reread`, `bag`) or the passage read's scoring (`attention`). A configuration with an
    adapter runs on its own copy of the model, since a LoRA adapter changes the weights; the
    others share `hf_model`. `store`: where its memories go (variants of a backend share one)."""
    if name == "plain":
        return None
    backend, _, variant = name.partition("-")
    settings = dict(backend=backend)
    if variant:
        settings["read" if variant in READ_MODES else "read_scoring"] = variant
    store = store if store is not None else FaissStore(None)
    if config_adapter(backend, model) is not None:
        return MemoryLM.load(store=store, **settings)
    return MemoryLM(hf_model, tokenizer, store, MemoryConfig(**settings))


def evaluate(config: EvalConfig) -> dict:
    """Run every configuration on the same documents; returns the report (see `run`)."""
    config.validate()
    header = {**report_header(config.model), "chat": config.chat}
    # Read before the model loads (a bad file fails at once) and before the checkpoint below restarts.
    reuse = answered_before(config.resume, header)
    if reuse:
        print(f"reusing the answers to {len(reuse)} documents of {', '.join(map(str, config.resume))}")
    hf_model, tokenizer = load_model(config.model, dtype=torch.bfloat16)
    base = MemoryLM(hf_model, tokenizer, FaissStore(None), MemoryConfig())
    if config.window_length + 256 > base.max_positions:
        raise ValueError(f"window_length {config.window_length} does not fit the model's {base.max_positions} tokens")
    docs = documents(config)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    config.checkpoint.write_text(json.dumps(header) + "\n")
    # Everything resumed goes into the new checkpoint first: the old one may be this same file,
    # and a run stopped again must not lose what it had not reached yet.
    keep(config.checkpoint, [trial for earlier in reuse.values() for trial in earlier])
    trials: list[Trial] = []
    seconds: dict[str, float] = {}
    adapters: dict[str, str] = {}
    # Variants of one backend (its reads and scorings) write the same memory: they share a store
    # and each document is ingested once, for the first of them; the last one forgets it.
    stores: dict[str, FaissStore] = {}
    backend_of = {name: name.partition("-")[0] for name in config.configs}
    for index, name in enumerate(config.configs):
        started = time.perf_counter()
        lm = config_lm(name, hf_model, tokenizer, config.model, stores.setdefault(backend_of[name], FaissStore(None)))
        later_variant = any(backend_of[other] == backend_of[name] for other in config.configs[index + 1 :])
        adapter = config_adapter(name, config.model)
        if adapter is not None:
            adapters[name] = adapter.name
        trials += run_config(name, lm, base, docs, reuse, config.checkpoint, config.chat, keep_memories=later_variant)
        seconds[name] = time.perf_counter() - started
    accuracy, retention, evidence = summarize(trials, config)
    return {
        **header,
        "model_window": base.max_positions,
        "adapters": adapters,
        "lengths": config.all_lengths,
        "window_length": config.window_length,
        "documents_per_cell": config.trials,
        "seed": config.seed,
        "configs": config.configs,
        "families": {name: {"questions_per_document": FAMILIES[name].questions, "kinds": FAMILIES[name].kinds}
                     for name in config.families},  # fmt: skip
        "retention_reference": f"plain at {config.window_length} tokens",
        "chat": config.chat,
        "accuracy": accuracy,
        "retention": retention,
        "evidence": evidence,
        "seconds": seconds,  # spent in this run (reused answers cost nothing)
        "resumed_from": [str(path) for path in config.resume],
        "trials": [asdict(t) for t in trials],
    }


def write(report: dict, config: EvalConfig) -> None:
    config.out_dir.mkdir(parents=True, exist_ok=True)
    stem = config.out_dir / config.name
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
    plot_heatmaps(report, Path(f"{stem}.png"))
    plot_accuracy(report, Path(f"{stem}_accuracy.png"))
    config.checkpoint.unlink(missing_ok=True)  # everything in it is in the report now
    print(f"wrote {stem}.json, {stem}.png and {stem}_accuracy.png")


def run(config: EvalConfig) -> dict:
    report = evaluate(config)
    print_table(report)
    write(report, config)
    return report


def print_table(report: dict) -> None:
    lengths = report["lengths"]
    print(f"\naccuracy [95% Wilson interval] (n questions), retention = accuracy / {report['retention_reference']}")
    header = "".join(f"{n:>24}" for n in lengths) + "".join(f"{'ret@' + str(n):>10}" for n in lengths)
    print(f"{'task':<18}{'config':<7}{header}")
    for kind, by_config in report["accuracy"].items():
        for name, by_length in by_config.items():
            cells = []
            for n in lengths:
                cell = by_length[str(n)]
                acc = "  -" if cell["accuracy"] is None else f"{cell['accuracy']:.2f}"
                cells.append(f"{acc} [{cell['ci95'][0]:.2f},{cell['ci95'][1]:.2f}] ({cell['n']:>3})")
            kept = [report["retention"][kind][name][str(n)] for n in lengths]
            print(f"{kind:<18}{name:<7}" + "".join(f"{c:>24}" for c in cells)
                  + "".join(f"{'-' if r is None else f'{r:.2f}':>10}" for r in kept))  # fmt: skip
    print("\nevidence recall: the share of questions whose evidence sentences the read placed in front of the model"
          " [95% Wilson interval] (n), median rank of the passage holding it")
    for kind, by_config in report.get("evidence", {}).items():
        for name, by_length in by_config.items():
            cells = []
            for n in lengths:
                cell = by_length[str(n)]
                if not cell["n"]:
                    cells.append("-")
                    continue
                rank = "-" if cell["median_rank"] is None else f"{cell['median_rank']:.0f}"
                cells.append(f"{cell['recall']:.2f} [{cell['ci95'][0]:.2f},{cell['ci95'][1]:.2f}] ({cell['n']}) r{rank}")
            if any(c != "-" for c in cells):
                print(f"{kind:<18}{name:<7}" + "".join(f"{c:>30}" for c in cells))


def depth_grid(trials: list[dict], lengths: list[int]) -> list[list[float]]:
    """Accuracy per (depth bin, length); NaN where no question fell."""
    grid = []
    for row in range(DEPTH_BINS):
        cells = []
        for length in lengths:
            hits = [t["right"] for t in trials
                    if t["length"] == length and min(DEPTH_BINS - 1, int(t["depth"] * DEPTH_BINS)) == row]  # fmt: skip
            cells.append(sum(hits) / len(hits) if hits else float("nan"))
        grid.append(cells)
    return grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _length_label(n: int) -> str:
    return f"{n / 1000:g}k" if n >= 1000 else str(n)


def plot_heatmaps(report: dict, path: Path) -> None:
    """One needle-in-a-haystack panel per task kind (rows) and configuration (columns):
    document length across, depth of the fact down, colour = accuracy, blank = no question."""
    plt = _pyplot()
    kinds, configs, lengths = list(report["accuracy"]), report["configs"], report["lengths"]
    size = (2.0 * len(configs) + 1.2, 1.5 * len(kinds) + 0.8)
    figure, axes = plt.subplots(len(kinds), len(configs), figsize=size, squeeze=False, sharex=True, sharey=True,
                                layout="constrained")  # fmt: skip
    image = None
    for row, kind in enumerate(kinds):
        for column, name in enumerate(configs):
            ax = axes[row][column]
            trials = [t for t in report["trials"] if t["kind"] == kind and t["config"] == name]
            image = ax.imshow(depth_grid(trials, lengths), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(DEPTH_BINS), [f"{(i + 0.5) / DEPTH_BINS:.0%}" for i in range(DEPTH_BINS)], fontsize=7)
            if row == 0:
                ax.set_title(name, fontsize=9)
            if column == 0:
                ax.set_ylabel(f"{kind}\ndepth", fontsize=8)
    figure.colorbar(image, ax=axes, shrink=0.5, label="accuracy")
    figure.suptitle(f"{report['model']}: accuracy by document length and depth of the fact", fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_accuracy(report: dict, path: Path) -> None:
    """Accuracy against length with Wilson intervals, one panel per task kind; the
    configurations sit side by side at each length so that their intervals do not overlap."""
    plt = _pyplot()
    kinds, lengths, configs = list(report["accuracy"]), report["lengths"], report["configs"]
    columns = min(4, len(kinds))
    rows = math.ceil(len(kinds) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.6 * rows), squeeze=False, layout="constrained")
    panels = [ax for line in axes for ax in line]
    for ax, kind in zip(panels, kinds):
        for offset, name in enumerate(configs):
            cells = [report["accuracy"][kind][name][str(n)] for n in lengths]
            mean = [c["accuracy"] if c["accuracy"] is not None else float("nan") for c in cells]
            low = [m - c["ci95"][0] if c["n"] else 0 for m, c in zip(mean, cells)]
            high = [c["ci95"][1] - m if c["n"] else 0 for m, c in zip(mean, cells)]
            x = [i + (offset - (len(configs) - 1) / 2) * 0.12 for i in range(len(lengths))]
            ax.errorbar(x, mean, yerr=[low, high], marker="o", capsize=2, label=name)
        ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
        ax.set(title=kind, ylim=(-0.05, 1.05), xlabel="document tokens", ylabel="accuracy")
    for ax in panels[len(kinds) :]:
        ax.set_visible(False)
    panels[0].legend(fontsize=7)
    figure.suptitle(f"{report['model']}: accuracy with 95% Wilson intervals (model window "
                    f"{report['model_window']} tokens)", fontsize=10)  # fmt: skip
    figure.savefig(path, dpi=110)
    plt.close(figure)
