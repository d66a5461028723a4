"""`rmt` backend: the Recurrent Memory Transformer in its decoder form (Bulatov et al. 2022,
"Recurrent Memory Transformer"; 2023, "Scaling Transformer to 1M tokens and beyond with RMT"),
with a memory made of notes: up to `num_mem_tokens` tokens the model writes itself.

Ingest runs every segment, with plain causal attention, as

    [sink token ; memory (read) ; segment tokens ; write prompt -> new notes]

where the write prompt is a few trained embeddings (the "memory tokens" training fits), and
the model then writes, token by token, what the segment adds to its notes (usually nothing:
the end token). The new notes join the memory, which keeps its last `num_mem_tokens` tokens.
A generation runs `[sink token ; memory ; prompt ; generated tokens]`. The memory is all that
survives a segment; it is saved under the memory's name (token ids), so `ingest` and `ask`
can be separate calls and processes.

Departures from the paper, which feeds the write positions' raw hidden states back as the
next memory and fine-tunes the whole model: here the base model stays frozen (LoRA on
attention), and a frozen model reads its own tokens as text, but neither raw hidden states
nor memory vectors trained by backpropagation through time alone (the measurements are in
the README, Backends). So the memory is written autoregressively as tokens, trained with
the generator's facts as targets (teacher forcing) plus the answer's loss through the
memory: in training the notes a later segment reads are the target tokens' embeddings with
the gradient of the write's soft token (straight-through), so the answer's loss still flows
back through every segment's write (truncated backpropagation through time).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from memlm.config import RMT_WRITE_PROMPT_LEN
from memlm.memory.base import Logits, Retrieval, logits_of

WRITE_TEMPERATURE = 0.3  # of the soft tokens that carry the gradient through the notes in training


def _first_id(value) -> int | None:
    return value[0] if isinstance(value, list) else value


class RecurrentMemoryTokens(nn.Module):
    """The trained write prompt of the `rmt` backend, and its token settings."""

    name = "rmt"

    @classmethod
    def for_model(cls, model, num_mem_tokens: int) -> RecurrentMemoryTokens:
        """Memory for a transformers model; its BOS (else EOS, what separates its documents)
        is the attention-sink token, its EOS ends a write."""
        config = model.config
        bos, eos = _first_id(config.bos_token_id), _first_id(config.eos_token_id)
        sink = next((t for t in (bos, eos) if t is not None), 0)
        end = eos if eos is not None else sink
        return cls(model.get_input_embeddings().weight, num_mem_tokens, sink, end)

    def __init__(self, embeddings: torch.Tensor, num_mem_tokens: int, sink_token_id: int, end_token_id: int,
                 seed: int = 0):  # fmt: skip
        """`embeddings` (vocab, hidden): the model's input embeddings; the write prompt starts
        as random rows of it, so it has the scale the first layer expects.
        `sink_token_id`: a real token at position 0, where the model parks attention it does
        not need (attention sink). `end_token_id`: what a write emits when it has no more to note."""
        super().__init__()
        self.num_mem_tokens, self.sink_token_id, self.end_token_id = num_mem_tokens, sink_token_id, end_token_id
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, embeddings.shape[0], (RMT_WRITE_PROMPT_LEN,), generator=generator)
        self.write_prompt = nn.Parameter(embeddings[rows].detach().float().clone())  # (P, hidden)


class RecurrentSession:
    """One pass over an rmt memory (the `Session` contract of memlm/memory/base.py). Writing
    (ingest): every `forward` is one segment and adds its notes to the memory. Reading
    (generation): the first `forward` is prefixed with the memory, later ones continue from
    the key/value cache. `learn` is a training write."""

    # The notes are read as a prefix: nothing is searched or retrieved from a vector store.
    has_memory = False

    def __init__(self, rmt: RecurrentMemoryTokens, model, writes: bool, state: dict[str, np.ndarray] | None = None):
        self.rmt, self.model, self.writes = rmt, model, writes
        self.retrieved: dict[int, Retrieval] = {}
        self.notes: list[int] = [] if state is None else state["rmt_notes"].tolist()
        self.token_ids: list[int] = [] if state is None else state["token_ids"].tolist()
        # Training only: the notes' embeddings with a gradient path to the writes that made them.
        self._note_vectors: torch.Tensor | None = None
        self._cache: DynamicCache | None = None
        self._next_position = 0

    def _embed(self, token_ids: list[int]) -> torch.Tensor:
        embed = self.model.get_input_embeddings()
        return embed(torch.tensor(token_ids, dtype=torch.long, device=self.model.device))  # (T, hidden)

    def memory(self) -> torch.Tensor:
        """(1 + N, hidden): the sink token and the N <= num_mem_tokens notes a segment or prompt reads."""
        notes = self._note_vectors if self._note_vectors is not None else self._embed(self.notes)
        return torch.cat([self._embed([self.rmt.sink_token_id]), notes.to(self.model.dtype)])

    @property
    def window_end(self) -> int:
        """Positions a generation has used before its prompt (the memory prefix)."""
        return 1 + len(self.notes) if self._cache is None else self._next_position

    def in_view(self) -> list[tuple[int, int]]:
        return []  # no document token stays in view: only the notes

    def _run(self, inputs: torch.Tensor, start: int, cache: DynamicCache | None = None) -> torch.Tensor:
        """Last hidden states (T, hidden) of input embeddings (T, hidden) at positions start.."""
        positions = torch.arange(start, start + inputs.shape[0], device=self.model.device).unsqueeze(0)
        out = self.model.model(inputs_embeds=inputs.unsqueeze(0), position_ids=positions, past_key_values=cache,
                               use_cache=cache is not None)  # fmt: skip
        return out.last_hidden_state[0]

    def forward(self, token_ids: list[int], logits: Logits) -> torch.Tensor | None:
        """Run tokens (a segment when writing, a prompt or the next token when reading);
        the logits are of `token_ids` only."""
        if self.writes:
            return self._write(token_ids, logits)
        if self._cache is None:  # the first call reads the memory, then the cache holds it
            self._cache = DynamicCache()
            inputs = torch.cat([self.memory(), self._embed(token_ids)])
        else:
            inputs = self._embed(token_ids)
        hidden = self._run(inputs, self._next_position, self._cache)
        self._next_position += inputs.shape[0]
        return logits_of(self.model, hidden[-len(token_ids) :], logits)

    def _write(self, token_ids: list[int], logits: Logits) -> torch.Tensor | None:
        """One ingest segment: read, then write notes greedily until the end token."""
        memory = self.memory()
        prefix = torch.cat([memory, self._embed(token_ids), self.rmt.write_prompt.to(memory.dtype)])
        cache = DynamicCache()
        hidden = self._run(prefix, 0, cache)
        token_hidden = hidden[memory.shape[0] : memory.shape[0] + len(token_ids)]
        new_notes: list[int] = []
        last, position = hidden[-1:], prefix.shape[0]
        while len(new_notes) < self.rmt.num_mem_tokens:
            next_id = int(self.model.lm_head(last).argmax(-1))
            if next_id == self.rmt.end_token_id:
                break
            new_notes.append(next_id)
            last = self._run(self._embed([next_id]), position, cache)
            position += 1
        self._keep(self.notes + new_notes, None)
        self.token_ids.extend(token_ids)
        return logits_of(self.model, token_hidden, logits)

    def learn(self, token_ids: list[int], notes: list[int]) -> torch.Tensor:
        """A training write: the segment, then `notes` (what it should add) teacher-forced.
        Returns the write's logits (len(notes) + 1, vocab) for the notes and the end token.
        The notes join the memory as their embeddings, carrying the gradient of each write
        position's soft token (straight-through), so later losses reach this write."""
        memory, hard = self.memory(), self._embed(notes)  # hard: the notes' embeddings, (len(notes), hidden)
        prefix = torch.cat([memory, self._embed(token_ids), self.rmt.write_prompt.to(memory.dtype), hard])
        hidden = self._run(prefix, 0)
        write_logits = self.model.lm_head(hidden[-len(notes) - 1 :]).float()  # (len(notes) + 1, vocab)
        embeddings = self.model.get_input_embeddings().weight.float()
        soft = torch.softmax(write_logits[:-1] / WRITE_TEMPERATURE, dim=-1) @ embeddings  # (len(notes), hidden)
        self._keep(self.notes + notes, torch.cat([memory[1:].float(), hard.float() + soft - soft.detach()]))
        self.token_ids.extend(token_ids)
        return write_logits

    def cut(self) -> None:
        """Stop gradients from flowing into the writes so far (truncated BPTT)."""
        if self._note_vectors is not None:
            self._note_vectors = self._note_vectors.detach()

    def _keep(self, notes: list[int], vectors: torch.Tensor | None) -> None:
        """The memory keeps its last num_mem_tokens notes."""
        self.notes = notes[-self.rmt.num_mem_tokens :]
        self._note_vectors = None if vectors is None else vectors[len(vectors) - len(self.notes) :]

    def reader(self) -> RecurrentSession:
        """A reading session that continues from this one's memory, keeping its autograd graph
        (training: the loss on an answer reaches back through every segment's write)."""
        session = RecurrentSession(self.rmt, self.model, writes=False)
        session.notes, session.token_ids = list(self.notes), list(self.token_ids)
        session._note_vectors = self._note_vectors
        return session

    def state(self) -> dict[str, np.ndarray]:
        return {
            "rmt_notes": np.array(self.notes, dtype=np.int32),
            "token_ids": np.array(self.token_ids, dtype=np.int32),
        }
