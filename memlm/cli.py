"""The `memlm` command line. Every command prints one clear line and exits 1 on bad input."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from memlm.extras import MissingExtra
from memlm.train.cli import train_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Language models with long-term, searchable memory.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: print a table, write JSON and a plot to benchmarks/results/.")
app.add_typer(bench_app, name="bench")
app.add_typer(train_app, name="train")
calibrate_app = typer.Typer(no_args_is_help=True, help="Measure a model's properties that reading memory relies on.")
app.add_typer(calibrate_app, name="calibrate")

ModelOpt = Annotated[Optional[str], typer.Option(help="Local checkpoint directory (default: embedded SmolLM2-135M).")]
ResumeOpt = Annotated[
    Optional[list[Path]],
    typer.Option(help="An earlier report (.json) or an interrupted run's <name>.trials.jsonl: documents "
                 "answered there are not run again (repeatable; later ones win)."),
]
BackendOpt = Annotated[str, typer.Option(help="Memory backend: fot, knn, xl or rmt (README, Backends).")]
StoreOpt = Annotated[
    Optional[str], typer.Option(help="Store URL: faiss, faiss:///dir, lance:///dir, grpc://host:port (env MEMLM_STORE).")
]
MemoryOpt = Annotated[str, typer.Option("--memory", "-m", help="Name of the memory.")]
EmbedderOpt = Annotated[
    Optional[str],
    typer.Option(help="Dense index embedder: all-MiniLM-L6-v2 (default), a sentence-transformers directory, or none."),
]
TopKOpt = Annotated[Optional[int], typer.Option(help="Memory blocks retrieved per head and query chunk.")]
# What every benchmark takes: where its report goes, its file name stem, the documents' seed.
OutDirOpt = Annotated[Path, typer.Option(help="Where to write JSON and PNG.")]
NameOpt = Annotated[str, typer.Option(help="File name stem of the results.")]
DocSeedOpt = Annotated[int, typer.Option(help="Seed of the generated documents.")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _names(value: str, known) -> list[str]:
    """A comma-separated option, "all" meaning every known name."""
    return list(known) if value == "all" else value.split(",")


def _lengths(value: str) -> list[int]:
    """Comma-separated document lengths in tokens."""
    return [int(n) for n in value.split(",")]


def _run_bench(run, config) -> None:
    """Run a benchmark; a bad setting or an unreadable file is a one-line error, not a trace."""
    try:
        run(config)
    except (ValueError, OSError) as error:
        _fail(str(error))


def _load(model: str | None, backend: str, store: str | None, embedder: str | None = None, **settings):
    from memlm.engine import MemoryLM
    from memlm.store.settings import StoreSettings

    overrides = {name: value for name, value in settings.items() if value is not None}
    overrides.update(embedder_setting(embedder))
    return MemoryLM.load(model=model, backend=backend, store=StoreSettings.resolve(url=store).url, **overrides)


def embedder_setting(embedder: str | None) -> dict:
    """`--embedder` as MemoryConfig settings: left out, the default; "none", no dense index."""
    if embedder is None:
        return {}
    return {"embedder": None if embedder.lower() == "none" else embedder}


@app.command()
def ingest(
    file: Annotated[Path, typer.Argument(help="Text file to read into memory ('-' for standard input).")],
    memory: MemoryOpt,
    model: ModelOpt = None,
    backend: BackendOpt = "fot",
    store: StoreOpt = None,
    top_k: TopKOpt = None,
    embedder: EmbedderOpt = None,
) -> None:
    """Read a document into a named memory (appends when the memory exists)."""
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        _fail(f"cannot read {file}: {error}")
    try:
        stats = _load(model, backend, store, embedder, top_k=top_k).ingest(text, memory=memory)
    except (ValueError, KeyError) as error:
        _fail(str(error))
    typer.echo(
        f"ingested {stats.tokens} tokens in {stats.segments} segments into {stats.memory!r} "
        f"({stats.seconds:.1f} s, {stats.tokens_per_second:.0f} tokens/s; memory holds {stats.memory_tokens} tokens)"
    )


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    memory: MemoryOpt,
    model: ModelOpt = None,
    backend: BackendOpt = "fot",
    store: StoreOpt = None,
    top_k: TopKOpt = None,
    embedder: EmbedderOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    chat: Annotated[bool, typer.Option(help="Wrap the question in the model's chat template.")] = True,
    server: Annotated[Optional[str], typer.Option(help="Ask a running `memlm serve` at host:port instead.")] = None,
) -> None:
    """Answer a question from a memory, streaming the answer."""
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, chat=chat)
    try:
        if server is not None:
            from memlm.serve.client import MemoryClient

            pieces = (piece.text for piece in MemoryClient(server).generate(question, memory=memory, **options))
        else:
            lm = _load(model, backend, store, embedder, top_k=top_k)
            pieces = (p.text for p in lm.stream(question, memory, **options))
        for text in pieces:
            typer.echo(text, nl=False)
        typer.echo()
    except (ValueError, KeyError) as error:
        _fail(str(error))


@app.command()
def memories(store: StoreOpt = None) -> None:
    """List the memories in the store."""
    from memlm.store import open_store
    from memlm.store.settings import StoreSettings

    for name in open_store(StoreSettings.resolve(url=store).url).memories():
        typer.echo(name)


@app.command()
def forget(memory: Annotated[str, typer.Argument(help="Memory to delete.")], store: StoreOpt = None) -> None:
    """Delete a memory."""
    from memlm.store import open_store
    from memlm.store.settings import StoreSettings

    try:
        open_store(StoreSettings.resolve(url=store).url).delete(memory)
    except KeyError as error:
        _fail(str(error))
    typer.echo(f"deleted {memory!r}")


@app.command()
def demo(
    tokens: Annotated[int, typer.Option(help="Length of the generated handbook in tokens.")] = 50_000,
    file: Annotated[Optional[Path], typer.Option(help="Ask about this document instead (.txt, .md, .html, .pdf).")] = None,
    question: Annotated[Optional[list[str]], typer.Option(help="Your own question (repeatable).")] = None,
    backend: BackendOpt = "fot",
    model: ModelOpt = None,
    quick: Annotated[bool, typer.Option(help="A short document (tests, a first look).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the generated handbook.")] = 0,
    server: Annotated[
        Optional[str], typer.Option(help="Use a running `memlm serve` at host:port (its model and backend).")
    ] = None,
) -> None:
    """Document QA: ingest a long document, answer questions from memory, show where answers came from."""
    from memlm.demo import run_demo

    try:
        run_demo(tokens=tokens, file=file, questions=question, backend=backend, model=model, seed=seed, quick=quick,
                 server=server)  # fmt: skip
    except (ValueError, KeyError, OSError) as error:
        _fail(str(error))


@calibrate_app.command("heads")
def calibrate_heads(
    model: ModelOpt = None,
    out: Annotated[Path, typer.Option(help="Where to write the profile (JSON).")] = Path("heads.json"),
    documents: Annotated[int, typer.Option(help="Generated documents to ask about.")] = 4,
    length: Annotated[int, typer.Option(help="Tokens per document.")] = 8_000,
    questions: Annotated[int, typer.Option(help="Questions per document.")] = 6,
    keep: Annotated[int, typer.Option(help="Heads kept in the profile.")] = 24,
) -> None:
    """Find the retrieval heads: which (layer, head) pairs find the evidence for a question.
    Use the profile with `--heads FILE` (ask, serve, bench); the embedded model's is shipped."""
    from memlm.calibrate import CalibrationConfig, run

    try:
        run(CalibrationConfig(documents, length, questions, keep=keep, out=out), model)
    except ValueError as error:
        _fail(str(error))


