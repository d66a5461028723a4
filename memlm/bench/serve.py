"""Serving benchmark: the gRPC model service over loopback against `MemoryLM` in process.

    memlm bench serve                       # or: python -m memlm.bench.serve --soak-seconds 60

On the embedded model with an in-RAM store (`MemoryLM.load(store="memory")`):

- ingest tokens/s of one document, in process and through `Ingest` (same model object,
  alternating, best of `repeats`); target: gRPC >= 0.9x in process;
- `Generate` with 1, 4 and 16 concurrent streams: time to first token p50/p99 (client side,
  queueing included: the server runs `concurrency` at once) and total tokens/s; every
  stream's tokens are checked against the greedy answer of one stream alone;
- a soak: 16 streams in a loop for `soak_seconds`, counting errors and lost or wrong tokens;
- Ray, 2 shards (1 CPU each) against one process: ingest and decode tokens/s, same tokens.

Writes `<out_dir>/serve.json` and `<out_dir>/serve.png` and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from memlm.bench.report import save_report, saved_figure
from memlm.engine import MemoryLM
from memlm.serve.client import MemoryClient


@dataclass
class BenchConfig:
    document_tokens: int = 4096
    repeats: int = 2
    concurrency_levels: tuple[int, ...] = (1, 4, 16)
    max_tokens: int = 32
    soak_seconds: float = 60.0
    soak_streams: int = 16
    server_concurrency: int = 4  # the server's default: more streams wait in its queue
    ray_shards: int = 2  # 0: skip the Ray comparison
    dtype: str = "bfloat16"
    out_dir: str = "benchmarks/results"


@dataclass
class StreamLevel:
    streams: int
    seconds: float
    tokens: int
    tokens_per_second: float
    ttft_p50_s: float
    ttft_p99_s: float
    errors: int
    wrong_streams: int  # streams whose tokens differ from the single-stream greedy answer


@dataclass
class Report:
    config: dict
    ingest_tokens: int = 0
    ingest_in_process_tps: float = 0.0
    ingest_grpc_tps: float = 0.0
    ingest_ratio: float = 0.0
    generate: list[StreamLevel] = field(default_factory=list)
    soak: dict = field(default_factory=dict)
    ray: dict = field(default_factory=dict)


QUESTION = "What is the access code of the vault?"


def _document(lm: MemoryLM, tokens: int) -> str:
    """Plain filler text with one fact in it, cut to `tokens` tokens of this tokenizer."""
    sentences = [
        f"Report {i}: the north warehouse shipped {i * 7 % 90 + 10} crates of tea on day {i % 28 + 1}. "
        for i in range(tokens // 8)
    ]
    sentences.insert(len(sentences) // 3, "The access code of the vault is 4417. ")
    ids = lm.tokenizer("".join(sentences), add_special_tokens=False)["input_ids"][:tokens]
    return lm.tokenizer.decode(ids)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_ingest(lm: MemoryLM, client: MemoryClient, text: str, repeats: int) -> tuple[int, float, float]:
    best_local = best_remote = 0.0
    tokens = 0
    for attempt in range(repeats):
        for where in ("local", "grpc") if attempt % 2 == 0 else ("grpc", "local"):
            name = f"bench-{where}-{attempt}"
            started = time.perf_counter()
            if where == "local":
                tokens = lm.ingest(text, name, progress=False).tokens
            else:
                tokens = client.ingest(text, memory=name).tokens
            rate = tokens / (time.perf_counter() - started)
            if where == "local":
                best_local = max(best_local, rate)
            else:
                best_remote = max(best_remote, rate)
    return tokens, best_local, best_remote


def run_streams(client: MemoryClient, streams: int, memory: str, max_tokens: int, expected: list[int]) -> StreamLevel:
    """`streams` Generate calls at once; time to first token measured from each call's start."""
    first_token: list[float] = []
    errors = wrong = total = 0
    guard = threading.Lock()

    def one() -> None:
        nonlocal errors, wrong, total
        started = time.perf_counter()
        tokens, first = [], None
        try:
            for piece in client.generate(QUESTION, memory=memory, max_new_tokens=max_tokens):
                if first is None:
                    first = time.perf_counter() - started
                tokens.extend(piece.token_ids)
                if piece.usage is not None and piece.usage.completion_tokens != len(tokens):
                    raise AssertionError("usage does not match the tokens received")
        except Exception:  # noqa: BLE001 - counted, not raised: a benchmark reports errors
            with guard:
                errors += 1
            return
        with guard:
            first_token.append(first)
            total += len(tokens)
            wrong += tokens != expected

    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        for _ in range(streams):
            pool.submit(one)
    seconds = time.perf_counter() - started
    return StreamLevel(
        streams=streams,
        seconds=seconds,
        tokens=total,
        tokens_per_second=total / seconds,
        ttft_p50_s=statistics.median(first_token) if first_token else float("nan"),
        ttft_p99_s=_percentile(first_token, 0.99) if first_token else float("nan"),
        errors=errors,
        wrong_streams=wrong,
    )


