"""A `MemorySession` is one pass over one memory in the fot, knn and xl backends (the
`Session` contract of memlm/memory/base.py): an ingest (which writes) or a generation
(which only reads). It holds, per layer, the tokens in local attention (attention
sinks + the recent window), lays out their RoPE positions for each forward pass, and is what
the registered attention function calls for every layer.

Keys are kept *unrotated* (RoPE undone) with their document positions, in the local window
and in the store alike, and rotated to whatever position the layout gives them at read time:

    window mode:  [sinks 0..S-1] [memory: all at S] [local window S+1 ..] [new tokens ..]
    zero mode:    [sinks 0..S-1, memory: all at 0]  [local window S ..]   [new tokens ..]
    exact mode:   every key at its document position (exactness tests; drifts past the
                  model's context length)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from memlm.config import MemoryConfig
from memlm.memory.attention import Attended, attend, attend_chunks, chunk_query_sums, rotate
from memlm.memory.backends import MemoryBackend, VectorMemoryBackend
from memlm.memory.base import Logits, Retrieval, logits_of
from memlm.memory.reading import runs
from memlm.store.base import Blocks, VectorStore

NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class LayerWindow:
    """Local attention of one layer: sinks then the recent window, oldest first."""

    keys: torch.Tensor  # (Hkv, N, D) unrotated
    values: torch.Tensor  # (Hkv, N, D)
    # What this forward pass attends to before its own tokens, rotated for the current layout.
    cache_keys: torch.Tensor | None = None
    cache_values: torch.Tensor | None = None
    # This forward pass's own keys/values, as the attention module produced them.
    new_keys: torch.Tensor | None = None
    new_values: torch.Tensor | None = None


@dataclass
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    inv_freq: torch.Tensor  # (D/2,)
    dtype: torch.dtype
    device: torch.device


class MemorySession:
    def __init__(
        self,
        model,
        shape: ModelShape,
        config: MemoryConfig,
        backend: VectorMemoryBackend | MemoryBackend,  # xl: no memory layers, nothing to combine
        store: VectorStore,
        memory: str,
        writes: bool,
        state: dict[str, np.ndarray] | None = None,
    ):
        self.model, self.shape, self.config, self.backend, self.store = model, shape, config, backend, store
        self.memory, self.writes = memory, writes
        self.memory_layers = set(config.layer_indices(shape.num_layers))
        self.reads_memory = config.read_memory_in_ingest or not writes
        self.retrieved: dict[int, Retrieval] = {}
        # Probing a prompt for the passage read: where its question's tokens lie, and each
        # memory layer's queries there (Hkv, G, Tq, D); the memory is not read meanwhile.
        self.question: slice | None = None
        self.question_queries: dict[int, torch.Tensor] = {}
        heads, dim = shape.num_kv_heads, shape.head_dim
        if state is None:
            empty = torch.zeros(heads, 0, dim, dtype=shape.dtype, device=shape.device)
            self.windows = [LayerWindow(empty, empty) for _ in range(shape.num_layers)]
            self.positions = torch.zeros(0, dtype=torch.long)  # (N,) document positions of the window
            self.next_position = 0
            self.has_memory = False
            self.token_ids: list[int] = []
            self.dense_from = 0
        else:
            keys = torch.from_numpy(state["window_keys"].astype(np.float32)).to(shape.device, shape.dtype)  # (layers, Hkv, N, D)
            values = torch.from_numpy(state["window_values"].astype(np.float32)).to(shape.device, shape.dtype)
            self.windows = [LayerWindow(k, v) for k, v in zip(keys, values)]
            self.positions = torch.from_numpy(state["window_positions"]).long()
            self.next_position = int(state["next_position"])
            self.has_memory = bool(state["has_memory"])
            self.token_ids = state["token_ids"].tolist()
            # Where the dense index's next window starts (memlm/memory/dense.py).
            self.dense_from = int(state["dense_from"]) if "dense_from" in state else len(self.token_ids)
        self._layout_done = False
        self._new_positions = torch.zeros(0, dtype=torch.long)

    # -- layout ---------------------------------------------------------------------------

    @property
    def sink_count(self) -> int:
        return int((self.positions < self.config.sink_len).sum())

    @property
    def memory_position(self) -> int:
        """Where retrieved keys sit (window/zero modes; also the search rotation in exact mode)."""
        return 0 if self.config.position_mode == "zero" else self.sink_count

    def _window_positions(self) -> torch.Tensor:
        """RoPE positions of the local window for this layout, (N,)."""
        if self.config.position_mode == "exact":
            return self.positions
        sinks = self.sink_count
        gap = 1 if self.has_memory and self.config.position_mode == "window" else 0
        local = torch.arange(len(self.positions) - sinks) + sinks + gap
        return torch.cat([self.positions[:sinks], local])

    def positions_for(self, num_new: int) -> torch.Tensor:
        """Lay out a forward pass of `num_new` tokens; returns their RoPE positions (num_new,).

        Ingest re-lays the window every segment (it slides); generation lays it out once and
        then appends, so decoding never re-rotates the window.
        """
        if not self._layout_done:
            self._prefix_positions = self._window_positions()
            for window in self.windows:
                window.cache_keys = rotate(window.keys, self._prefix_positions, self.shape.inv_freq)
                window.cache_values = window.values
            self._layout_done = True
            self._window_end = (
                self.next_position
                if self.config.position_mode == "exact"
                else int(self._prefix_positions[-1]) + 1 if len(self._prefix_positions) else 0
            )
        start = self._window_end
        self._new_positions = torch.arange(start, start + num_new)
        return self._new_positions

    @property
    def window_end(self) -> int:
        """The position the next token takes (lays the window out first if needed)."""
        if not self._layout_done:
            self.positions_for(0)
        return self._window_end

    def in_view(self) -> list[tuple[int, int]]:
        return runs(self.positions.tolist())

    def reset_layout(self) -> None:
        """Forget the forward passes since the layout (a probe of the prompt): a generation's
        window is as it was loaded."""
        self._layout_done = False
        self.question, self.question_queries, self.retrieved = None, {}, {}
        for window in self.windows:
            window.cache_keys = window.cache_values = window.new_keys = window.new_values = None

    def place_passages(self, fetched: dict[int, Blocks]) -> None:
        """The passage read from stored keys and values: every layer's fetched blocks (the
        same blocks in each: keys unrotated, with document positions) join its local
        attention between the sinks and the window, in document order, and the memory is
        not read again. The layout then gives every token in view a consecutive position,
        [sinks][passages][window][prompt], as if those tokens were the whole document."""
        if set(fetched) != set(range(self.shape.num_layers)):
            raise ValueError("the passage read needs every layer's blocks (memory_layers='all'); use read='reread'")
        positions = {tuple(blocks.positions[:, 0]) for blocks in fetched.values()}
        if len(positions) != 1:
            raise ValueError("the memory's layers hold different blocks; cannot lay out one passage read")
        sinks = self.sink_count
        for layer, window in enumerate(self.windows):
            blocks = fetched[layer]
            heads, num_blocks, block, dim = blocks.keys.shape
            if num_blocks == 0:
                continue

            def tokens(array: np.ndarray) -> torch.Tensor:  # (H, N, B, D) -> (H, N*B, D)
                flat = torch.from_numpy(array.astype(np.float32).reshape(heads, num_blocks * block, dim))
                return flat.to(self.shape.device, self.shape.dtype)

            window.keys = torch.cat([window.keys[:, :sinks], tokens(blocks.keys), window.keys[:, sinks:]], dim=1)
            window.values = torch.cat([window.values[:, :sinks], tokens(blocks.values), window.values[:, sinks:]], dim=1)
        read = torch.tensor(next(iter(fetched.values())).positions.reshape(-1), dtype=torch.long)
        self.positions = torch.cat([self.positions[:sinks], read, self.positions[sinks:]])
        self.has_memory = False  # nothing more to read: the layout packs the positions
        self.reset_layout()

    def fork(self) -> MemorySession:
        """A copy that reads on from here while this one stays as it is. A reading session's
        forward passes rebind its window's tensors (torch.cat), never write into them, so the
        two share them."""
        forked = copy.copy(self)
        forked.windows = [copy.copy(window) for window in self.windows]
        forked.retrieved, forked.question_queries = {}, {}
        return forked

    # -- forward passes -------------------------------------------------------------------

    def forward(self, token_ids: list[int], logits: Logits) -> torch.Tensor | None:
        return logits_of(self.model, self.run(token_ids), logits)

    def run(self, token_ids: list[int], inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The model's layers over `token_ids` at this layout's positions, then `advance`:
        last hidden states (1, T, hidden). `inputs_embeds` (1, T, hidden) stand in for the
        token ids' embeddings (a pipeline shard after the first gets the previous one's)."""
        device = self.model.device
        position_ids = self.positions_for(len(token_ids)).unsqueeze(0).to(device)
        if inputs_embeds is None:
            inputs = dict(input_ids=torch.tensor([token_ids], device=device))
        else:
            inputs = dict(inputs_embeds=inputs_embeds.to(device, self.model.dtype))
        hidden = self.model.model(**inputs, position_ids=position_ids, memory_session=self).last_hidden_state
        self.advance(token_ids)
        return hidden

    # -- attention (called by the registered attention function, once per layer) ----------

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """query (1, Hq, T, D), key/value (1, Hkv, T, D), rotated at `positions_for`'s positions.
        Returns (1, T, Hq, D) as transformers' attention functions do."""
        window = self.windows[layer]
        heads, dim = self.shape.num_kv_heads, self.shape.head_dim
        num_new = query.shape[2]
        queries = query[0].view(heads, -1, num_new, dim)  # (Hkv, G, T, D)
        local = attend(queries, window.cache_keys, window.cache_values, key[0], value[0], scaling)
        out = local.out
        if self.question is not None:
            if layer in self.memory_layers:
                self.question_queries[layer] = queries[:, :, self.question]
        elif self.reads_memory and self.has_memory and layer in self.memory_layers:
            memory = self._read_memory(layer, queries, scaling)
            if memory is not None:
                out = self.backend.combine(layer, local, memory)
        window.new_keys, window.new_values = key[0], value[0]
        return out.reshape(-1, num_new, dim).transpose(0, 1).unsqueeze(0)

    def _read_memory(self, layer: int, queries: torch.Tensor, scaling: float) -> Attended | None:
        chunk = self.config.query_chunk
        # Score blocks as if every memory key sat at the memory position: undo that much rotation.
        search = rotate(chunk_query_sums(queries, chunk), torch.tensor(-self.memory_position), self.shape.inv_freq)
        found = self.store.search(self.memory, layer, search.detach().cpu().numpy(), self.config.top_k)
        if found.k == 0:
            return None
        self.retrieved[layer] = Retrieval(found.positions, found.scores)
        heads, chunks, k, block, dim = found.keys.shape
        keys = torch.from_numpy(found.keys.reshape(heads, chunks, k * block, dim)).to(self.shape.device, self.shape.dtype)
        values = torch.from_numpy(found.values.reshape(heads, chunks, k * block, dim)).to(self.shape.device, self.shape.dtype)
        if self.config.position_mode == "exact":
            where = torch.from_numpy(found.positions.reshape(heads, chunks, k * block))
        else:
            where = torch.tensor(self.memory_position)
        keys = rotate(keys, where, self.shape.inv_freq)
        return attend_chunks(queries, keys, values, scaling, chunk)

    # -- after each forward pass ----------------------------------------------------------

    def advance(self, token_ids: list[int]) -> None:
        """Take in the forward pass just run: generation appends to the cached window; ingest
        moves the new tokens into the window and evicts whole blocks of the oldest into memory."""
        num_new = len(token_ids)
        if not self.writes:
            for window in self.windows:
                window.cache_keys = torch.cat([window.cache_keys, window.new_keys], dim=1)
                window.cache_values = torch.cat([window.cache_values, window.new_values], dim=1)
            self._window_end += num_new
            return
        new_positions = torch.arange(self.next_position, self.next_position + num_new)
        self.positions = torch.cat([self.positions, new_positions])
        for window in self.windows:
            # Stop-gradient, as Transformer-XL caches: later segments read the window as constants.
            unrotated = rotate(window.new_keys.detach(), -self._new_positions, self.shape.inv_freq)
            window.keys = torch.cat([window.keys, unrotated], dim=1)
            window.values = torch.cat([window.values, window.new_values.detach()], dim=1)
            window.cache_keys = window.cache_values = window.new_keys = window.new_values = None
        self.next_position += num_new
        self.token_ids.extend(token_ids)
        self._layout_done = False
        self._evict_to_memory()

    def _evict_to_memory(self) -> None:
        sinks, block = self.sink_count, self.config.block_len
        local = len(self.positions) - sinks
        num_blocks = max(0, local - self.config.local_len) // block
        if num_blocks == 0:
            return
        evicted = slice(sinks, sinks + num_blocks * block)
        positions = self.positions[evicted].numpy().reshape(num_blocks, block)
        dtype = NUMPY_DTYPES[self.config.memory_dtype]
        keep_blocks = self.config.max_memory_tokens // block
        for layer, window in enumerate(self.windows):
            if layer in self.memory_layers:
                heads, _, dim = window.keys.shape
                keys = window.keys[:, evicted].float().reshape(heads, num_blocks, block, dim)
                values = window.values[:, evicted].float().reshape(heads, num_blocks, block, dim)
                self.store.add(
                    self.memory,
                    layer,
                    Blocks(
                        search_keys=keys.mean(dim=2).cpu().numpy(),
                        keys=keys.cpu().numpy().astype(dtype),
                        values=values.cpu().numpy().astype(dtype),
                        positions=positions,
                    ),
                )
                self.store.evict_oldest(self.memory, layer, keep_blocks)
            window.keys = torch.cat([window.keys[:, :sinks], window.keys[:, evicted.stop :]], dim=1)
            window.values = torch.cat([window.values[:, :sinks], window.values[:, evicted.stop :]], dim=1)
        self.positions = torch.cat([self.positions[:sinks], self.positions[evicted.stop :]])
        self.has_memory = self.has_memory or bool(self.memory_layers)

    def state(self) -> dict[str, np.ndarray]:
        """What `ask` in another process needs to continue from this session."""
        dtype = NUMPY_DTYPES[self.config.memory_dtype]
        return {
            "window_keys": torch.stack([w.keys for w in self.windows]).float().cpu().numpy().astype(dtype),
            "window_values": torch.stack([w.values for w in self.windows]).float().cpu().numpy().astype(dtype),
            "window_positions": self.positions.numpy(),
            "next_position": np.array(self.next_position),
            "has_memory": np.array(self.has_memory),
            "token_ids": np.array(self.token_ids, dtype=np.int32),
            "dense_from": np.array(self.dense_from),
        }

