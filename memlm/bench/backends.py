"""`memlm bench backends`: every memory backend next to the plain model, in one run, on the
held-out generated tasks that separate them (passkey and BABILong-style fact questions),
with their costs.

- accuracy, with 95% Wilson intervals and retention, comes from `memlm bench eval` (same
  documents for every configuration; the plain model's input is cut to its window);
- speed, per backend, on one document of `speed_length` tokens: ingest tokens/s against the
  plain model's segmented forward pass over the same text, and decode ms/token with that
  document in memory against an empty memory (memlm/bench/passkey.py `throughput`).

Where a backend's reach ends shows in the accuracy: `xl` recalls nothing older than its
`mem_len` (the local window), `rmt` only what it wrote into its notes, `fot`/`knn`
whatever retrieval finds. Writes `<name>.json`, `<name>.png` (heat maps),
`<name>_accuracy.png` and `<name>_speed.png`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from memlm.bench.eval import DEFAULT_CONFIGS, EvalConfig, config_lm, evaluate, print_table, write
from memlm.bench.passkey import throughput
from memlm.bench.report import BENCH_DTYPE, check_names, saved_figure
from memlm.model.loading import load_model

FAMILIES: tuple[str, ...] = ("passkey", "babilong")
CONFIGS: tuple[str, ...] = DEFAULT_CONFIGS  # the plain model and every backend


@dataclass
class BackendsConfig:
    lengths: list[int] = field(default_factory=lambda: [4_000, 16_000, 32_000])
    trials: int = 20  # documents per family, length and configuration
    window_length: int = 2_000
    configs: list[str] = field(default_factory=lambda: list(CONFIGS))
    speed_length: int = 16_000  # 0: no speed measurement
    model: str | None = None
    seed: int = 0
    out_dir: Path = Path("benchmarks/results")
    name: str = "backends"
    resume: list[Path] = field(default_factory=list)  # earlier reports or checkpoints (memlm/bench/eval.py)

    def eval_config(self) -> EvalConfig:
        return EvalConfig(lengths=self.lengths, window_length=self.window_length, trials=self.trials,
                          families=list(FAMILIES), configs=self.configs, model=self.model, seed=self.seed,
                          out_dir=self.out_dir, name=self.name, resume=self.resume)  # fmt: skip


def measure_speed(config: BackendsConfig) -> dict[str, dict]:
    """throughput() per backend on one shared document length (the plain model is the
    reference inside each measurement, so it has no row of its own)."""
    hf_model, tokenizer = load_model(config.model, dtype=BENCH_DTYPE)
    speed = {}
    for name in config.configs:
        lm = config_lm(name, hf_model, tokenizer, config.model)
        if lm is not None:
            print(f"speed: {name} on {config.speed_length} tokens")
            speed[name] = throughput(lm, config.speed_length)
    return speed


def run(config: BackendsConfig) -> dict:
    check_names("configuration", config.configs, CONFIGS)
    evaluation = config.eval_config()
    report = evaluate(evaluation)
    report["speed"] = measure_speed(config) if config.speed_length else {}
    print_table(report)
    print_speed(report["speed"])
    write(report, evaluation)
    if report["speed"]:
        plot_speed(report["speed"], config.out_dir / f"{config.name}_speed.png")
    return report


def print_speed(speed: dict[str, dict]) -> None:
    if not speed:
        return
    print("\nspeed (ratios against the plain model's segmented forward / an empty memory, same run)")
    print(f"{'backend':<8}{'tokens':>8}{'ingest tok/s':>14}{'x plain':>9}{'decode ms':>11}{'x empty':>9}{'KiB/token':>11}")
    for name, s in speed.items():
        print(f"{name:<8}{s['length']:>8}{s['ingest_tokens_per_s']:>14.0f}{s['ingest_ratio']:>9.2f}"
              f"{s['decode_ms_full_memory']:>11.1f}{s['decode_ratio']:>9.2f}{s['memory_bytes_per_token'] / 1024:>11.1f}")  # fmt: skip


def plot_speed(speed: dict[str, dict], path: Path) -> None:
    names = list(speed)
    with saved_figure(path, 1, 2, figsize=(8, 3), layout="constrained") as (figure, (left, right)):
        left.bar(names, [speed[n]["ingest_ratio"] for n in names])
        left.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        left.set(title="ingest speed / plain forward", ylabel="ratio (higher is faster)")
        right.bar(names, [speed[n]["decode_ratio"] for n in names], color="tab:orange")
        right.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        right.set(title="decode time, full / empty memory", ylabel="ratio (lower is faster)")
        length = next(iter(speed.values()))["length"]
        figure.suptitle(f"cost of each backend on a {length}-token document", fontsize=10)
