"""`memlm bench train`: does training help? The memory backends before and after training,
side by side in one run:

- `fot` (training-free) against `fot+lora` (the same backend with the LoRA adapter of
  `memlm train fot`);
- `knn` (untrained gates, g = sigmoid(0) = 0.5 in every head) against `knn+gates` (the gates
  of `memlm train gate`).

Two measurements, because training can help one and hurt the other:

1. Perplexity of the last `tail` tokens of held-out long documents (generated handbooks with
   seeds below 10^9, where training draws from 10^9 upwards, or the eval split of `--data`),
   with memory and without it (the same configuration with no memory layer: the same local
   window, no retrieval). Language modelling is what the fot adapter is trained on; the gap
   with/without says how much of the document's past memory brings back.
2. Accuracy on passkey and BABILong-style questions at several lengths, the documents and
   scoring of `memlm bench eval`, with 95% Wilson intervals: what users ask of a memory.

A configuration whose adapter file is missing is skipped with a note, so the command runs
before any training. Prints a table and writes `<name>.json` (with each adapter's provenance,
from its metadata) and `<name>.png`.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memlm.bench.eval import EvalConfig, documents, summarize
from memlm.bench.families import FAMILIES, document_seed
from memlm.bench.report import (
    BENCH_DTYPE,
    accuracy_text,
    adapter_metadata,
    check_names,
    interval_errors,
    length_label,
    report_header,
    save_report,
    saved_figure,
)
from memlm.bench.trials import run_config
from memlm.config import MemoryConfig
from memlm.engine import MemoryLM
from memlm.model.adapter import SHIPPED_DIR, load_adapter
from memlm.model.loading import load_model
from memlm.store import FaissStore
from memlm.train.data import handbook_ids, packed_documents

CONFIGS: tuple[str, ...] = ("fot", "fot+lora", "knn", "knn+gates")


@dataclass(frozen=True)
class Variant:
    """One configuration: a backend, trained (an adapter file) or not."""

    name: str
    backend: str
    adapter: Path | None  # None: training-free


@dataclass
class TrainBenchConfig:
    lengths: list[int] = field(default_factory=lambda: [16_000, 32_000])  # question-answering document lengths
    trials: int = 5  # documents per task family and length (several questions each)
    families: list[str] = field(default_factory=lambda: ["passkey", "babilong"])
    docs: int = 8  # held-out documents for perplexity
    doc_length: int = 16_000  # tokens per perplexity document
    tail: int = 1024  # the last tokens of each document that perplexity is measured on
    data: Path | None = None  # a directory of .txt/.md files (its eval split); None: generated handbooks
    configs: list[str] = field(default_factory=lambda: list(CONFIGS))
    fot_adapter: Path = SHIPPED_DIR / "fot-lora.safetensors"
    knn_adapter: Path = SHIPPED_DIR / "knn-gates.safetensors"
    model: str | None = None
    seed: int = 0
    out_dir: Path = Path("benchmarks/results")
    name: str = "train"

    def validate(self) -> None:
        check_names("configuration", self.configs, CONFIGS)
        check_names("task", self.families, FAMILIES)
        if min(self.trials, self.docs, self.tail) < 1:
            raise ValueError("trials, docs and tail must be >= 1")
        if self.doc_length <= self.tail + 1:
            raise ValueError(f"doc_length {self.doc_length} leaves no context before the last {self.tail} tokens")
        if any(n < 100 for n in self.lengths):
            raise ValueError("lengths must be at least 100 tokens")

    def variants(self) -> tuple[list[Variant], dict[str, str]]:
        """The configurations to run, and those skipped (name -> why)."""
        every = {
            "fot": Variant("fot", "fot", None),
            "fot+lora": Variant("fot+lora", "fot", Path(self.fot_adapter)),
            "knn": Variant("knn", "knn", None),
            "knn+gates": Variant("knn+gates", "knn", Path(self.knn_adapter)),
        }
        run, skipped = [], {}
        for name in self.configs:
            variant = every[name]
            if variant.adapter is not None and not variant.adapter.is_file():
                skipped[name] = f"no adapter file at {variant.adapter}"
            else:
                run.append(variant)
        return run, skipped


def build(
    variant: Variant, shared_model, tokenizer, model: str | None, settings: MemoryConfig | None = None
) -> MemoryLM:
    """A MemoryLM for `variant` (`settings`: all but the backend; default MemoryConfig()). LoRA
    is injected into the model's weights, so an adapter that holds LoRA gets its own copy of the
    model; gates live in the backend object, so knn+gates shares the training-free weights."""
    settings = replace(settings or MemoryConfig(), backend=variant.backend)
    if variant.adapter is not None and adapter_metadata(variant.adapter)["kind"] != "knn-gates":
        return MemoryLM.load(model, backend=variant.backend, store=FaissStore(None), config=settings,
                             adapter=variant.adapter)  # fmt: skip
    # Built directly, not with MemoryLM.load, so that no shipped adapter is applied by default.
    lm = MemoryLM(shared_model, tokenizer, FaissStore(None), settings)
    if variant.adapter is not None:
        load_adapter(lm, variant.adapter)
    return lm


def without_memory(lm: MemoryLM) -> MemoryLM:
    """The same weights and local window with no memory layer: nothing is stored or retrieved."""
    return MemoryLM(lm.model, lm.tokenizer, FaissStore(None), replace(lm.config, memory_layers=[]))


# -- perplexity -----------------------------------------------------------------------------


def perplexity_documents(config: TrainBenchConfig, tokenizer) -> list[list[int]]:
    """Held-out documents: the eval split of `config.data`, or generated handbooks whose seeds
    stay below TRAIN_SEED_BASE, where the training seeds begin."""
    if config.data is not None:
        found = list(itertools.islice(packed_documents(config.data, tokenizer, config.doc_length, "eval"), config.docs))
        if not found:
            raise ValueError(f"no held-out document of {config.doc_length} tokens in {config.data}")
        return found
    seeds = [document_seed(config.seed, "perplexity", config.doc_length, i) for i in range(config.docs)]
    return [handbook_ids(tokenizer, config.doc_length, seed) for seed in seeds]


def tail_logits(lm: MemoryLM, ids: list[int], tail: int, memory: str) -> torch.Tensor:
    """Logits (tail, vocab) that predict the last `tail` tokens of `ids`, the whole document
    read into `memory`. Only the last segments' logits are kept (a 16k-token document's would
    take 3 GB): the document goes in two calls, split at a segment boundary, so that every
    token sees the same segment, window and memory as in one call."""
    segment = lm.config.segment_len
    split = (len(ids) - tail - 1) // segment * segment
    if split > 0:
        lm.ingest_tokens(ids[:split], memory, progress=False)
    logits = lm.ingest_tokens(ids[split:], memory, progress=False, return_logits=True).logits  # (T, vocab)
    return logits[-tail - 1 : -1]  # row t predicts token t + 1


def tail_nll(logits: torch.Tensor, ids: Sequence[int], tail: int) -> float:
    """Mean cross-entropy (nats per token) of the last `tail` tokens of `ids`; `logits`
    (tail, vocab) from `tail_logits`."""
    targets = torch.tensor(list(ids[-tail:]), device=logits.device)
    return F.cross_entropy(logits.float(), targets).item()


def document_nlls(lm: MemoryLM, docs: list[list[int]], tail: int, desc: str) -> list[float]:
    """Tail cross-entropy per document, each read into a fresh memory."""
    nlls = []
    for ids in tqdm(docs, desc=desc, unit="doc"):
        nlls.append(tail_nll(tail_logits(lm, ids, tail, "perplexity"), ids, tail))
        lm.forget("perplexity")
    return nlls


def perplexity(nlls: list[float]) -> float:
    """Over all documents' tail tokens (every document has the same number of them)."""
    return math.exp(sum(nlls) / len(nlls))


