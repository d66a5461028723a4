"""Training: crossbatch mixes documents, losses fall, gates move the right way, resume is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyTokenizer, tiny_lm

from memlm.engine import MemoryLM
from memlm.store import FaissStore
from memlm.tasks import Task, babilong
from memlm.model.adapter import load_adapter
from memlm.train.adapter import add_lora, save_adapter
from memlm.train.loop import TrainConfig, train
from memlm.train.methods import (
    crossbatch_loss,
    crossbatch_size,
    curriculum_segments,
    freeze_all_but,
    gate_loss,
    recurrent_loss,
    segment_notes,
)

SMALL = dict(segment_len=16, sink_len=4, local_len=16, block_len=4, top_k=4)


def copy_document(index: int) -> list[int]:
    """A random context, then the same tokens again: predicting the copy needs memory."""
    context = torch.randint(0, 120, (64,), generator=torch.Generator().manual_seed(index)).tolist()
    return context + context[:24]


def sharp_tiny_lm():
    lm = tiny_lm(**SMALL)
    # A random tiny model's logits are nearly flat (its head is initialised at std 0.02), so
    # that nothing it learns shows in the loss; a sharper head gives learning a visible signal.
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(20)
    return lm


def lora_lm(seed: int = 0):
    lm = sharp_tiny_lm()
    torch.manual_seed(seed)
    params = add_lora(lm, rank=4, alpha=8.0)
    freeze_all_but(lm, params)
    return lm, params


def test_crossbatch_reads_the_other_documents_of_the_batch() -> None:
    lm, _ = lora_lm()
    searched: list[str] = []
    search = lm.store.search
    lm.store.search = lambda memory, *args: searched.append(memory) or search(memory, *args)
    loss_fn = crossbatch_loss(lm, copy_document, context_len=64, total_examples=3, max_docs=3)
    loss_fn(2)  # the last stage of the schedule: 3 documents per batch
    assert set(searched) == {"crossbatch-0", "crossbatch-1", "crossbatch-2"}
    # Each document's memory layers searched every document's memory, not only its own.
    per_doc = len(searched) // 3
    assert all(set(searched[i * per_doc : (i + 1) * per_doc]) == set(searched) for i in range(3))
    assert [crossbatch_size(i, 8, 4) for i in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert lm.store.memories() == [], "training memories are removed"


def test_crossbatch_training_lowers_the_loss() -> None:
    """On a small fixed set of documents the loop must fit: the loss falls."""
    lm, params = lora_lm()
    loss_fn = crossbatch_loss(lm, lambda i: copy_document(i % 2), context_len=64, total_examples=12, max_docs=2)
    result = train(loss_fn, params, TrainConfig(steps=12, lr=1e-2, progress=False))
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 1.0


def test_resume_after_interruption_matches_the_uninterrupted_run(tmp_path) -> None:
    lm, params = lora_lm()
    loss_fn = crossbatch_loss(lm, copy_document, context_len=64, total_examples=6, max_docs=2)
    train(loss_fn, params, TrainConfig(steps=6, lr=1e-2, progress=False))
    uninterrupted = {k: v.detach().clone() for k, v in params.items()}

    lm, params = lora_lm()
    loss_fn = crossbatch_loss(lm, copy_document, context_len=64, total_examples=6, max_docs=2)

    def killed_at_step_3(index: int):
        if index == 3:
            raise KeyboardInterrupt("killed")
        return loss_fn(index)

    config = TrainConfig(steps=6, lr=1e-2, progress=False, checkpoint=str(tmp_path / "state.pt"), save_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(killed_at_step_3, params, config)
    lm, params = lora_lm()  # a new process: fresh weights, everything else from the checkpoint
    loss_fn = crossbatch_loss(lm, copy_document, context_len=64, total_examples=6, max_docs=2)
    resumed = train(loss_fn, params, config)
    assert len(resumed.losses) == 6
    for name, value in params.items():
        torch.testing.assert_close(value.detach(), uninterrupted[name], rtol=1e-5, atol=1e-6)


def test_lora_adapter_round_trips(tmp_path) -> None:
    lm, params = lora_lm()
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01)
    ids = list(range(10, 90))
    expected = lm.ingest_tokens(ids, "a", progress=False, return_logits=True).logits
    path = save_adapter(lm, tmp_path / "fot.safetensors", "fot-lora", {"command": "test"})
    fresh = sharp_tiny_lm()
    assert load_adapter(fresh, path) == "fot-lora"
    torch.testing.assert_close(fresh.ingest_tokens(ids, "a", progress=False, return_logits=True).logits, expected)


def rmt_lm(seed: int = 0):
    lm = tiny_lm(backend="rmt", segment_len=64, num_mem_tokens=4)
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(20)
    torch.manual_seed(seed)
    params = {**dict(lm.backend.named_parameters()), **add_lora(lm, rank=4, alpha=8.0, layers=[0, 1, 2])}
    freeze_all_but(lm, params)
    return lm, params


def test_rmt_write_targets_are_the_facts_of_each_segment() -> None:
    """Each fact is a target of the segment holding its last token, in document order; a
    fact-free segment's target is empty (the write should only end)."""
    first, second, third = "Mary went to the garden.", "The pass key is 12345.", "Bill took the milk."
    filler = "x" * 20
    document = f"{filler}{first}{filler}{filler}{second} {third}{filler}"  # one token per character
    task = Task(document, "q", "a", facts=(third, first, second, "Not in the document."))
    tokenize = lambda text: TinyTokenizer()(text)["input_ids"]  # noqa: E731
    ids, notes = segment_notes(TinyTokenizer(), task, segment_len=32)
    assert ids == tokenize(document)
    assert notes == [[], tokenize(f" {first}"), [], tokenize(f" {second} {third}"), []]


