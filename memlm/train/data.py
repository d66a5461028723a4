"""Training data: local text files packed into long documents, and generated tasks.

Evaluation never sees training data: every tenth packed document is held out, and generated
training tasks draw their seeds from TRAIN_SEED_BASE upwards, far from the seeds the
benchmarks use (below 10^9).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from memlm.tasks import handbook

TRAIN_SEED_BASE = 10**9
HELD_OUT_EVERY = 10


def text_files(directory: str | Path) -> list[Path]:
    files = sorted(p for p in Path(directory).rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
    if not files:
        raise ValueError(f"no .txt or .md files under {directory}")
    return files


def packed_documents(directory: str | Path, tokenizer, length: int, split: str = "train") -> Iterator[list[int]]:
    """Token streams of the files, concatenated (EOS between files) and cut into documents of
    `length` tokens, streamed: one file in memory at a time. `split` "train" or "eval"."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    buffer: list[int] = []
    index = 0
    eos = tokenizer.eos_token_id
    for path in text_files(directory):
        buffer += tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        buffer += [eos] if eos is not None else []
        while len(buffer) >= length:
            document, buffer = buffer[:length], buffer[length:]
            held_out = index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
            if held_out == (split == "eval"):
                yield document
            index += 1


def handbook_ids(tokenizer, length: int, seed: int) -> list[int]:
    """A generated handbook of `length` tokens (the generator's count is an estimate: ask for more)."""
    text, _ = handbook(int(length * 1.1), seed=seed)
    return tokenizer(text, add_special_tokens=False)["input_ids"][:length]


def generated_document(tokenizer, length: int, index: int) -> list[int]:
    """A generated handbook of `length` tokens for training example `index`."""
    return handbook_ids(tokenizer, length, TRAIN_SEED_BASE + index)