def measure_perplexity(lm: MemoryLM, docs: list[list[int]], tail: int, name: str,
                       bare_nlls: list[float] | None = None) -> dict:
    """{with_memory, without_memory, nll per document with and without} for one configuration.
    `bare_nlls`: the without-memory numbers when already measured on the same weights (without
    memory layers the backend, gates included, takes no part)."""
    with_nlls = document_nlls(lm, docs, tail, f"perplexity {name}")
    if bare_nlls is None:
        bare_nlls = document_nlls(without_memory(lm), docs, tail, f"perplexity {name} without memory")
    return {"with_memory": perplexity(with_nlls), "without_memory": perplexity(bare_nlls),
            "nll_with_memory": with_nlls, "nll_without_memory": bare_nlls}  # fmt: skip


# -- the run --------------------------------------------------------------------------------


def run(config: TrainBenchConfig) -> dict:
    config.validate()
    variants, skipped = config.variants()
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    if not variants:
        raise ValueError("nothing to run: every configuration asked for was skipped")
    shared_model, tokenizer = load_model(config.model, dtype=BENCH_DTYPE)
    ppl_docs = perplexity_documents(config, tokenizer)
    # window_length = the shortest length: bench eval's in-window reference run is not repeated here.
    qa_config = EvalConfig(lengths=config.lengths, window_length=min(config.lengths), trials=config.trials,
                           families=config.families, configs=[v.name for v in variants], seed=config.seed)  # fmt: skip
    qa_docs = documents(qa_config)
    report = {
        "config": json.loads(json.dumps(asdict(config), default=str)),
        **report_header(config.model),
        "configs": [v.name for v in variants],
        "skipped": skipped,
        "adapters": {v.name: adapter_metadata(v.adapter) for v in variants if v.adapter is not None},
        "perplexity_documents": {"count": len(ppl_docs), "tokens": config.doc_length, "tail": config.tail,
                                 "source": str(config.data) if config.data else "generated handbooks"},  # fmt: skip
        "lengths": config.lengths,
        "documents_per_cell": config.trials,
        "perplexity": {},
        "accuracy": {},
        "seconds": {},
        "answers": [],
    }
    trials = []
    shared_bare: list[float] | None = None  # without-memory NLLs of the shared weights, measured once
    for variant in variants:
        started = time.perf_counter()
        lm = build(variant, shared_model, tokenizer, config.model)  # a LoRA copy is freed with the next
        shared = lm.model is shared_model
        measured = measure_perplexity(lm, ppl_docs, config.tail, variant.name, shared_bare if shared else None)
        shared_bare = measured["nll_without_memory"] if shared else shared_bare
        report["perplexity"][variant.name] = measured
        trials += run_config(variant.name, lm, lm, qa_docs)
        report["seconds"][variant.name] = time.perf_counter() - started
        report["accuracy"] = summarize(trials, replace(qa_config, configs=list(report["seconds"])))[0]
        report["answers"] = [asdict(t) for t in trials]
        # Partial results survive a stop.
        save_report(report, config.out_dir / config.name, {"": partial(plot, report)}, quiet=True)
    print_table(report)
    save_report(report, config.out_dir / config.name, {"": partial(plot, report)})
    return report