@app.command("store-serve")
def store_serve(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 50052,
    data: Annotated[Optional[str], typer.Option(help="Data folder, or lance:///dir (default $MEMLM_HOME/memories).")] = None,
    token: Annotated[Optional[str], typer.Option(help="Bearer token clients must send (env MEMLM_TOKEN).")] = None,
    tls_cert: Annotated[Optional[str], typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Optional[str], typer.Option(help="TLS private key (PEM).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "[::]",
) -> None:
    """Serve the MemoryStore gRPC service."""
    from memlm.serve.store_server import StoreServerConfig, run

    run(StoreServerConfig(port=port, data=data, token=token, tls_cert=tls_cert, tls_key=tls_key, host=host))


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 50051,
    model: ModelOpt = None,
    backend: BackendOpt = "fot",
    store: StoreOpt = None,
    top_k: TopKOpt = None,
    embedder: EmbedderOpt = None,
    dtype: Annotated[
        str, typer.Option(help="Model weights: auto (bfloat16 where the hardware has it, else float32), bfloat16, float32, float16.")
    ] = "auto",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    token: Annotated[Optional[str], typer.Option(help="Bearer token clients must send (env MEMLM_TOKEN).")] = None,
    tls_cert: Annotated[Optional[str], typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Optional[str], typer.Option(help="TLS private key (PEM).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "[::]",
    metrics_port: Annotated[Optional[int], typer.Option(help="Serve Prometheus /metrics on this port.")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests computing at once.")] = 4,
    queue_size: Annotated[int, typer.Option(help="Requests waiting; more get RESOURCE_EXHAUSTED.")] = 32,
    ray: Annotated[bool, typer.Option("--ray", help="Run the model's layers in Ray actors.")] = False,
    shards: Annotated[int, typer.Option(help="With --ray: actors, each a block of layers.")] = 1,
    replicas: Annotated[int, typer.Option(help="With --ray: pipelines serving in parallel.")] = 1,
    ray_address: Annotated[Optional[str], typer.Option(help="With --ray: join this cluster (default: start one).")] = None,
) -> None:
    """Serve the MemoryLM gRPC service (Ingest, Generate, ListMemories, DeleteMemory)."""
    from memlm.serve.model_server import ModelServerConfig, run

    settings = {**({"top_k": top_k} if top_k is not None else {}), **embedder_setting(embedder)}
    config = ModelServerConfig(
        port=port, model=model, backend=backend, store=store, dtype=dtype, device=device, settings=settings,
        token=token, tls_cert=tls_cert, tls_key=tls_key, host=host, metrics_port=metrics_port,
        concurrency=concurrency, queue_size=queue_size, ray=ray, shards=shards, replicas=replicas,
        ray_address=ray_address,
    )  # fmt: skip
    try:
        run(config)
    except (ValueError, KeyError, OSError) as error:
        _fail(str(error))


@bench_app.command("passkey")
def bench_passkey(
    lengths: Annotated[str, typer.Option(help="Comma-separated document lengths in tokens.")] = "4000,16000,32000",
    trials: Annotated[int, typer.Option(help="Trials per length and configuration.")] = 20,
    configs: Annotated[str, typer.Option(help="Comma-separated configurations (see memlm/bench/passkey.py).")] = "all",
    model: ModelOpt = None,
    out: OutDirOpt = Path("benchmarks/results"),
    name: NameOpt = "passkey",
    throughput_length: Annotated[int, typer.Option(help="Document length for the speed measurements.")] = 32_000,
    haystack: Annotated[str, typer.Option(help="prose (the Vim manual) or filler (repeated sentences).")] = "prose",
    chat: Annotated[bool, typer.Option(help="Ask in the chat template (--no-chat: the raw prompt).")] = True,
) -> None:
    """Passkey retrieval, ingest throughput, decode latency and memory size."""
    from memlm.bench.passkey import run

    try:
        run(
            lengths=_lengths(lengths),
            trials=trials,
            configs=configs,
            model=model,
            out_dir=out,
            throughput_length=throughput_length,
            name=name,
            haystack=haystack,
            chat=chat,
        )
    except ValueError as error:
        _fail(str(error))


@bench_app.command("eval")
def bench_eval(
    lengths: Annotated[str, typer.Option(help="Comma-separated document lengths in tokens.")] = "4000,16000,32000",
    long: Annotated[bool, typer.Option("--long", help="Also run at 128,000 tokens.")] = False,
    window_length: Annotated[int, typer.Option(help="In-window reference length (whole document visible).")] = 2000,
    trials: Annotated[int, typer.Option(help="Documents per task, length and config (several questions each).")] = 5,
    tasks: Annotated[str, typer.Option(help="Comma-separated: prose-needles,passkey,kv-lines,multi-needle,babilong,"
                                            "docqa.")] = "all",
    configs: Annotated[str, typer.Option(help="Comma-separated: plain,fot,knn,xl,rmt,fot-reread,fot-passages,fot-hybrid,fot-attention,fot-bag,knn-bag.")] = (
        "plain,fot,knn,xl,rmt"
    ),
    model: ModelOpt = None,
    seed: DocSeedOpt = 0,
    chat: Annotated[bool, typer.Option(help="Ask in the chat template (--no-chat: raw continuation prompts).")] = True,
    out: OutDirOpt = Path("benchmarks/results"),
    name: NameOpt = "eval",
    resume: ResumeOpt = None,
) -> None:
    """Long-context tasks (passkey, key-value lines, multi-needle, BABILong-style facts, document QA):
    accuracy with 95% intervals and retention against the in-window accuracy, per backend."""
    from memlm.bench.eval import CONFIGS, LONG_LENGTH, EvalConfig, run
    from memlm.bench.families import FAMILIES

    config = EvalConfig(
        lengths=_lengths(lengths) + ([LONG_LENGTH] if long else []),
        window_length=window_length,
        trials=trials,
        families=_names(tasks, FAMILIES),
        configs=_names(configs, CONFIGS),
        model=model,
        seed=seed,
        chat=chat,
        out_dir=out,
        name=name,
        resume=resume or [],
    )
    _run_bench(run, config)


@bench_app.command("train")
def bench_train(
    lengths: Annotated[str, typer.Option(help="Comma-separated question-answering document lengths.")] = "16000,32000",
    trials: Annotated[int, typer.Option(help="Documents per task and length (several questions each).")] = 5,
    tasks: Annotated[str, typer.Option(help="Comma-separated: passkey,kv-lines,multi-needle,babilong,docqa.")] = (
        "passkey,babilong"
    ),
    docs: Annotated[int, typer.Option(help="Held-out documents for perplexity.")] = 8,
    doc_length: Annotated[int, typer.Option(help="Tokens per perplexity document.")] = 16_000,
    tail: Annotated[int, typer.Option(help="Perplexity of each document's last this many tokens.")] = 1024,
    data: Annotated[
        Optional[Path], typer.Option(help="Directory of .txt/.md files: perplexity on its held-out split.")
    ] = None,
    configs: Annotated[str, typer.Option(help="Comma-separated: fot,fot+lora,knn,knn+gates.")] = "all",
    fot_adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter of fot+lora (memlm train fot).")] = None,
    knn_adapter: Annotated[Optional[Path], typer.Option(help="Gates of knn+gates (memlm train gate).")] = None,
    model: ModelOpt = None,
    seed: DocSeedOpt = 0,
    out: OutDirOpt = Path("benchmarks/results"),
    name: NameOpt = "train",
) -> None:
    """Memory backends before and after training (fot, fot+lora, knn, knn+gates): perplexity of
    held-out long documents with and without memory, passkey and BABILong-style accuracy. A
    configuration whose adapter file is missing is skipped."""
    from memlm.bench.train import CONFIGS, TrainBenchConfig, run

    config = TrainBenchConfig(
        lengths=_lengths(lengths),
        trials=trials,
        families=tasks.split(","),
        docs=docs,
        doc_length=doc_length,
        tail=tail,
        data=data,
        configs=_names(configs, CONFIGS),
        model=model,
        seed=seed,
        out_dir=out,
        name=name,
    )
    # None: the dataclass's defaults, the adapters' paths in the package (memlm/adapters).
    config.fot_adapter = fot_adapter or config.fot_adapter
    config.knn_adapter = knn_adapter or config.knn_adapter
    _run_bench(run, config)


@bench_app.command("backends")
def bench_backends(
    lengths: Annotated[str, typer.Option(help="Comma-separated document lengths in tokens.")] = "4000,16000,32000",
    trials: Annotated[int, typer.Option(help="Documents per task, length and config.")] = 20,
    window_length: Annotated[int, typer.Option(help="In-window reference length (whole document visible).")] = 2000,
    configs: Annotated[str, typer.Option(help="Comma-separated: plain,fot,knn,xl,rmt.")] = "all",
    speed_length: Annotated[int, typer.Option(help="Document length for the speed measurements (0: none).")] = 16_000,
    model: ModelOpt = None,
    seed: DocSeedOpt = 0,
    out: OutDirOpt = Path("benchmarks/results"),
    name: NameOpt = "backends",
    resume: ResumeOpt = None,
) -> None:
    """Every memory backend next to the plain model: passkey and BABILong-style fact QA at
    each length, ingest and decode speed."""
    from memlm.bench.backends import CONFIGS, BackendsConfig, run

    config = BackendsConfig(
        lengths=_lengths(lengths),
        trials=trials,
        window_length=window_length,
        configs=_names(configs, CONFIGS),
        speed_length=speed_length,
        model=model,
        seed=seed,
        out_dir=out,
        name=name,
        resume=resume or [],
    )
    _run_bench(run, config)


@bench_app.command("realdoc")
def bench_realdoc(
    document: Annotated[
        str, typer.Option(help="vim (the Vim user manual) or python (the Python tutorial, ~63k tokens).")
    ] = "vim",
    chapters: Annotated[str, typer.Option(help="Vim user manual chapters, e.g. 1-10 (~53k tokens) or 1,2.")] = "1-10",
    file: Annotated[
        Optional[Path], typer.Option(help="Another text instead of the manual (.txt, .md, .html, .pdf).")
    ] = None,
    questions_file: Annotated[
        Optional[Path], typer.Option(help="JSON list of {question, answer, anchor, variants, distractors}.")
    ] = None,
    configs: Annotated[
        str, typer.Option(help="Comma-separated: plain,in-window,fot,knn,xl,rmt; fot-words: no dense index.")
    ] = "plain,in-window,fot,knn,rmt",
    model: ModelOpt = None,
    out: OutDirOpt = Path("benchmarks/results"),
    name: NameOpt = "realdoc",
) -> None:
    """Free-form QA on a real document (the Vim user manual of Debian's vim-runtime or the Python
    tutorial of python3.11-doc, fetched with apt when missing): the plain model, the model with
    only the answer's chapter, and each backend; literal and paraphrased questions apart."""
    from memlm.bench.realdoc import RealdocConfig, parse_chapters, run

    try:
        config = RealdocConfig(
            document=document,
            chapters=parse_chapters(chapters),
            file=file,
            questions_file=questions_file,
            configs=configs.split(","),
            model=model,
            out_dir=out,
            name=name,
        )
        run(config)
    except (ValueError, OSError) as error:
        _fail(str(error))


@bench_app.command("store")
def bench_store(
    sizes: Annotated[str, typer.Option(help="Comma-separated vector counts.")] = "10000,100000,1000000",
    out: OutDirOpt = Path("benchmarks/results"),
) -> None:
    """Vector store append and search: in-process FAISS, LanceDB, remote over loopback."""
    from memlm.bench.store import run

    run(sizes=tuple(int(n) for n in sizes.split(",")), out_dir=str(out))


@bench_app.command("serve")
def bench_serve(
    document_tokens: Annotated[int, typer.Option(help="Tokens of the ingested document.")] = 4096,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated per stream.")] = 32,
    soak_seconds: Annotated[float, typer.Option(help="Seconds of 16 concurrent streams in a loop (0: none).")] = 60.0,
    ray_shards: Annotated[int, typer.Option(help="Shards of the Ray comparison (0: skip it).")] = 2,
    out: OutDirOpt = Path("benchmarks/results"),
) -> None:
    """The gRPC model service over loopback: ingest, concurrent Generate streams, soak, Ray shards."""
    from memlm.bench.serve import BenchConfig, run

    run(BenchConfig(document_tokens=document_tokens, max_tokens=max_tokens, soak_seconds=soak_seconds,
                    ray_shards=ray_shards, out_dir=str(out)))  # fmt: skip


def main() -> None:
    """The `memlm` console script: the app, with a missing optional dependency (an extra such
    as ray or lance, which any command may reach) told in one line like any other error."""
    try:
        app()
    except MissingExtra as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
