"""Store benchmark: append throughput, search latency and recall of every store, side by side.

    python -m memlm.bench.store --sizes 10000 100000 1000000

For each memory size N (vectors of `dim` floats, one per block, one head):

- append: vectors/s through `add` in batches of `batch`, committing every `commit_every`
  vectors (one transaction per 64k-token document), timed to the last durable commit;
- search: median latency of one `search` of `queries` queries, top_k blocks each;
- recall@top_k against exact inner-product search, for each store and each ANN setting.

Stores: in-process FAISS (`FaissStore` on disk), `LanceStore` in process (searches go to
its FAISS cache), the same LanceStore data searched by Lance itself (flat below
`index_min_rows`, IVF above it: the measured nprobes and a sweep), and `RemoteStore` over
loopback to a store server in another process (backed by FAISS files).

Data: search keys drawn from a mixture of `clusters` Gaussians (attention keys are
clustered, not isotropic; uniform Gaussian data is the worst case for IVF), queries drawn
from the same mixture but never stored; keys and values are float16 as the engine stores
them by default (MemoryConfig.memory_dtype), search keys float32.

Writes `<out_dir>/store.json` and `<out_dir>/store.png` and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from memlm.bench.report import save_report, saved_figure
from memlm.store import Blocks, FaissStore, VectorStore
from memlm.store.lance_store import LanceStore
from memlm.store.remote import RemoteStore

REPO = Path(__file__).resolve().parents[2]


@dataclass
class BenchConfig:
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    dim: int = 64
    top_k: int = 32
    queries: int = 1024
    batch: int = 4096  # vectors per add()
    commit_every: int = 65_536  # vectors per transaction
    repeats: int = 5  # timed searches per store (after one warm-up)
    clusters: int = 256
    kv_dtype: str = "float16"
    index_min_rows: int = 100_000  # LanceStore's default: IVF from here on
    out_dir: str = "benchmarks/results"
    seed: int = 0


@dataclass
class StoreResult:
    store: str
    size: int
    append_vectors_per_s: float | None
    search_ms: float
    recall: float
    note: str = ""


@dataclass
class AnnResult:
    size: int
    index: str
    nprobes: int
    search_ms: float
    recall: float
    chosen: bool  # the nprobes LanceStore measured for itself


@dataclass
class Report:
    config: BenchConfig
    stores: list[StoreResult] = field(default_factory=list)
    ann: list[AnnResult] = field(default_factory=list)
    targets: dict = field(default_factory=dict)
    # CPUs and load average (1, 5, 15 min) when the run began and ended: on a shared machine
    # the absolute numbers move with the load, the ratios between stores much less.
    machine: dict = field(default_factory=dict)


# -- data and timing -------------------------------------------------------------------------------


def make_data(config: BenchConfig, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(config.seed + size)
    centers = rng.standard_normal((config.clusters, config.dim)).astype(np.float32) * 2

    def draw(n: int) -> np.ndarray:
        return centers[rng.integers(0, config.clusters, n)] + rng.standard_normal((n, config.dim)).astype(np.float32)

    return draw(size), draw(config.queries)


def blocks_of(vectors: np.ndarray, start: int, kv_dtype: str) -> Blocks:
    """One head, blocks of one token; positions are the vectors' ids, for recall."""
    kv = vectors.astype(kv_dtype)[None, :, None]  # (H=1, N, B=1, D)
    return Blocks(vectors[None], kv, kv.copy(), np.arange(start, start + len(vectors), dtype=np.int64)[:, None])


def append_all(store: VectorStore, vectors: np.ndarray, config: BenchConfig) -> float:
    """Vectors per second, from the first add to the last commit."""
    began = time.perf_counter()
    for start in range(0, len(vectors), config.batch):
        store.add("bench", 0, blocks_of(vectors[start : start + config.batch], start, config.kv_dtype))
        end = start + config.batch
        if end % config.commit_every == 0 or end >= len(vectors):
            store.commit("bench")
    return len(vectors) / (time.perf_counter() - began)


