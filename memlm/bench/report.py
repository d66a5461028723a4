"""What every benchmark's report shares: checking names against the known ones, the header
(the machine, the model and the settings the numbers were measured with), the adapters a
configuration ran with, accuracy cells with their Wilson intervals, and writing the JSON and
PNG files."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from memlm.config import MemoryConfig
from memlm.model.adapter import shipped_adapter
from memlm.model.loading import resolve_dtype

EMBEDDED_MODEL = "embedded SmolLM2-135M-Instruct"
# The weights every `memlm bench` loads: what users get ("auto": bfloat16 where the hardware
# computes it, float32 elsewhere, where bf16 is emulated and 4x slower). Each report's header
# records it, and a run resumes only from checkpoints measured in the same dtype.
BENCH_DTYPE = resolve_dtype("auto")


def check_names(label: str, names: Iterable[str], known: Iterable[str]) -> None:
    """Raise ValueError naming the unknown ones and the known ones."""
    known = list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown {label} {unknown}; known: {', '.join(known)}")


def report_header(model: str | None, dtype: torch.dtype = BENCH_DTYPE) -> dict:
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "model": model or EMBEDDED_MODEL,
        "dtype": str(dtype).removeprefix("torch."),
        "defaults": asdict(MemoryConfig()),
    }


# -- adapters -------------------------------------------------------------------------------------


def config_adapter(name: str, model: str | None) -> Path | None:
    """The adapter a configuration ("<backend>" or "<backend>-<variant>") runs with: the one
    shipped for its backend, on the embedded model only (as `MemoryLM.load` does)."""
    return shipped_adapter(name.partition("-")[0]) if model is None else None


def adapter_names(configs: Sequence[str], model: str | None) -> dict[str, str]:
    """configuration -> file name of its shipped adapter, for those that run with one."""
    return {name: adapter.name for name in configs if (adapter := config_adapter(name, model)) is not None}


def adapter_metadata(path: Path) -> dict:
    """An adapter file's kind and provenance (the command, seed, losses that made it)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    provenance = metadata.get("provenance")
    provenance = json.loads(provenance) if provenance else None
    return {"path": str(path), "kind": metadata.get("kind"), "provenance": provenance}


# -- accuracy cells -------------------------------------------------------------------------------


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (sound at 0/n and n/n, unlike p ± z·se)."""
    if n == 0:
        return (0.0, 1.0)
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_cell(right: int, n: int) -> dict:
    """{right, n, accuracy, ci95}: accuracy None where nothing was asked."""
    return {"right": right, "n": n, "accuracy": right / n if n else None, "ci95": list(wilson(right, n))}


def accuracy_text(cell: dict) -> str:
    """An accuracy cell as a table shows it: `0.75 [0.30,0.95] (  4)`."""
    accuracy = "  -" if cell["accuracy"] is None else f"{cell['accuracy']:.2f}"
    return f"{accuracy} [{cell['ci95'][0]:.2f},{cell['ci95'][1]:.2f}] ({cell['n']:>3})"


def interval_errors(cells: Sequence[dict], means: Sequence[float]) -> list[list[float]]:
    """[below, above]: matplotlib's `yerr` that draws each cell's Wilson interval around its
    plotted mean (none for a cell where nothing was asked). Clipped at 0: at n of n right,
    Wilson's upper bound comes out a rounding error below 1.0, and matplotlib refuses a
    negative error."""
    below = [max(0.0, mean - cell["ci95"][0]) if cell["n"] else 0 for mean, cell in zip(means, cells)]
    above = [max(0.0, cell["ci95"][1] - mean) if cell["n"] else 0 for mean, cell in zip(means, cells)]
    return [below, above]


# -- files ----------------------------------------------------------------------------------------


@contextmanager
def saved_figure(path: Path, rows: int = 1, columns: int = 1, dpi: int = 110, **options) -> Iterator[tuple]:
    """(figure, axes) of `pyplot.subplots(rows, columns, **options)`, saved to `path` when the
    block ends and closed even when drawing fails. matplotlib draws to files only (no display
    on a server) and is imported here, when a benchmark first plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, columns, **options)
    try:
        yield figure, axes
        figure.savefig(path, dpi=dpi, bbox_inches="tight")  # a long suptitle is kept whole
    finally:
        plt.close(figure)


def length_label(n: int) -> str:
    return f"{n / 1000:g}k" if n >= 1000 else str(n)


def save_report(
    report: dict, stem: Path, figures: dict[str, Callable[[Path], None]], indent: int = 1, quiet: bool = False
) -> None:
    """Write `<stem>.json`, and each figure, drawn by its function, to `<stem><suffix>.png`;
    then say what was written, unless `quiet` (as for a partial save while the run goes on)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [Path(f"{stem}.json")]
    written[0].write_text(json.dumps(report, indent=indent) + "\n")
    for suffix, draw in figures.items():
        written.append(Path(f"{stem}{suffix}.png"))
        draw(written[-1])
    if not quiet:
        *first, last = map(str, written)
        print(f"wrote {', '.join(first)} and {last}" if first else f"wrote {last}")