def soak(client: MemoryClient, config: BenchConfig, memory: str, expected: list[int]) -> dict:
    deadline = time.perf_counter() + config.soak_seconds
    rounds, levels = 0, []
    while time.perf_counter() < deadline:
        levels.append(run_streams(client, config.soak_streams, memory, config.max_tokens, expected))
        rounds += 1
    return {
        "seconds": config.soak_seconds,
        "streams": config.soak_streams,
        "rounds": rounds,
        "requests": rounds * config.soak_streams,
        "tokens": sum(level.tokens for level in levels),
        "errors": sum(level.errors for level in levels),
        "wrong_streams": sum(level.wrong_streams for level in levels),
    }


def bench_ray(config: BenchConfig, text: str, local: MemoryLM) -> dict:
    """Ingest and one greedy answer on a 2-shard pipeline vs the same in one process."""
    from memlm.serve.ray_pipeline import PipelineConfig, load_pipelines

    started = time.perf_counter()
    (pipeline,) = load_pipelines(PipelineConfig(shards=config.ray_shards, store="memory", dtype=config.dtype))
    startup = time.perf_counter() - started
    try:
        result = {"shards": config.ray_shards, "startup_s": startup}
        for name, lm in (("single", local), ("ray", pipeline)):
            stats = lm.ingest(text, "bench-ray", progress=False)
            started = time.perf_counter()
            answer = lm.generate_full(QUESTION, memory="bench-ray", max_new_tokens=config.max_tokens)
            seconds = time.perf_counter() - started
            result[name] = {
                "ingest_tps": stats.tokens_per_second,
                "decode_tps": len(answer.token_ids) / seconds,
                "tokens": answer.token_ids,
            }
        result["same_tokens"] = result["single"].pop("tokens") == result["ray"].pop("tokens")
        return result
    finally:
        pipeline.close()


def run(config: BenchConfig) -> Report:
    from memlm.serve.model_server import ModelServerConfig, serve

    report = Report(config=asdict(config))
    lm = MemoryLM.load(store="memory", dtype=config.dtype)
    text = _document(lm, config.document_tokens)
    server = serve(ModelServerConfig(port=0, host="127.0.0.1", concurrency=config.server_concurrency), engine=lm)
    try:
        client = MemoryClient(f"127.0.0.1:{server.port}")
        report.ingest_tokens, report.ingest_in_process_tps, report.ingest_grpc_tps = bench_ingest(
            lm, client, text, config.repeats
        )
        report.ingest_ratio = report.ingest_grpc_tps / report.ingest_in_process_tps
        memory = "bench-grpc-0"
        expected = [p.token_id for p in lm.stream(QUESTION, memory=memory, max_new_tokens=config.max_tokens)]
        for streams in config.concurrency_levels:
            report.generate.append(run_streams(client, streams, memory, config.max_tokens, expected))
        if config.soak_seconds > 0:
            report.soak = soak(client, config, memory, expected)
    finally:
        server.stop(5)
    if config.ray_shards:
        report.ray = bench_ray(config, text, lm)
    save_report(asdict(report), Path(config.out_dir) / "serve", {"": partial(plot, report)}, indent=2, quiet=True)
    print_table(report)
    return report


