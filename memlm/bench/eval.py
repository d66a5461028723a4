"""`memlm bench eval`: the generated long-context tasks of `memlm/tasks.py` (their families in
memlm/bench/families.py), each scored automatically, for the plain model (its input cut to its
window) and each memory backend side by side, at several document lengths and once with the
whole document inside the model's window.

Memory cannot add abilities the model lacks (docs/design.md), so next to absolute accuracy the
report gives retention: accuracy at a length divided by the plain model's accuracy on the
same task when the whole document sits inside its window. Accuracy comes with a 95% Wilson
interval. One document carries several questions (facts at several depths) and is ingested
once per backend; questions on one document are not independent, so read the intervals as
a little too narrow. Prints a table and writes `<name>.json`, `<name>.png` (length x depth
heat maps, as needle-in-a-haystack plots) and `<name>_accuracy.png`.

A long run keeps every answered document in `<name>.trials.jsonl` as it goes (removed once the
report is written); `resume` takes such a file or an earlier report, and the documents answered
there are not run again, so an interrupted run continues, and a new length is added to an
earlier report's table without repeating it (memlm/bench/trials.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from memlm.bench.families import FAMILIES, Document, document_depths, document_seed
from memlm.bench.report import (
    BENCH_DTYPE,
    accuracy_cell,
    accuracy_text,
    adapter_names,
    check_names,
    config_adapter,
    interval_errors,
    length_label,
    report_header,
    save_report,
    saved_figure,
    wilson,
)
from memlm.bench.trials import Trial, answered_before, keep, run_config
from memlm.config import BACKENDS, READ_MODES, MemoryConfig
from memlm.engine import MemoryLM
from memlm.model.loading import load_model
from memlm.store import FaissStore

# "plain": the model alone, its input cut to its window; "<backend>-<variant>": fot or knn with
# another read (MemoryConfig.read: the passages re-read in document order, their stored keys and
# values, the per-head read) or the passage read scored otherwise (MemoryConfig.read_scoring);
# "-words": without the dense index (embedder None: words, else the heads' votes).
CONFIGS: tuple[str, ...] = (
    "plain", *BACKENDS, "fot-reread", "fot-passages", "fot-hybrid", "fot-attention", "fot-bag", "knn-bag",
    "fot-words", "knn-words",
)
DEFAULT_CONFIGS: tuple[str, ...] = ("plain", *BACKENDS)
LONG_LENGTH = 128_000
DEPTH_BINS = 5


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


def config_lm(name: str, hf_model, tokenizer, model: str | None, store: FaissStore | None = None) -> MemoryLM | None:
    """The MemoryLM of a configuration; "plain" is None. "<backend>-<variant>" sets the read
    (`reread`, `passages`, `bag`) or the passage read's scoring (`hybrid`, `attention`). A configuration with an
    adapter runs on its own copy of the model, since a LoRA adapter changes the weights; the
    others share `hf_model`. `store`: where its memories go (variants of a backend share one)."""
    if name == "plain":
        return None
    backend, _, variant = name.partition("-")
    settings = dict(backend=backend)
    if variant == "words":
        settings["embedder"] = None
    elif variant:
        settings["read" if variant in READ_MODES else "read_scoring"] = variant
    store = store if store is not None else FaissStore(None)
    if config_adapter(backend, model) is not None:
        return MemoryLM.load(store=store, **settings)
    return MemoryLM(hf_model, tokenizer, store, MemoryConfig(**settings))


# -- the run --------------------------------------------------------------------------------------


def evaluate(config: EvalConfig) -> dict:
    """Run every configuration on the same documents; returns the report (see `run`)."""
    config.validate()
    header = {**report_header(config.model), "chat": config.chat}
    # Read before the model loads (a bad file fails at once) and before the checkpoint below restarts.
    reuse = answered_before(config.resume, header)
    if reuse:
        print(f"reusing the answers to {len(reuse)} documents of {', '.join(map(str, config.resume))}")
    hf_model, tokenizer = load_model(config.model, dtype=BENCH_DTYPE)
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
    # Variants of one backend (its reads and scorings) write the same memory: they share a store
    # and each document is ingested once, for the first of them; the last one forgets it.
    stores: dict[str, FaissStore] = {}
    backend_of = {name: name.partition("-")[0] for name in config.configs}
    for index, name in enumerate(config.configs):
        started = time.perf_counter()
        lm = config_lm(name, hf_model, tokenizer, config.model, stores.setdefault(backend_of[name], FaissStore(None)))
        later_variant = any(backend_of[other] == backend_of[name] for other in config.configs[index + 1 :])
        trials += run_config(name, lm, base, docs, reuse, config.checkpoint, config.chat, keep_memories=later_variant)
        seconds[name] = time.perf_counter() - started
    accuracy, retention, evidence = summarize(trials, config)
    return {
        **header,
        "model_window": base.max_positions,
        "adapters": adapter_names(config.configs, config.model),
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


def run(config: EvalConfig) -> dict:
    report = evaluate(config)
    print_table(report)
    write(report, config)
    return report


def write(report: dict, config: EvalConfig) -> None:
    save_report(report, config.out_dir / config.name,
                {"": partial(plot_heatmaps, report), "_accuracy": partial(plot_accuracy, report)})  # fmt: skip
    config.checkpoint.unlink(missing_ok=True)  # everything in it is in the report now


# -- the report -----------------------------------------------------------------------------------


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
                accuracy[kind][name][str(length)] = accuracy_cell(sum(t.right for t in cell), len(cell))
                evidence[kind][name][str(length)] = evidence_cell(cell)
        reference = in_window_reference(accuracy[kind], config)
        for name in config.configs:
            retention[kind][name] = {
                str(length): None if not reference or cell["accuracy"] is None else cell["accuracy"] / reference
                for length, cell in ((n, accuracy[kind][name][str(n)]) for n in config.all_lengths)
            }
    return accuracy, retention, evidence


def evidence_cell(trials: list[Trial]) -> dict:
    """{read, n, recall, ci95, median_rank, first_stage, first_stage_ci95} of the trials whose
    evidence was scored (n; those of configurations that read passages or blocks): `read` had
    it in front of the model, `first_stage` among the first stage's candidates (or in view);
    the median rank of the passage read that brought it."""
    scored = [t for t in trials if t.evidence_read is not None]
    read = sum(t.evidence_read for t in scored)
    found = sum(bool(t.candidate_found) for t in scored)
    ranks = [t.evidence_rank for t in scored if t.evidence_rank is not None]  # read from memory
    return {
        "read": read, "n": len(scored), "recall": read / len(scored) if scored else None,
        "ci95": list(wilson(read, len(scored))), "median_rank": float(np.median(ranks)) if ranks else None,
        "first_stage": found, "first_stage_recall": found / len(scored) if scored else None,
        "first_stage_ci95": list(wilson(found, len(scored))),
    }  # fmt: skip


def in_window_reference(by_config: dict, config: EvalConfig) -> float | None:
    """What the model can do with the whole document visible: the plain model at the
    in-window length (else the first configuration run, when plain was left out)."""
    name = "plain" if "plain" in by_config else config.configs[0]
    return by_config[name][str(config.window_length)]["accuracy"]


def print_table(report: dict) -> None:
    lengths = report["lengths"]
    print(f"\naccuracy [95% Wilson interval] (n questions), retention = accuracy / {report['retention_reference']}")
    header = "".join(f"{n:>24}" for n in lengths) + "".join(f"{'ret@' + str(n):>10}" for n in lengths)
    print(f"{'task':<18}{'config':<7}{header}")
    for kind, by_config in report["accuracy"].items():
        for name, by_length in by_config.items():
            cells = [accuracy_text(by_length[str(n)]) for n in lengths]
            kept = [report["retention"][kind][name][str(n)] for n in lengths]
            print(f"{kind:<18}{name:<7}" + "".join(f"{c:>24}" for c in cells)
                  + "".join(f"{'-' if r is None else f'{r:.2f}':>10}" for r in kept))  # fmt: skip
    print("\nevidence recall: the share of questions whose evidence sentences the read placed in front of the model"
          " [95% Wilson interval] (n), median rank of the passage holding it, and @N the share whose evidence"
          " was among the first stage's candidates")
    for kind, by_config in report.get("evidence", {}).items():
        for name, by_length in by_config.items():
            cells = []
            for n in lengths:
                cell = by_length[str(n)]
                if not cell["n"]:
                    cells.append("-")
                    continue
                rank = "-" if cell["median_rank"] is None else f"{cell['median_rank']:.0f}"
                first = cell.get("first_stage_recall")
                first = "" if first is None else f" @N {first:.2f}"
                cells.append(f"{cell['recall']:.2f} [{cell['ci95'][0]:.2f},{cell['ci95'][1]:.2f}] ({cell['n']}) r{rank}{first}")
            if any(c != "-" for c in cells):
                print(f"{kind:<18}{name:<7}" + "".join(f"{c:>36}" for c in cells))


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


def plot_heatmaps(report: dict, path: Path) -> None:
    """One needle-in-a-haystack panel per task kind (rows) and configuration (columns):
    document length across, depth of the fact down, colour = accuracy, blank = no question."""
    kinds, configs, lengths = list(report["accuracy"]), report["configs"], report["lengths"]
    size = (2.0 * len(configs) + 1.2, 1.5 * len(kinds) + 0.8)
    with saved_figure(path, len(kinds), len(configs), figsize=size, squeeze=False, sharex=True, sharey=True,
                      layout="constrained") as (figure, axes):  # fmt: skip
        depth_labels = [f"{(i + 0.5) / DEPTH_BINS:.0%}" for i in range(DEPTH_BINS)]
        image = None
        for row, kind in enumerate(kinds):
            for column, name in enumerate(configs):
                ax = axes[row][column]
                trials = [t for t in report["trials"] if t["kind"] == kind and t["config"] == name]
                image = ax.imshow(depth_grid(trials, lengths), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
                ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths], fontsize=7)
                ax.set_yticks(range(DEPTH_BINS), depth_labels, fontsize=7)
                if row == 0:
                    ax.set_title(name, fontsize=9)
                if column == 0:
                    ax.set_ylabel(f"{kind}\ndepth", fontsize=8)
        figure.colorbar(image, ax=axes, shrink=0.5, label="accuracy")
        figure.suptitle(f"{report['model']}: accuracy by document length and depth of the fact", fontsize=10)


def plot_accuracy(report: dict, path: Path) -> None:
    """Accuracy against length with Wilson intervals, one panel per task kind; the
    configurations sit side by side at each length so that their intervals do not overlap."""
    kinds, lengths, configs = list(report["accuracy"]), report["lengths"], report["configs"]
    columns = min(4, len(kinds))
    rows = math.ceil(len(kinds) / columns)
    size = (3.4 * columns, 2.6 * rows)
    with saved_figure(path, rows, columns, figsize=size, squeeze=False, layout="constrained") as (figure, axes):
        panels = [ax for line in axes for ax in line]
        for ax, kind in zip(panels, kinds):
            for offset, name in enumerate(configs):
                cells = [report["accuracy"][kind][name][str(n)] for n in lengths]
                mean = [c["accuracy"] if c["accuracy"] is not None else float("nan") for c in cells]
                x = [i + (offset - (len(configs) - 1) / 2) * 0.12 for i in range(len(lengths))]
                ax.errorbar(x, mean, yerr=interval_errors(cells, mean), marker="o", capsize=2, label=name)
            ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
            ax.set(title=kind, ylim=(-0.05, 1.05), xlabel="document tokens", ylabel="accuracy")
        for ax in panels[len(kinds) :]:
            ax.set_visible(False)
        panels[0].legend(fontsize=7)
        figure.suptitle(f"{report['model']}: accuracy with 95% Wilson intervals (model window "
                        f"{report['model_window']} tokens)", fontsize=10)  # fmt: skip