def test_rmt_training_lowers_the_loss() -> None:
    """Backpropagation through time on two fixed documents: the loop must fit them."""
    lm, params = rmt_lm()
    loss_fn = recurrent_loss(lm, total_examples=10, max_segments=2, bptt=2, seed=0)
    result = train(lambda index: loss_fn(index % 2), params, TrainConfig(steps=10, lr=1e-2, progress=False))
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 1.0
    assert [curriculum_segments(i, 8, 4) for i in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_rmt_adapter_round_trips(tmp_path) -> None:
    lm, params = rmt_lm()
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01)
    ids = list(range(10, 90))
    lm.ingest_tokens(ids, "a", progress=False)
    expected = lm.generate("question", memory="a", max_new_tokens=5, chat=False)
    path = save_adapter(lm, tmp_path / "rmt.safetensors", "rmt", {"command": "test"})
    fresh = tiny_lm(backend="rmt", segment_len=64, num_mem_tokens=4)
    with torch.no_grad():
        fresh.model.lm_head.weight.mul_(20)
    assert load_adapter(fresh, path) == "rmt"
    fresh.ingest_tokens(ids, "a", progress=False)
    assert fresh.generate("question", memory="a", max_new_tokens=5, chat=False) == expected
    with pytest.raises(ValueError, match="num_mem_tokens"):
        load_adapter(tiny_lm(backend="rmt", segment_len=64, num_mem_tokens=5), path)


@pytest.mark.slow
def test_gate_training_moves_gates_toward_memory_only_when_memory_is_needed() -> None:
    def trained_gates(needs_memory: bool) -> float:
        lm = MemoryLM.load(
            backend="knn", store=FaissStore(None), segment_len=256, local_len=128, sink_len=16, gate_init=-1.0,
            default_adapter=False,
        )
        gates = {"gate_bias": lm.backend.gate_bias}
        freeze_all_but(lm, gates)
        train(gate_loss(lm, 1200, needs_memory, seed=0), gates, TrainConfig(steps=4, lr=0.1, progress=False))
        return lm.backend.gate_bias.mean().item()

    assert trained_gates(needs_memory=True) > -1.0 > trained_gates(needs_memory=False)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_shipped_rmt_notes_the_facts_and_answers_from_its_notes(seed: int) -> None:
    """The shipped rmt adapter on held-out BABILong documents of three segments (seeds below
    the training seeds): its notes are exactly the document's facts, and it answers from them."""
    lm = MemoryLM.load(backend="rmt", store=FaissStore(None))
    (task,) = babilong(3000, [0.3], seed=seed)
    lm.ingest(task.document, "doc", progress=False)
    assert lm.tokenizer.decode(lm.store.load_state("doc")["rmt_notes"]) == " " + " ".join(task.facts)
    assert task.answer in lm.generate(task.prompt, memory="doc", max_new_tokens=4, chat=False)


@pytest.mark.slow
def test_shipped_adapters_apply_by_default_to_the_embedded_model() -> None:
    from safetensors.torch import load_file

    from memlm.model.adapter import SHIPPED, shipped_adapter

    assert set(SHIPPED) <= {"fot", "knn", "rmt"} and all(shipped_adapter(b) is not None for b in SHIPPED)
    trained = load_file(str(shipped_adapter("knn")))["gate_bias"]
    lm = MemoryLM.load(backend="knn", store=FaissStore(None))
    torch.testing.assert_close(lm.backend.gate_bias.detach(), trained)
    untrained = MemoryLM.load(backend="knn", store=FaissStore(None), default_adapter=False)
    assert bool((untrained.backend.gate_bias == 0).all())