def print_table(report: Report) -> None:
    print(f"\ningest, {report.ingest_tokens} tokens:")
    print(f"  in process {report.ingest_in_process_tps:8.0f} tokens/s")
    print(
        f"  gRPC       {report.ingest_grpc_tps:8.0f} tokens/s   ({report.ingest_ratio:.2f}x in process; target >= 0.9x)"
    )
    print("\nGenerate, concurrent streams (greedy, server concurrency "
          f"{report.config['server_concurrency']}, {report.config['max_tokens']} tokens each):")  # fmt: skip
    print(f"  {'streams':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'tokens/s':>9} {'errors':>6} {'wrong':>6}")
    for level in report.generate:
        print(
            f"  {level.streams:>7} {level.ttft_p50_s:>8.2f}s {level.ttft_p99_s:>8.2f}s "
            f"{level.tokens_per_second:>9.1f} {level.errors:>6} {level.wrong_streams:>6}"
        )
    if report.soak:
        s = report.soak
        print(
            f"\nsoak: {s['streams']} streams for {s['seconds']:.0f} s: {s['requests']} requests, "
            f"{s['tokens']} tokens, {s['errors']} errors, {s['wrong_streams']} streams with lost or wrong tokens"
        )
    if report.ray:
        r = report.ray
        print(
            f"\nRay, {r['shards']} shards vs one process "
            f"(startup {r['startup_s']:.0f} s, same tokens: {r['same_tokens']}):"
        )
        for name in ("single", "ray"):
            ingest, decode = r[name]["ingest_tps"], r[name]["decode_tps"]
            print(f"  {name:>6}: ingest {ingest:7.0f} tokens/s, decode {decode:6.1f} tokens/s")


def plot(report: Report, path: Path) -> None:
    with saved_figure(path, 1, 3, figsize=(14, 4), dpi=120) as (fig, axes):
        names, rates = ["in process", "gRPC"], [report.ingest_in_process_tps, report.ingest_grpc_tps]
        if report.ray:
            names += ["1 process (Ray run)", f"Ray {report.ray['shards']} shards"]
            rates += [report.ray["single"]["ingest_tps"], report.ray["ray"]["ingest_tps"]]
        axes[0].bar(names, rates, color=["tab:blue", "tab:orange", "tab:gray", "tab:green"][: len(names)])
        axes[0].set_ylabel("ingest tokens/s")
        axes[0].tick_params(axis="x", rotation=20)
        streams = [level.streams for level in report.generate]
        axes[1].plot(streams, [level.ttft_p50_s for level in report.generate], "o-", label="p50")
        axes[1].plot(streams, [level.ttft_p99_s for level in report.generate], "s--", label="p99")
        axes[1].set_xlabel("concurrent streams")
        axes[1].set_ylabel("time to first token (s)")
        axes[1].legend()
        axes[2].bar([str(s) for s in streams], [level.tokens_per_second for level in report.generate])
        axes[2].set_xlabel("concurrent streams")
        axes[2].set_ylabel("total generated tokens/s")
        fig.suptitle("memlm serve over loopback (embedded model, CPU)")
        fig.tight_layout()


def main(argv: list[str] | None = None) -> None:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(prog="memlm bench serve", description=__doc__.splitlines()[0])
    parser.add_argument("--document-tokens", type=int, default=defaults.document_tokens)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--soak-seconds", type=float, default=defaults.soak_seconds)
    parser.add_argument("--ray-shards", type=int, default=defaults.ray_shards)
    parser.add_argument("--out-dir", default=defaults.out_dir)
    args = parser.parse_args(argv)
    run(
        BenchConfig(
            document_tokens=args.document_tokens,
            max_tokens=args.max_tokens,
            soak_seconds=args.soak_seconds,
            ray_shards=args.ray_shards,
            out_dir=args.out_dir,
        )
    )


if __name__ == "__main__":
    main()