def timed_search(
    store: VectorStore, queries: np.ndarray, config: BenchConfig, repeats: int
) -> tuple[float, np.ndarray]:
    """Median milliseconds of one search of all queries, and the ids found (Q, top_k)."""
    found = store.search("bench", 0, queries[None], config.top_k)  # warm-up: caches, lazy loads
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        found = store.search("bench", 0, queries[None], config.top_k)
        times.append(time.perf_counter() - began)
    return 1000 * float(np.median(times)), found.positions[0, :, :, 0]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


class StoreServer:
    """`memlm store-serve` in a child process, as a real deployment runs it."""

    def __init__(self, data: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "memlm.cli", "store-serve", "--port", "0", "--data", data, "--host", "127.0.0.1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        line = self.process.stdout.readline()
        if "listening on port" not in line:
            self.process.kill()
            raise RuntimeError(f"store server did not start: {line!r}")
        self.port = int(line.split("listening on port")[1].split()[0])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


# -- the benchmark ---------------------------------------------------------------------------------


def bench_size(config: BenchConfig, size: int, folder: Path, report: Report, progress: tqdm) -> None:
    vectors, queries = make_data(config, size)

    def step(name: str) -> None:
        progress.set_postfix_str(f"N={size:,} {name}")
        progress.update()

    # In-process FAISS: the reference, and the exact answers.
    store = FaissStore(folder / "faiss")
    append = append_all(store, vectors, config)
    search_ms, truth = timed_search(store, queries, config, config.repeats)
    report.stores.append(StoreResult("faiss (in process)", size, append, search_ms, 1.0))
    faiss_append, faiss_search = append, search_ms
    del store
    gc.collect()
    step("faiss")

    # LanceStore in process: durable on Lance, searched through its FAISS cache.
    store = LanceStore(str(folder / "lance"), index_min_rows=config.index_min_rows)
    append = append_all(store, vectors, config)
    began = time.perf_counter()
    store.wait_for_index()  # built in the background past index_min_rows
    index_wait = time.perf_counter() - began
    search_ms, found = timed_search(store, queries, config, config.repeats)
    note = f"index ready {index_wait:.1f} s after the last commit" if index_wait > 0.05 else ""
    report.stores.append(StoreResult("lance (FAISS cache)", size, append, search_ms, recall(found, truth), note))
    chosen = store._nprobes.get(config.dim)
    store.close()
    del store
    gc.collect()
    step("lance")

    # The same data searched by Lance itself: flat below index_min_rows, IVF above.
    store = LanceStore(str(folder / "lance"), cache_bytes=0, index_min_rows=config.index_min_rows)
    search_ms, found = timed_search(store, queries, config, max(1, config.repeats // 2))
    chosen = store._index_nprobes(config.dim) if chosen is None else chosen
    kind = f"IVF_FLAT, nprobes {chosen} (measured)" if chosen else "flat (exact)"
    report.stores.append(StoreResult("lance (Lance search)", size, None, search_ms, recall(found, truth), kind))
    step("lance search")
    if chosen:
        sweep = sorted({2**i for i in range(12) if 2**i <= 4 * chosen} | {chosen})
        for nprobes in sweep:
            probe = LanceStore(str(folder / "lance"), cache_bytes=0, nprobes=nprobes)
            ms, found = timed_search(probe, queries, config, 1)
            report.ann.append(
                AnnResult(size, "IVF_FLAT", nprobes, ms, recall(found, truth), nprobes == chosen)
            )
    del store
    gc.collect()

    # RemoteStore over loopback to a server process on FAISS files.
    server = StoreServer(str(folder / "remote"))
    try:
        store = RemoteStore.from_url(f"grpc://127.0.0.1:{server.port}")
        store.memories()  # connect first: a deployed client's channel is warm
        append = append_all(store, vectors, config)
        search_ms, found = timed_search(store, queries, config, config.repeats)
        report.stores.append(StoreResult("remote (gRPC loopback)", size, append, search_ms, recall(found, truth)))
        report.targets[size] = {
            "remote_search_over_faiss": search_ms / faiss_search,
            "remote_append_over_faiss": append / faiss_append,
        }
        store.close()
    finally:
        server.stop()
    step("remote")


def run(
    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000),
    dim: int = 64,
    top_k: int = 32,
    out_dir: str = "benchmarks/results",
    **options,
) -> Report:
    config = BenchConfig(sizes=tuple(sizes), dim=dim, top_k=top_k, out_dir=out_dir, **options)
    report = Report(config, machine={"cpus": os.cpu_count(), "load_before": os.getloadavg()})
    with tqdm(total=4 * len(config.sizes), desc="store bench") as progress:
        for size in config.sizes:
            with tempfile.TemporaryDirectory(prefix="memlm-bench-") as folder:
                bench_size(config, size, Path(folder), report, progress)
    report.machine["load_after"] = os.getloadavg()
    save_report(asdict(report), Path(out_dir) / "store", {"": partial(plot, report)}, indent=2, quiet=True)
    print_table(report)
    return report


# -- output ----------------------------------------------------------------------------------------


def print_table(report: Report) -> None:
    config = report.config
    print(f"\nsearch: {config.queries} queries, top_k {config.top_k}, dim {config.dim}; append: batches of "
          f"{config.batch}, commit every {config.commit_every}")  # fmt: skip
    print(f"{'N':>10}  {'store':<24}{'append vec/s':>14}{'search ms':>12}{'recall':>9}  note")
    for r in report.stores:
        append = f"{r.append_vectors_per_s:,.0f}" if r.append_vectors_per_s else "-"
        print(f"{r.size:>10,}  {r.store:<24}{append:>14}{r.search_ms:>12.1f}{r.recall:>9.3f}  {r.note}")
    if report.ann:
        print(f"\n{'N':>10}  {'index':<10}{'nprobes':>8}{'search ms':>12}{'recall@' + str(config.top_k):>11}")
        for a in report.ann:
            mark = "  <- measured choice" if a.chosen else ""
            print(f"{a.size:>10,}  {a.index:<10}{a.nprobes:>8}{a.search_ms:>12.1f}{a.recall:>11.3f}{mark}")
    for size, ratios in report.targets.items():
        print(
            f"N={size:,}: remote search {ratios['remote_search_over_faiss']:.2f}x in-process FAISS (target <= 1.5), "
            f"remote append {ratios['remote_append_over_faiss']:.2f}x (target >= 0.5)"
        )


def plot(report: Report, path: Path) -> None:
    with saved_figure(path, 1, 3, figsize=(16, 4.5), dpi=120) as (fig, (ax_append, ax_search, ax_ann)):
        for number, name in enumerate(dict.fromkeys(r.store for r in report.stores)):
            style = dict(marker="o", color=f"C{number}", label=name)  # one colour per store in every panel
            rows = [r for r in report.stores if r.store == name]
            ax_search.plot([r.size for r in rows], [r.search_ms for r in rows], **style)
            rows = [r for r in rows if r.append_vectors_per_s]
            if rows:
                ax_append.plot([r.size for r in rows], [r.append_vectors_per_s for r in rows], **style)
        search_title = f"search ({report.config.queries} queries, top {report.config.top_k})"
        for ax, title, unit in [(ax_append, "append", "vectors / s"), (ax_search, search_title, "ms per search")]:
            ax.set(xscale="log", yscale="log", xlabel="vectors in memory", ylabel=unit)
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        for size in dict.fromkeys(a.size for a in report.ann):
            rows = [a for a in report.ann if a.size == size]
            ax_ann.plot([a.search_ms for a in rows], [a.recall for a in rows], "o-", label=f"IVF_FLAT, N={size:,}")
            for a in rows:
                ax_ann.annotate(str(a.nprobes) + ("*" if a.chosen else ""), (a.search_ms, a.recall), fontsize=7)
        ax_ann.axhline(0.95, color="grey", linestyle="--", linewidth=1)
        ax_ann.set(xscale="log", xlabel="ms per search", ylabel=f"recall@{report.config.top_k} vs exact")
        ax_ann.set_title("Lance ANN: nprobes sweep (* = measured choice)")
        ax_ann.grid(True, which="both", alpha=0.3)
        if report.ann:
            ax_ann.legend(fontsize=8)
        fig.tight_layout()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark the memory stores.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    run(tuple(args.sizes), args.dim, args.top_k, args.out_dir, repeats=args.repeats)


if __name__ == "__main__":
    main()
