"""`rmt` backend: the Recurrent Memory Transformer in its decoder form (Bulatov et al. 2022,
"Recurrent Memory Transformer"; 2023, "Scaling Transformer to 1M tokens and beyond with RMT").

A memory is `num_mem_tokens` vectors in the model's input-embedding space. Ingest runs every
segment, with plain causal attention, as

    [sink token ; memory (read) ; segment tokens ; memory (write)]

and the last hidden states at the write positions become the memory for the next segment:
the write tokens have seen the whole segment and the old memory, so they can carry forward
whatever later segments will need. A generation runs `[sink token ; memory ; prompt ;
generated tokens]`. The memory state, a (num_mem_tokens, hidden) tensor, is all that survives
a segment; it is saved under the memory's name, so `ingest` and `ask` can be separate calls
and processes.

One departure from the paper, which feeds the raw hidden states back and fine-tunes the whole
model: here each write position's hidden state goes through the LM head, and the memory
vector is the expected input embedding under that next-token distribution (a "soft token").
Raw last hidden states lie far from anything a frozen first layer has seen (SmolLM2: norm
~50 against ~3.2 for embeddings, and other directions): reading them raised the answer loss
of the embedded model from 3.7-7.6 to 9.7-18.7 after one segment, even rescaled to the
embeddings' norm. Soft tokens at temperature 1 blend many embeddings into a short vector
(loss 8-16); at WRITE_TEMPERATURE = 0.3 they stay near real tokens (loss 3.7-8.9, against
3.7-7.5 reading the untrained initial memory), so training (LoRA + memory tokens, base
frozen) starts from a model that still works.

The initial memory is a trained parameter (`memlm train rmt`, with LoRA on attention); with
the base model frozen and no training, the model has never learnt to write what later
segments need into the memory, and the backend is no better than the plain model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from memlm.memory.attention import Attended

WRITE_TEMPERATURE = 0.3  # of the soft tokens the memory is written as (measured above)


class RecurrentMemoryTokens(nn.Module):
    """The trained initial memory of the `rmt` backend."""

    name = "rmt"

    @classmethod
    def for_model(cls, model, num_mem_tokens: int) -> RecurrentMemoryTokens:
        """Memory tokens for a transformers model; its BOS (else EOS, what separates its
        documents) is the attention-sink token."""
        config = model.config
        sink = next((t for t in (config.bos_token_id, config.eos_token_id) if t is not None), 0)
        sink = sink[0] if isinstance(sink, list) else sink
        return cls(model.get_input_embeddings().weight, num_mem_tokens, sink)

    def __init__(self, embeddings: torch.Tensor, num_mem_tokens: int, sink_token_id: int, seed: int = 0):
        """`embeddings` (vocab, hidden): the model's input embeddings. The memory starts as
        random rows of it, so it has the scale the model's first layer expects.
        `sink_token_id`: a real token put before the memory at position 0, where the model
        parks attention it does not need (attention sink); a soft memory vector there
        derails it."""
        super().__init__()
        self.sink_token_id = sink_token_id
        rows = torch.randint(0, embeddings.shape[0], (num_mem_tokens,), generator=torch.Generator().manual_seed(seed))
        self.memory = nn.Parameter(embeddings[rows].detach().float().clone())  # (M, hidden)

    @staticmethod
    def written(model, hidden: torch.Tensor) -> torch.Tensor:
        """The next memory from the (M, hidden) last hidden states at the write positions:
        the expected input embedding under each position's next-token distribution."""
        probs = torch.softmax(model.lm_head(hidden).float() / WRITE_TEMPERATURE, dim=-1)  # (M, vocab)
        return probs @ model.get_input_embeddings().weight.float()  # (M, hidden)

    @property
    def num_mem_tokens(self) -> int:
        return self.memory.shape[0]

    def combine(self, layer: int, local: Attended, memory: Attended) -> torch.Tensor:
        raise RuntimeError("the rmt backend reads no vector memory")


