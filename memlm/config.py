"""Settings of a memory model. Defaults were picked by `memlm bench passkey` (README, Results)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

Backend = Literal["fot", "knn", "xl", "rmt"]
PositionMode = Literal["window", "zero", "exact"]
ReadMode = Literal["quote", "reread", "passages", "bag"]
READ_MODES: tuple[str, ...] = ("quote", "reread", "passages", "bag")
ReadScoring = Literal["hybrid", "attention", "lexical"]
READ_SCORINGS: tuple[str, ...] = ("hybrid", "attention", "lexical")
BACKENDS: tuple[str, ...] = ("fot", "knn", "xl", "rmt")
RMT_WRITE_PROMPT_LEN = 4  # trained embeddings after each rmt segment, before its notes (memlm/memory/recurrent.py)
POSITION_MODES: tuple[str, ...] = ("window", "zero", "exact")


@dataclass
class MemoryConfig:
    backend: Backend = "fot"
    # Tokens run through the model per forward pass while ingesting.
    segment_len: int = 1024
    # The first tokens of a document stay in local attention for good (attention sinks).
    sink_len: int = 64
    # Recent tokens before the current segment kept in local attention, whatever the segment
    # boundaries: a question always sees this much of the document's end (the lesson in docs/design.md).
    local_len: int = 512
    # Layers that read and write the external memory: a list of indices or "all".
    memory_layers: list[int] | Literal["all"] = "all"
    # Memory is stored and retrieved in blocks of consecutive tokens (1 = per-token kNN memory).
    block_len: int = 16
    # Blocks retrieved per key/value head for each chunk of queries.
    top_k: int = 8
    # Queries that share one retrieval (their summed query scores the blocks, as in InfLLM).
    query_chunk: int = 128
    # Where retrieved keys sit for RoPE: "window" (all at the position just before the local
    # window, InfLLM), "zero" (all at position 0, LongLLaMA), "exact" (where they were written).
    position_mode: PositionMode = "window"
    # Read memory while ingesting (each segment sees the top-k of everything older), as the
    # Memorizing/Focused Transformers do; reading only at question time is the cheaper choice.
    read_memory_in_ingest: bool = True
    # FIFO cap per memory layer; the oldest blocks leave first.
    max_memory_tokens: int = 2_000_000
    # Memorizing-Transformer gate bias b, g = sigmoid(b), per layer and head (knn backend).
    gate_init: float = 0.0
    # Storage precision of memory keys and values.
    memory_dtype: Literal["float16", "float32"] = "float16"
    # How a question reads the memory (fot, knn; memlm/memory/reading.py). "quote" (the
    # default), "reread" and "passages" first pick passages for the question (`read_scoring`).
    # "quote" re-reads the document's first tokens and its local window as text and quotes the
    # passages' text (from the store's blocks, the sinks or the local window) in the question's
    # own turn, just before the question; "reread" runs the passages' text between the first
    # tokens and the local window instead, in document order;
    # "passages" places their stored keys and values there (no recompute; with memory in some
    # layers only, the others hold no keys, so it re-reads). "bag" is every head attending to
    # its own top-k blocks at every step, as while ingesting. Measured on the demo's handbooks
    # (scripts/bench_read.py, README "Which read"), with the passage holding the fact read
    # first every time, the 135M model answered 24/24 from the quoted passage, 17/24 from the
    # re-read one and 10/24 from its stored keys and values.
    read: ReadMode = "quote"
    # Passage read: blocks each (layer, query head) votes for (attention scoring).
    read_top_k: int = 32
    # How the passage read ranks blocks: "lexical" (the question's rare words in the blocks'
    # text, the default: it put the fact first for 24 of 24 handbook questions, fused with the
    # heads' votes for 16 of 24; the votes when no word of the question is in the memory),
    # "attention" (the retrieval heads' votes) or "hybrid" (both, by reciprocal rank fusion).
    read_scoring: ReadScoring = "lexical"
    # Blocks read, and the tokens of context kept on either side of each: one passage of
    # ~270 tokens. Eight passages of 48 tokens' context put eight look-alike facts in front
    # of a small model (6/24 right, stored keys and values, against 24/24 quoted); two quoted
    # passages answered 24/24 too, for more time.
    read_blocks: int = 1
    read_context: int = 128
    # A text read (quote, reread) keeps only the passage's sentences the question needs: those
    # holding at least half as much of its rare words as the best one, with a sentence either
    # side within their paragraph. With the whole ~270-token passage quoted, the 135M model
    # often answered from the manual text around a needle (bench eval prose-needles, 16k / 32k:
    # cities 0.71 / 0.62 whole, 1.00 / 0.95 trimmed; codes 0.90 / 0.81 and 0.95 / 0.90).
    read_sentences: bool = True
    # The system turn of a quote read's chat prompt ("": the chat template's own). Copying a
    # quoted code, the 135M model often dropped its first token ("7G2T" for GC7G2T). A scratch
    # rebuild of the quote read's input for 126 codes (16k tokens, four seeds; 32k and 128k,
    # one) answered 124 right with this turn, 122 with "You answer questions about a document.
    # Quote the document exactly.", 116 under SmolLM's own ("You are a helpful AI assistant
    # named SmolLM") and 115 with the document's tokens spliced in instead of the quote's text.
    quote_system: str = "Answer with the exact words of the document."
    # The sentence embedder of the memory's dense index (memlm/memory/dense.py): a shipped name
    # or a sentence-transformers checkpoint directory; None reads by words (and heads) alone.
    # Written with the memory and stamped on it: a memory refuses a reader set to another.
    embedder: str | None = "all-MiniLM-L6-v2"
    # The dense index's windows: `dense_window` words, one every `dense_stride` words.
    dense_window: int = 40
    dense_stride: int = 20
    # Windows the question's embedding fetches for the fusion (memlm/memory/reading.py).
    dense_top_k: int = 32
    # The dense index's share of a block's first-stage score; the rest is the question's words'
    # (`reading.combine`).
    dense_weight: float = 0.5
    # Passages the first stage (words and embeddings fused) ranks; the read takes the best
    # `read_blocks` of them. Benchmarks report the evidence's rank among these.
    read_candidates: int = 16
    # Tokens of notes the rmt backend carries from segment to segment (read and written).
    num_mem_tokens: int = 64
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend == "xl":
            # Transformer-XL is the local window alone: every layer attends to the cached keys
            # and values of the previous local_len tokens (its mem_len), positions continuing;
            # nothing is written to, or read from, the vector store. The first sink_len tokens
            # stay in view as well: without its attention sink a pretrained model degenerates
            # once the document's start leaves the window (StreamingLLM), and recalled nothing,
            # not even a pass key 100 tokens back.
            self.memory_layers, self.embedder = [], None
        elif self.backend == "rmt":
            # RMT segments see nothing of the past but the memory tokens: no local window,
            # no vector store.
            self.memory_layers, self.sink_len, self.local_len, self.embedder = [], 0, 0, None

    @property
    def mem_len(self) -> int:
        """Transformer-XL's name for the recurrence length (the local window)."""
        return self.local_len

    def validate(self, num_layers: int, max_positions: int) -> None:
        """Raise ValueError with a message that says what to change."""
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"unknown position_mode {self.position_mode!r}; choose one of {', '.join(POSITION_MODES)}")
        if self.read not in READ_MODES:
            raise ValueError(f"unknown read {self.read!r}; choose one of {', '.join(READ_MODES)}")
        if self.read_scoring not in READ_SCORINGS:
            raise ValueError(f"unknown read_scoring {self.read_scoring!r}; choose one of {', '.join(READ_SCORINGS)}")
        for name in ("segment_len", "top_k", "block_len", "query_chunk", "max_memory_tokens", "num_mem_tokens",
                     "read_top_k", "read_blocks", "dense_window", "dense_stride", "dense_top_k", "read_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dense_weight <= 1.0:
            raise ValueError(f"dense_weight must lie in [0, 1], got {self.dense_weight}")
        if self.dense_stride > self.dense_window:
            raise ValueError(f"dense_stride ({self.dense_stride}) > dense_window ({self.dense_window}) leaves words unindexed")
        if self.sink_len < 0 or self.local_len < 0 or self.read_context < 0:
            raise ValueError("sink_len, local_len and read_context must be >= 0")
        if self.backend == "rmt":  # [sink ; notes ; segment ; write prompt ; new notes]
            window = 1 + self.segment_len + RMT_WRITE_PROMPT_LEN + 2 * self.num_mem_tokens
        else:
            window = self.sink_len + 1 + self.local_len + self.block_len + self.segment_len
        if self.position_mode != "exact" and window > max_positions:
            raise ValueError(
                f"a segment with its local window or memory tokens spans {window} positions, more than the "
                f"model's context of {max_positions}; lower segment_len or local_len"
            )
        for layer in self.layer_indices(num_layers):
            if not 0 <= layer < num_layers:
                raise ValueError(f"memory layer {layer} out of range: the model has {num_layers} layers")

    def layer_indices(self, num_layers: int) -> list[int]:
        return list(range(num_layers)) if self.memory_layers == "all" else sorted(self.memory_layers)

    def storage_key(self) -> dict:
        """Settings a stored memory depends on: reading it with others would be wrong."""
        key = {"block_len": self.block_len, "memory_layers": self.memory_layers, "sink_len": self.sink_len}
        if self.backend == "rmt":  # an rmt memory is a state of this size, not a window and blocks
            key["num_mem_tokens"] = self.num_mem_tokens
        if self.embedder is not None:  # the dense index: another embedder's vectors are not comparable
            from memlm.model.embedder import embedder_name

            key["embedder"] = {"name": embedder_name(self.embedder), "window": self.dense_window,
                               "stride": self.dense_stride}  # fmt: skip
        return key

    def stamp(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`state` with the storage key added: the settings a stored memory depends on travel
        with it, so that a model set otherwise refuses to read it (`check_stamp`)."""
        return {**state, "storage_key": np.frombuffer(json.dumps(self.storage_key()).encode(), dtype=np.uint8)}

    def check_stamp(self, memory: str, state: dict[str, np.ndarray]) -> None:
        """Raise ValueError when `memory`'s state was written with other storage settings."""
        stored = json.loads(bytes(state["storage_key"]).decode())
        mine = json.loads(json.dumps(self.storage_key()))
        if stored.get("embedder") != mine.get("embedder"):
            written = stored.get("embedder") or {"name": None}
            raise ValueError(
                f"memory {memory!r} was indexed with embedder {written['name']!r} ({stored.get('embedder')}); "
                f"this model is set to {self.embedder!r} ({mine.get('embedder')}): load it with that embedder "
                f"and window (--embedder), or ingest into a new memory name"
            )
        if stored != mine:
            raise ValueError(
                f"memory {memory!r} was written with {stored}; this model is set to "
                f"{self.storage_key()}: use the same settings or a new memory name"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self))