def print_table(report: dict) -> None:
    docs = report["perplexity_documents"]
    print(f"\nperplexity of the last {docs['tail']} tokens of {docs['count']} held-out documents of "
          f"{docs['tokens']} tokens ({docs['source']})")  # fmt: skip
    print(f"{'config':<11}{'with memory':>13}{'without':>10}{'change':>9}")
    for name, cell in report["perplexity"].items():
        change = cell["with_memory"] / cell["without_memory"] - 1
        print(f"{name:<11}{cell['with_memory']:>13.3f}{cell['without_memory']:>10.3f}{change:>+9.1%}")
    lengths = report["lengths"]
    per_cell = report["documents_per_cell"]
    print(f"\naccuracy [95% Wilson interval] (n questions), {per_cell} documents per task and length")
    print(f"{'task':<16}{'config':<11}" + "".join(f"{n:>22}" for n in lengths))
    for kind, by_config in report["accuracy"].items():
        for name, by_length in by_config.items():
            cells = [accuracy_text(by_length[str(n)]) for n in lengths]
            print(f"{kind:<16}{name:<11}" + "".join(f"{c:>22}" for c in cells))
    for name, why in report["skipped"].items():
        print(f"skipped {name}: {why}")


def plot(report: dict, path: Path) -> None:
    """Perplexity with and without memory per configuration; accuracy per configuration and
    length with Wilson intervals, one panel per task kind. Trained configurations sit next to
    their training-free ones (the order of CONFIGS)."""
    kinds, configs, lengths = list(report["accuracy"]), list(report["perplexity"]), report["lengths"]
    size = (3.6 * (1 + len(kinds)), 3.4)
    with saved_figure(path, 1, 1 + len(kinds), figsize=size, squeeze=False, layout="constrained") as (figure, axes):
        ax, width = axes[0][0], 0.4
        for offset, (key, label) in enumerate((("with_memory", "with memory"), ("without_memory", "without"))):
            values = [report["perplexity"][name][key] for name in configs]
            ax.bar([i + (offset - 0.5) * width for i in range(len(configs))], values, width, label=label)
        ax.set_xticks(range(len(configs)), configs, fontsize=8)
        ax.set(title=f"perplexity, last {report['perplexity_documents']['tail']} tokens", ylabel="perplexity")
        ax.legend(fontsize=7)
        width = 0.8 / max(1, len(configs))
        for ax, kind in zip(axes[0][1:], kinds):
            for offset, name in enumerate(report["accuracy"][kind]):
                cells = [report["accuracy"][kind][name][str(n)] for n in lengths]
                mean = [c["accuracy"] if c["accuracy"] is not None else 0.0 for c in cells]
                x = [i + (offset - (len(configs) - 1) / 2) * width for i in range(len(lengths))]
                ax.bar(x, mean, width, yerr=interval_errors(cells, mean), capsize=2, label=name)
            ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
            ax.set(title=kind, ylim=(0, 1.05), xlabel="document tokens", ylabel="accuracy")
        if kinds:
            axes[0][1].legend(fontsize=7)
        figure.suptitle(f"{report['model']}: memory backends before and after training", fontsize=10)