class RecurrentSession:
    """One pass over an rmt memory. Writing (ingest): every `forward` is one segment and moves
    the memory state on. Reading (generation): the first `forward` is prefixed with the memory
    state, later ones continue from the key/value cache."""

    def __init__(self, rmt: RecurrentMemoryTokens, model, writes: bool, state: dict[str, np.ndarray] | None = None):
        self.rmt, self.model, self.writes = rmt, model, writes
        self.retrieved: dict = {}  # nothing is retrieved: kept for the engine's common interface
        if state is None:
            self.memory_state: torch.Tensor | None = None  # None: the trained initial memory
            self.token_ids: list[int] = []
        else:
            self.memory_state = torch.from_numpy(state["rmt_state"].astype(np.float32))
            self.token_ids = state["token_ids"].tolist()
        self._cache: DynamicCache | None = None
        self._next_position = 0

    @property
    def current_memory(self) -> torch.Tensor:
        """(M, hidden): what the next segment or prompt reads."""
        return self.rmt.memory if self.memory_state is None else self.memory_state

    @property
    def window_end(self) -> int:
        """Positions a generation has used before its prompt (the memory prefix)."""
        return 1 + self.rmt.num_mem_tokens if self._cache is None else self._next_position

    def positions_for(self, num_new: int) -> torch.Tensor:
        return torch.arange(self.window_end, self.window_end + num_new)

    def forward(self, token_ids: list[int], logits: str) -> torch.Tensor | None:
        """Run tokens (a segment when writing, a prompt or the next token when reading).
        `logits` "none", "last" or "all" as in `MemoryLM._forward`."""
        device, dtype = self.model.device, self.model.dtype
        embed = self.model.get_input_embeddings()
        tokens = embed(torch.tensor([token_ids], device=device))  # (1, T, hidden)
        memory = self.current_memory.to(device, dtype).unsqueeze(0)  # (1, M, hidden)
        sink = embed(torch.tensor([[self.rmt.sink_token_id]], device=device))  # (1, 1, hidden)
        if self.writes:
            inputs = torch.cat([sink, memory, tokens, memory], dim=1)  # (1, 1 + M + T + M, hidden)
            positions = torch.arange(inputs.shape[1], device=device).unsqueeze(0)
            hidden = self.model.model(inputs_embeds=inputs, position_ids=positions, use_cache=False).last_hidden_state
            self.memory_state = self.rmt.written(self.model, hidden[0, -memory.shape[1] :])  # the write positions, (M, hidden)
            self.token_ids.extend(token_ids)
            token_hidden = hidden[:, 1 + memory.shape[1] : -memory.shape[1]]
        else:
            if self._cache is None:
                inputs, self._cache, self._next_position = torch.cat([sink, memory, tokens], dim=1), DynamicCache(), 0
            else:
                inputs = tokens
            positions = torch.arange(self._next_position, self._next_position + inputs.shape[1], device=device)
            out = self.model.model(
                inputs_embeds=inputs, position_ids=positions.unsqueeze(0), past_key_values=self._cache, use_cache=True
            )
            self._next_position += inputs.shape[1]
            token_hidden = out.last_hidden_state[:, -len(token_ids) :]
        if logits == "none":
            return None
        if logits == "last":
            token_hidden = token_hidden[:, -1:]
        return self.model.lm_head(token_hidden)[0].float()

    def reader(self) -> RecurrentSession:
        """A reading session that continues from this one's memory, keeping its autograd graph
        (training: the loss on an answer reaches back through every segment)."""
        session = RecurrentSession(self.rmt, self.model, writes=False)
        session.memory_state, session.token_ids = self.memory_state, list(self.token_ids)
        return session

    def state(self) -> dict[str, np.ndarray]:
        return {
            "rmt_state": self.current_memory.detach().float().cpu().numpy(),
            "token_ids": np.array(self.token_ids, dtype=np.int32),
        }
