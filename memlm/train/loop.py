"""One training loop for every memory training method: gradient accumulation, resumable
checkpoints, a progress bar with loss and tokens/s, deterministic under a seed.

A method supplies `loss(example_index) -> (loss, tokens)`; example `i` is generated from
`(seed, i)` alone, so a run resumed from a checkpoint sees exactly the examples the
uninterrupted run would have seen, and ends with the same parameters.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

LossFn = Callable[[int], tuple[torch.Tensor, int]]


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    lr: float = 1e-3
    accumulation: int = 1  # examples per optimizer step
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint: str | None = None  # training state file; resumed from when it exists
    save_every: int = 10  # steps between checkpoints
    progress: bool = True


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean loss per optimizer step
    tokens: int = 0
    seconds: float = 0.0


def train(loss_fn: LossFn, params: dict[str, torch.nn.Parameter], config: TrainConfig) -> TrainResult:
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    result, start = TrainResult(), 0
    if config.checkpoint and Path(config.checkpoint).exists():
        start, result = _load(config.checkpoint, params, optimizer)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train", disable=not config.progress)
    for step in bar:
        started, step_loss, step_tokens = time.perf_counter(), 0.0, 0
        for micro in range(config.accumulation):
            loss, tokens = loss_fn(step * config.accumulation + micro)
            (loss / config.accumulation).backward()
            step_loss += loss.item() / config.accumulation
            step_tokens += tokens
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        result.losses.append(step_loss)
        result.tokens += step_tokens
        result.seconds += elapsed
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{step_tokens / max(elapsed, 1e-9):.0f}")
        if config.checkpoint and ((step + 1) % config.save_every == 0 or step + 1 == config.steps):
            _save(config.checkpoint, step + 1, result, params, optimizer, config)
    return result


def _save(path: str, step: int, result: TrainResult, params, optimizer, config: TrainConfig) -> None:
    state = {
        "step": step,
        "result": asdict(result),
        "params": {name: p.detach().cpu() for name, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "config": json.dumps(asdict(config)),
    }
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous checkpoint whole


def _load(path: str, params, optimizer) -> tuple[int, TrainResult]:
    state = torch.load(path, weights_only=False)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], TrainResult(**state["result"])
