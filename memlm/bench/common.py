"""What every benchmark shares: checking names against the known ones, and the header of a
report (the machine, the model and the settings the numbers were measured with)."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import asdict

import torch

from memlm.config import MemoryConfig

EMBEDDED_MODEL = "embedded SmolLM2-135M-Instruct"


def check_names(label: str, names: Iterable[str], known: Iterable[str]) -> None:
    """Raise ValueError naming the unknown ones and the known ones."""
    known = list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown {label} {unknown}; known: {', '.join(known)}")


def report_header(model: str | None) -> dict:
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "model": model or EMBEDDED_MODEL,
        "dtype": "bfloat16",
        "defaults": asdict(MemoryConfig()),
    }
