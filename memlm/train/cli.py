"""`memlm train ...`: fit memory layers and write an adapter file (memlm/train/adapter.py)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from memlm.train.loop import TrainConfig

train_app = typer.Typer(no_args_is_help=True, help="Train memory layers; writes a small adapter file.")

OutOpt = Annotated[Path, typer.Option(help="Adapter file to write.")]
StepsOpt = Annotated[int, typer.Option(help="Optimizer steps.")]
LrOpt = Annotated[float, typer.Option(help="Learning rate.")]
AccumulationOpt = Annotated[int, typer.Option(help="Examples per step.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of data and initialisation.")]
CheckpointOpt = Annotated[Optional[str], typer.Option(help="Training-state file: resumed from when it exists.")]
ModelOpt = Annotated[Optional[str], typer.Option(help="Local checkpoint directory (default: embedded model).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda.")]


def _provenance(seed: int, result) -> dict:
    return {"command": shlex.join(["memlm", *sys.argv[1:]]), "seed": seed, "losses": result.losses,
            "tokens": result.tokens, "seconds": result.seconds}


def _untrained(model: str | None, backend: str, device: str, **settings):
    """The model to train: an in-RAM store, bf16 where the hardware computes it (dtype
    "auto"), and no shipped adapter (training starts from the untrained backend)."""
    from memlm.engine import MemoryLM

    try:
        return MemoryLM.load(model=model, backend=backend, store="memory", dtype="auto", device=device,
                             default_adapter=False, **settings)  # fmt: skip
    except ValueError as error:  # a bad setting or model: say which, without a trace
        raise typer.BadParameter(str(error)) from None


def _fit(lm, params: dict, loss_fn, kind: str, out: Path, config: TrainConfig) -> None:
    """Train `params` alone (everything else frozen), then write them as an adapter of `kind`
    with the command and seed that made it."""
    from memlm.train.adapter import save_adapter
    from memlm.train.loop import train
    from memlm.train.methods import freeze_all_but

    freeze_all_but(lm, params)
    result = train(loss_fn, params, config)
    typer.echo(f"wrote {save_adapter(lm, out, kind, _provenance(config.seed, result))}")


@train_app.command("gate")
def gate(
    out: OutOpt = Path("adapters/knn-gates.safetensors"),
    steps: StepsOpt = 40,
    length: Annotated[int, typer.Option(help="Tokens per generated training document.")] = 3000,
    lr: LrOpt = 0.05,
    accumulation: AccumulationOpt = 2,
    seed: SeedOpt = 0,
    checkpoint: CheckpointOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Fit the knn backend's per-head gates with the base model frozen. Half of the examples
    need memory (the key is deep in the document) and half do not (it is in the window)."""
    from memlm.train.methods import gate_loss

    lm = _untrained(model, "knn", device)
    with_memory, without = gate_loss(lm, length, True, seed), gate_loss(lm, length, False, seed)
    loss_fn = lambda index: (with_memory if index % 2 == 0 else without)(index)  # noqa: E731
    config = TrainConfig(steps=steps, lr=lr, accumulation=accumulation, seed=seed, checkpoint=checkpoint)
    _fit(lm, {"gate_bias": lm.backend.gate_bias}, loss_fn, "knn-gates", out, config)


@train_app.command("fot")
def fot(
    out: OutOpt = Path("adapters/fot-lora.safetensors"),
    data: Annotated[Optional[Path], typer.Option(help="Directory of .txt/.md files (default: generated handbooks).")] = None,
    steps: StepsOpt = 100,
    context_len: Annotated[int, typer.Option(help="Tokens of previous context that go to memory.")] = 2048,
    target_len: Annotated[int, typer.Option(help="Tokens predicted after the context.")] = 512,
    max_docs: Annotated[int, typer.Option(help="Documents per crossbatch at the end of the schedule (d).")] = 4,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lr: LrOpt = 2e-4,
    accumulation: AccumulationOpt = 1,
    seed: SeedOpt = 0,
    checkpoint: CheckpointOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Focused Transformer crossbatch training of LoRA adapters on the memory layers."""
    import itertools

    from memlm.train.adapter import add_lora
    from memlm.train.data import generated_document, packed_documents
    from memlm.train.methods import crossbatch_loss

    lm = _untrained(model, "fot", device)
    length = context_len + target_len
    if data is None:
        document = lambda index: generated_document(lm.tokenizer, length, index)  # noqa: E731
    else:
        cached = list(itertools.islice(packed_documents(data, lm.tokenizer, length), steps * accumulation * max_docs))
        if not cached:
            raise typer.BadParameter(f"no document of {length} tokens in {data}")
        document = lambda index: cached[index % len(cached)]  # noqa: E731
    params = add_lora(lm, rank=rank, alpha=2.0 * rank)
    loss_fn = crossbatch_loss(lm, document, context_len, steps * accumulation, max_docs)
    config = TrainConfig(steps=steps, lr=lr, accumulation=accumulation, seed=seed, checkpoint=checkpoint)
    _fit(lm, params, loss_fn, "fot-lora", out, config)


@train_app.command("rmt")
def rmt(
    out: OutOpt = Path("adapters/rmt.safetensors"),
    steps: StepsOpt = 300,
    segment_len: Annotated[int, typer.Option(help="Tokens per segment (use the same when reading).")] = 1024,
    num_mem_tokens: Annotated[int, typer.Option(help="Tokens of notes carried between segments.")] = 64,
    max_segments: Annotated[int, typer.Option(help="Document segments at the end of the curriculum.")] = 3,
    bptt: Annotated[int, typer.Option(help="Segments that gradients flow back through (truncated BPTT).")] = 3,
    rank: Annotated[int, typer.Option(help="LoRA rank on every layer's attention (0: memory tokens only).")] = 8,
    lr: LrOpt = 1e-3,
    accumulation: AccumulationOpt = 1,
    seed: SeedOpt = 0,
    checkpoint: CheckpointOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Recurrent Memory Transformer: train the write prompt (and LoRA) to write each
    segment's facts as notes and to answer from them, by backpropagation through time on
    generated passkey and BABILong-style documents; the number of segments grows from 1 to
    max_segments over the run."""
    from memlm.train.adapter import add_lora
    from memlm.train.methods import recurrent_loss

    lm = _untrained(model, "rmt", device, segment_len=segment_len, num_mem_tokens=num_mem_tokens)
    params = dict(lm.backend.named_parameters())  # the write prompt
    if rank > 0:
        params |= add_lora(lm, rank=rank, alpha=2.0 * rank, layers=list(range(lm.shape.num_layers)))
    loss_fn = recurrent_loss(lm, steps * accumulation, max_segments, bptt, seed)
    config = TrainConfig(steps=steps, lr=lr, accumulation=accumulation, seed=seed, checkpoint=checkpoint)
    _fit(lm, params, loss_fn, "rmt", out, config)
