"""Integration tests on the embedded SmolLM2-135M-Instruct (slow: tens of seconds each)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from memlm.model.loading import embedded_model_dir
from memlm.tasks import passkey

pytestmark = pytest.mark.slow


def test_empty_memory_matches_the_stock_embedded_model(embedded_lm) -> None:
    text = "The committee met on Tuesday to discuss the budget, the new library and the bridge repairs. " * 4
    ids = embedded_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    stock = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = stock(torch.tensor([ids])).logits[0]
    got = embedded_lm.ingest_tokens(ids, "stock-check", progress=False, return_logits=True).logits
    embedded_lm.forget("stock-check")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_passkey_beyond_the_window_comes_from_memory(embedded_lm) -> None:
    """12k tokens, more than the model's 8,192-token window, with the key in the first half:
    only memory can supply it."""
    task = passkey(12_000, depth=0.25, seed=1234)
    ids = embedded_lm.tokenizer(task.document, add_special_tokens=False)["input_ids"]
    assert len(ids) > embedded_lm.max_positions
    embedded_lm.ingest(task.document, memory="passkey", progress=False)
    answer = embedded_lm.generate(task.prompt, memory="passkey", chat=False, max_new_tokens=8)
    embedded_lm.forget("passkey")
    assert task.answer in answer


def test_cli_ingest_then_ask_in_another_process(tmp_path) -> None:
    document = tmp_path / "notes.txt"
    task = passkey(3_000, depth=0.2, seed=99)
    document.write_text(task.document)
    env = {**os.environ, "MEMLM_HOME": os.environ["MEMLM_HOME"]}
    memlm = [sys.executable, "-m", "memlm.cli"]
    ingested = subprocess.run(
        [*memlm, "ingest", str(document), "--memory", "notes"], capture_output=True, text=True, env=env
    )
    assert ingested.returncode == 0, ingested.stderr
    assert "ingested" in ingested.stdout
    asked = subprocess.run(
        [*memlm, "ask", task.prompt, "--memory", "notes", "--no-chat", "--max-new-tokens", "8"],
        capture_output=True, text=True, env=env,
    )
    assert asked.returncode == 0, asked.stderr
    assert task.answer in asked.stdout
    unknown = subprocess.run([*memlm, "ask", "hi", "--memory", "nope"], capture_output=True, text=True, env=env)
    assert unknown.returncode == 1 and "known memories: notes" in unknown.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    refused = subprocess.run([*memlm, "ingest", str(empty), "--memory", "notes"], capture_output=True, text=True, env=env)
    assert refused.returncode == 1 and "empty" in refused.stderr
