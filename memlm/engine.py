"""`MemoryLM`: tokenize, segment, run the model with memory attention, write, generate.

    lm = MemoryLM.load()                          # embedded SmolLM2-135M-Instruct, fot, default store
    lm.ingest(open("book.txt").read(), memory="book")
    print(lm.generate("Who is the narrator?", memory="book"))
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from memlm.config import MemoryConfig
from memlm.memory.backends import make_backend
from memlm.memory.base import Logits, Retrieval, Session
from memlm.memory.dense import search_windows, window_block_scores, write_windows
from memlm.memory.reading import (
    HeadProfile,
    Passage,
    Words,
    add_votes,
    combine,
    fuse,
    head_profile,
    lexical_scores,
    new_votes,
    question_search_keys,
    question_sentences,
    question_span,
    question_weights,
    reread_ids,
    select_passages,
)
from memlm.memory.recurrent import RecurrentSession
from memlm.memory.session import MemorySession
from memlm.model.adapter import load_adapter, shipped_adapter
from memlm.model.embedder import Embedder, embedder_dir
from memlm.model.install import install_memory_attention
from memlm.model.loading import load_model, resolve_dtype
from memlm.store import MemoryNotFound, VectorStore, check_memory_name, open_store
from memlm.store.base import Blocks, SearchResult

# The quote read's re-read prefixes kept (`MemoryLM.prefix_session`): ~30 MB each (float32).
KEPT_PREFIXES = 4

# What `MemoryLM.stream` answers: a question, or chat turns ({"role": ..., "content": ...})
# whose last user turn is the question (the one the memory is searched with and quoted for).
Prompt = str | Sequence[Mapping[str, str]]
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class IngestStats:
    memory: str
    tokens: int
    segments: int
    seconds: float
    memory_tokens: int  # tokens now in the memory (all ingests), after FIFO eviction
    logits: torch.Tensor | None = None  # (T, vocab) when asked for

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class IngestCancelled(Exception):
    """An ingest stopped by its `cancelled` callback (rolled back)."""


@dataclass
class Piece:
    """One step of a streamed generation."""

    text: str  # new text since the previous piece (may be empty while a character is incomplete)
    token_id: int
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length" on the last piece


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    retrieved: dict[int, Retrieval]  # memory layer -> what the prompt's forward pass read (bag read)
    # The passages the question read, in document order (passage read; for the bag read, the
    # blocks its heads read, ranked by how many read each).
    evidence: list[Passage] = field(default_factory=list)
    # Document token ranges always in front of the model: the sinks and the local window.
    in_view: list[tuple[int, int]] = field(default_factory=list)
    # The passage read's first stage: the best `read_candidates` passages of the fused
    # ranking, ranked (the read takes the best `read_blocks`).
    candidates: list[Passage] = field(default_factory=list)


class MemoryLM:
    def __init__(self, model, tokenizer, store: VectorStore, config: MemoryConfig):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.shape = install_memory_attention(model)
        self.max_positions = int(model.config.max_position_embeddings)
        config.validate(self.shape.num_layers, self.max_positions)
        if config.embedder is not None:
            embedder_dir(config.embedder)  # a missing embedder is refused here, not mid-ingest
        self.config = config
        self.backend = make_backend(config, self.shape.num_layers, self.shape.num_heads, model)
        # Whose votes count in the passage read (memlm/memory/reading.py): the shipped profile on
        # the model it was measured on, else uniform (`load(heads=...)` sets another).
        self.head_profile = head_profile(model.name_or_path, self.shape.num_layers, self.shape.num_heads)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._token_texts: dict[int, str] = {}  # `token_texts`' decoded tokens
        self._prefixes: OrderedDict[tuple[int, ...], MemorySession] = OrderedDict()  # `prefix_session`'s, newest last
        self._prefixes_guard = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        backend: str = "fot",
        store: str | VectorStore | None = None,
        config: MemoryConfig | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        adapter: str | Path | None = None,
        default_adapter: bool = True,
        heads: str | Path | None = None,
        **settings,
    ) -> MemoryLM:
        """`model` None: the embedded model. `store` None: FAISS under $MEMLM_HOME. `adapter`:
        a trained adapter file (`memlm train ...`); with none given, the embedded model gets
        the adapter shipped for its backend, if any (memlm/adapters; `default_adapter=False`
        runs it untrained). `heads`: a retrieval-head profile (`memlm calibrate heads`); with
        none given, the embedded model uses the shipped one and other models vote uniformly.
        Extra keyword arguments override `MemoryConfig` fields (top_k=16, segment_len=512, ...)."""
        weights = resolve_dtype(dtype, device)
        config = replace(config or MemoryConfig(), backend=backend, **settings)
        hf_model, tokenizer = load_model(model, dtype=weights, device=device)
        lm = cls(hf_model, tokenizer, open_store(store), config)
        if adapter is None and model is None and default_adapter:
            adapter = shipped_adapter(config.backend)
        if adapter is not None:
            load_adapter(lm, adapter)
        if heads is not None:
            lm.head_profile = HeadProfile.load(heads, lm.shape.num_layers, lm.shape.num_heads)
        return lm

    @property
    def embedder(self) -> Embedder | None:
        """The dense index's sentence embedder (`config.embedder`), loaded on first use (once
        per process); None when there is none, or no memory layer to read passages for."""
        config = self.config
        if config.embedder is None or not config.layer_indices(self.shape.num_layers):
            return None
        return Embedder.load(config.embedder)

    # -- memories -------------------------------------------------------------------------

    def memories(self) -> list[str]:
        return self.store.memories()

    def forget(self, memory: str) -> None:
        with self._lock(memory):
            self.store.delete(memory)
        with self._prefixes_guard:  # its kept prefixes among them (a prefix is re-read once when needed again)
            self._prefixes.clear()

    def _lock(self, memory: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(memory, threading.Lock())

    def open_session(self, memory: str | None, writes: bool) -> Session:
        """A session over `memory` as last committed (new when an ingest opens one that does
        not exist); None: no memory at all (the plain model with the same local window; for
        rmt, the trained initial memory)."""
        if memory is None:
            return self._session("-", writes=False, state=None)
        try:
            state = self.store.load_state(memory)
        except MemoryNotFound:
            if not writes:
                raise
            state = None
        if state is not None:
            self.config.check_stamp(memory, state)
        return self._session(memory, writes, state)

    def _session(self, memory: str, writes: bool, state: dict | None) -> Session:
        if self.config.backend == "rmt":
            return RecurrentSession(self.backend, self.model, writes, state)
        return MemorySession(self.model, self.shape, self.config, self.backend, self.store, memory, writes, state)

    @torch.inference_mode()
    def forward(self, session: Session, token_ids: list[int], logits: Logits = "none") -> torch.Tensor | None:
        """`session.forward` without autograd: what ingest, generation and benchmarks run."""
        return session.forward(token_ids, logits)

    def commit(self, memory: str, session: Session) -> None:
        """Save a writing session's state, stamped with the settings it depends on, and commit."""
        self.store.save_state(memory, self.config.stamp(session.state()))
        self.store.commit(memory)

    # -- ingest ---------------------------------------------------------------------------

    def ingest(
        self, text: str, memory: str, progress: bool = True, cancelled: Callable[[], bool] | None = None
    ) -> IngestStats:
        """Read `text` into the named memory (appending when it exists). All or nothing: a
        failure or interruption leaves the memory as it was."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("nothing to ingest: the text is empty")
        token_ids = self.text_ids(text)
        return self.ingest_tokens(token_ids, memory, progress=progress, cancelled=cancelled)

    def ingest_tokens(
        self,
        token_ids: list[int],
        memory: str,
        progress: bool = True,
        return_logits: bool = False,
        cancelled: Callable[[], bool] | None = None,
    ) -> IngestStats:
        """Ingest token ids; with `return_logits` the stats also carry the logits of every
        token as the memory model computed them (exactness tests, perplexity). `cancelled`
        is asked before every segment (a server's client gone or past its deadline): when it
        says True the ingest rolls back and raises `IngestCancelled`."""
        check_memory_name(memory)
        if not token_ids:
            raise ValueError("nothing to ingest: no tokens")
        vocab = self.model.config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab})")
        started = time.perf_counter()
        segment_len = self.config.segment_len
        segments = range(0, len(token_ids), segment_len)
        logits: list[torch.Tensor] = []
        with self._lock(memory):
            session = self.open_session(memory, writes=True)
            try:
                bar = tqdm(total=len(token_ids), unit="tok", desc=f"ingest {memory}", disable=not progress)
                with bar:
                    for start in segments:
                        if cancelled is not None and cancelled():
                            raise IngestCancelled(f"ingest into {memory!r} cancelled; the memory is as it was")
                        segment = token_ids[start : start + segment_len]
                        out = self.forward(session, segment, logits="all" if return_logits else "none")
                        if return_logits:
                            logits.append(out)
                        self.index_windows(session, final=False)
                        bar.update(len(segment))
                    self.index_windows(session, final=True)
                self.commit(memory, session)
            except BaseException:
                self.store.rollback(memory)
                raise
        if self.config.read == "quote" and session.has_memory:
            # Every question's quote read starts from the document's first tokens and local
            # window re-read as text: read them now, once per ingest (0.7 s at 32k, ~1% of the
            # ingest), not in the first question's time to first token (1.02 s against 0.29 s).
            self.prefix_session(self.quote_prefix_ids(session))
        return IngestStats(
            memory=memory,
            tokens=len(token_ids),
            segments=len(segments),
            seconds=time.perf_counter() - started,
            memory_tokens=self.store.stats(memory).tokens,
            logits=torch.cat(logits) if return_logits else None,
        )

    def index_windows(self, session: Session, final: bool) -> None:
        """Embed the text an ingest has read so far into the memory's dense index (its windows
        whose words are all in; with `final`, the rest): in step with the ingest, so that its
        progress is the ingest's and a rollback drops both."""
        if self.embedder is None or not isinstance(session, MemorySession):
            return
        config, done = self.config, session.dense_from
        session.dense_from = write_windows(self.store, session.memory, self.embedder,
                                           self.token_texts(session.token_ids[done:]), done,
                                           config.dense_window, config.dense_stride, final)  # fmt: skip

    # -- generate -------------------------------------------------------------------------

    def prompt_ids(self, prompt: Prompt, chat: bool = True, system: str = "") -> list[int]:
        """`prompt` as the model reads it: a question in the chat template's user turn, or chat
        turns in the template, led by a `system` turn when one is given and the turns bring
        none (otherwise the template's own); with `chat` False, or a model without a template,
        the text alone (chat turns' contents one per line)."""
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not (chat and self.tokenizer.chat_template):
            return self.text_ids("\n".join(turn["content"] for turn in turns))
        if system and turns[0]["role"] != "system":
            turns = [{"role": "system", "content": system}, *turns]
        return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)

    def question_span(self, prompt: Prompt, chat: bool = True) -> slice:
        """Where the question's own text lies in `prompt_ids(prompt, chat)`: the prompt, or the
        last user turn of chat turns. A chat template's system and role tokens are the same for
        every question and must not steer retrieval."""
        if isinstance(prompt, str):
            if not (chat and self.tokenizer.chat_template):
                return slice(0, len(self.prompt_ids(prompt, chat=False)))
            unasked: Prompt = ""
        else:
            asked = last_user_turn(prompt)
            unasked = [*prompt[:asked], {**prompt[asked], "content": ""}, *prompt[asked + 1 :]]
        return question_span(self.prompt_ids(prompt, chat), self.prompt_ids(unasked, chat))

    @torch.inference_mode()
    def search_with_question(
        self, session: MemorySession, prompt_ids: list[int], question: slice, layers: list[int] | None = None
    ) -> dict[int, SearchResult]:
        """Probe the prompt over the local window, then search each memory layer (or those
        of `layers`) with each query head's summed queries at the question's tokens: per
        layer, (Hkv, G, k) top blocks, one row per query head."""
        session.question = question
        self.forward(session, prompt_ids, logits="none")
        found = {}
        for layer, queries in session.question_queries.items():
            if layers is None or layer in layers:
                search = question_search_keys(queries, session.memory_position, self.shape.inv_freq)
                found[layer] = self.store.search(session.memory, layer, search, self.config.read_top_k)
        return found

    def read_passages(
        self, session: MemorySession, prompt_ids: list[int], question: slice, context: str = "",
        query: np.ndarray | None = None,
    ) -> tuple[list[Passage], list[Passage]]:  # fmt: skip
        """The passage read's selection (memlm/memory/reading.py): the question's rare words in
        the blocks' text and its embedding against the dense index's windows, combined
        (`combine`); the retrieval heads' votes from the question's search in every layer with
        one, fused with those by reciprocal rank (`read_scoring` and `embedder` choose which).
        `context`: the earlier chat turns' text, which a follow-up question leans on; `query`:
        the question's embedding (`question_vector`, made here when not given). Returns the
        passages read (the best `read_blocks`) and the first stage's `read_candidates`."""
        config = self.config
        # The blocks the store still holds: the newest ones before the local window (FIFO).
        in_window = session.positions[session.sink_count :]
        window_start = int(in_window[0]) if len(in_window) else len(session.token_ids)
        held = min((n for layer, n in self.store.stats(session.memory).blocks_per_layer.items() if layer >= 0),
                   default=0)  # fmt: skip
        oldest = max(config.sink_len, window_start - held * config.block_len)
        lexical: dict[int, float] = {}
        if config.read_scoring in ("lexical", "hybrid"):
            words, asked = self.words(session.token_ids), self.words(prompt_ids[question]).text
            earlier = self.words(self.text_ids(context)).text if context else ()
            if config.read == "quote":
                # The quote read quotes text, so the sinks' and the local window's too: in view
                # but far from the question, the model answered 1 of 12 facts there (eval_words,
                # 2k tokens) against 30 of 30 quoted from the store. Evicted blocks stay forgotten.
                lexical = lexical_scores(words, asked, config.block_len, 0, len(session.token_ids), earlier)
                lexical = {start: score for start, score in lexical.items() if not config.sink_len <= start < oldest}
            else:
                lexical = lexical_scores(words, asked, config.block_len, oldest, window_start, earlier)
        dense: dict[int, float] = {}
        query = query if query is not None else self.question_vector(prompt_ids[question], context)
        if query is not None and config.read_scoring != "attention":
            windows = search_windows(self.store, session.memory, query, config.dense_top_k)
            end = len(session.token_ids) if config.read == "quote" else window_start
            windows = [w for w in windows if w.start < end]
            dense = window_block_scores(windows, config.block_len, config.sink_len, oldest)
        found = combine(lexical, dense, config.dense_weight) if lexical and dense else lexical or dense
        rankings = [found] if found else []
        # The heads' votes; for the other scorings, when neither words nor windows found anything.
        if config.read_scoring in ("attention", "hybrid") or not rankings:
            weights = self.head_profile.weights
            voting = [layer for layer in range(len(weights)) if weights[layer].any()]
            votes = new_votes()
            for layer, result in self.search_with_question(session, prompt_ids, question, voting).items():
                if result.k:
                    add_votes(votes, result, weights[layer])
            rankings.append(votes)
        scores = fuse(rankings) if len(rankings) > 1 else rankings[0]
        candidates = select_passages(scores, config.block_len, max(config.read_candidates, config.read_blocks),
                                     config.read_context, len(session.token_ids), grid=config.sink_len)  # fmt: skip
        # The read takes the best passages of the first stage whole (each its best block with
        # whatever other candidate blocks lie next to it): the trim picks their sentences.
        return [p for p in candidates if p.rank < config.read_blocks], candidates

    def question_vector(self, question_ids: list[int], context: str = "") -> np.ndarray | None:
        """The question's embedding (dim,), with the earlier chat turns it leans on; None
        without an embedder."""
        if self.embedder is None:
            return None
        return self.embedder.embed([f"{context}\n{self.tokenizer.decode(question_ids).strip()}".strip()])[0]

    def sentences_for(
        self, token_ids: list[int], passages: list[Passage], question_ids: list[int], context: str = "",
        query: np.ndarray | None = None,
    ) -> list[Passage]:  # fmt: skip
        """The sentences of each passage the question needs (`reading.question_sentences`),
        its words weighed by how rare they are across the whole document (an earlier chat
        turn's at CONTEXT_WEIGHT), and with the question's embedding `query`, the sentence
        most like it."""
        asked = set(self.words(question_ids).text)
        earlier = set(self.words(self.text_ids(context)).text) if context else set()
        holding = self.words(token_ids).holding(asked | earlier, self.config.block_len, 0, len(token_ids))
        weights = question_weights(holding, asked)
        similarity = None
        if query is not None:
            similarity = lambda texts: self.embedder.embed(texts) @ query  # noqa: E731
        found = []
        for passage in passages:
            pieces = self.token_texts(token_ids[passage.start : passage.end])
            found += question_sentences(passage, pieces, weights, similarity)
        return found

    def words(self, token_ids: Sequence[int]) -> Words:
        """The words of a run of tokens (`reading.Words`), positions counted from its first."""
        return Words.of(self.token_texts(token_ids))

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text, decoded once per distinct token and kept: a 128k-token
        document holds some 10k distinct tokens."""
        texts = self._token_texts
        for token in set(token_ids) - texts.keys():
            texts[token] = self.tokenizer.decode([token])
        return [texts[token] for token in token_ids]

    def fetch_passages(self, session: MemorySession, passages: list[Passage]) -> dict[int, Blocks]:
        """Every layer's stored blocks that hold the passages' tokens (those still in the local
        window or the sinks are in view already and not in the store)."""
        grid, block = self.config.sink_len, self.config.block_len
        starts = sorted({start for p in passages for start in range(max(p.start, grid), p.end, block)})
        wanted = np.array(starts, dtype=np.int64)
        return {layer: self.store.blocks_at(session.memory, layer, wanted) for layer in range(self.shape.num_layers)}

    def reread_session(
        self, session: MemorySession, passages: list[Passage], prompt_ids: list[int]
    ) -> tuple[MemorySession, list[int]]:
        """`read="reread"`: a session with no memory and the ids to run in it: the document's
        first tokens, the passages' text in document order at consecutive positions and its
        local window, then the prompt."""
        inputs = reread_ids(session.token_ids, session.positions.tolist(), passages, self.paragraph_break) + prompt_ids
        return self.open_session(None, writes=False), inputs

    def quote_session(
        self, session: MemorySession, passages: list[Passage], prompt: Prompt, chat: bool
    ) -> tuple[MemorySession, list[int]]:
        """`read="quote"`: a session that has read the document's first tokens and its local
        window as text (`prefix_session`), and the ids to run in it: the prompt with the
        passages quoted in the question's own turn, just before the question, under the
        `quote_system` turn (where chat turns bring none)."""
        quoted = quoted_prompt(prompt, self.quote_text(session.token_ids, passages))
        return self.prefix_session(self.quote_prefix_ids(session)), self.prompt_ids(quoted, chat, self.config.quote_system)

    def quote_prefix_ids(self, session: MemorySession) -> list[int]:
        """What the quote read re-reads before the prompt: the document's first tokens and its
        local window as text, each followed by a paragraph break."""
        kept = reread_ids(session.token_ids, session.positions.tolist(), [], self.paragraph_break)
        return kept + self.paragraph_break

    def prefix_session(self, prefix_ids: list[int]) -> MemorySession:
        """A fresh session (no memory) that has read `prefix_ids`: for the quote read, the
        document's first tokens and local window as text, the same for every question until
        the memory changes. The last KEPT_PREFIXES are kept (keyed by their ids: a changed
        memory has other ones), and each question reads on in a fork: re-reading those ~600
        tokens was 0.66 of the 0.83 s to a 32k memory's first token."""
        key = tuple(prefix_ids)
        with self._prefixes_guard:
            session = self._prefixes.get(key)
            if session is not None:
                self._prefixes.move_to_end(key)
        if session is None:
            session = self.open_session(None, writes=False)
            self.forward(session, prefix_ids, logits="none")
            with self._prefixes_guard:
                self._prefixes[key] = session
                while len(self._prefixes) > KEPT_PREFIXES:
                    self._prefixes.popitem(last=False)
        return session.fork()

    def quote_text(self, token_ids: list[int], passages: list[Passage]) -> str:
        """The passages as the question's turn quotes them: their text, labelled as the
        document's, and the question after them labelled too. The labels matter to a small
        model: without them the 135M model took the quoted Vim manual for the conversation and
        went on with it (7 of 18 needles right against 13 of 18 with them; a scratch comparison,
        12k-token documents). The text is tokenized anew with the question, as a pasted quote
        would be, white space at either end cut (see `quote_system` for what it changed)."""
        quoted = "\n\n".join(self.tokenizer.decode(token_ids[p.start : p.end]).strip() for p in passages)
        return f"From the document:\n{quoted}\n\nQuestion: "

    @cached_property
    def paragraph_break(self) -> list[int]:
        """Where a text read skips ahead in the document, and after the quote read's re-read
        prefix: tokenized when first needed (a Ray shard's engine has no tokenizer)."""
        return self.text_ids("\n\n")

    def text_ids(self, text: str) -> list[int]:
        """`text`'s token ids as the document's are made: no special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def stream(
        self,
        prompt: Prompt,
        memory: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        chat: bool = True,
        seed: int | None = None,
    ) -> Generation:
        """Generate token by token, reading `memory` (the passage read, then the memory layers
        at every step). Greedy when temperature is 0; nucleus sampling otherwise. Bad arguments
        raise ValueError here; the model runs as the pieces are taken."""
        check_generation(prompt, memory, max_new_tokens, temperature, top_p)
        return Generation(self._generate(prompt, memory, max_new_tokens, temperature, top_p, stop, chat, seed))

    def _generate(
        self,
        prompt: Prompt,
        memory: str | None,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str] | None,
        chat: bool,
        seed: int | None,
    ) -> Generator[Piece, None, GenerationResult]:
        prompt_ids = self.prompt_ids(prompt, chat)
        # A generation reads a snapshot: the session copies the window, and the lock keeps an
        # ingest from committing halfway through the read of the store's state (and, for the
        # passage read, of its blocks).
        with self._lock(memory or ""):
            session = self.open_session(memory, writes=False)
            in_view = session.in_view()
            session, inputs, evidence, candidates = self._read_for(session, prompt, prompt_ids, chat)
        used = session.window_end + len(inputs) + max_new_tokens
        if self.config.position_mode != "exact" and used > self.max_positions:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) do not fit the model's "
                f"context next to the memory's local window and what the question read; shorten the prompt or "
                f"lower max_new_tokens"
            )
        logits = self.forward(session, inputs, logits="last")[-1]
        retrieved = dict(session.retrieved)
        if not evidence and retrieved:
            evidence = bag_evidence(retrieved, self.config.block_len, self.config.sink_len)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = set(_as_list(self.tokenizer.eos_token_id) + _as_list(getattr(self.model.generation_config, "eos_token_id", None)))
        text = StopMatcher(self.tokenizer, stop)
        finish = "length"
        for step in range(max_new_tokens):
            token = _pick(logits, temperature, top_p, generator)
            if token in eos:
                finish = "stop"
                yield Piece("", token, finish)
                break
            piece = text.add(token)
            if text.stopped:
                finish = "stop"
                yield Piece(piece, token, finish)
                break
            last = step == max_new_tokens - 1
            yield Piece(piece, token, "length" if last else None)
            if not last:
                logits = self.forward(session, [token], logits="last")[-1]
        return GenerationResult(text.text, text.token_ids, finish, len(prompt_ids), retrieved, evidence, in_view,
                                candidates)

    def _read_for(
        self, session: Session, prompt: Prompt, prompt_ids: list[int], chat: bool
    ) -> tuple[Session, list[int], list[Passage], list[Passage]]:
        """The question's passage read (`config.read`): the session to generate in, the token
        ids to run in it (ending with the prompt), the passages read and the first stage's
        candidates. The bag read, or no memory to read: the session as it is and the prompt."""
        if self.config.read == "bag" or not session.has_memory:
            return session, prompt_ids, [], []
        question, context = self.question_span(prompt, chat), earlier_turns(prompt)
        query = self.question_vector(prompt_ids[question], context)  # the read and the trim both use it
        evidence, candidates = self.read_passages(session, prompt_ids, question, context, query)
        if self.config.read == "passages" and len(session.memory_layers) == self.shape.num_layers:
            session.place_passages(self.fetch_passages(session, evidence))
            return session, prompt_ids, evidence, candidates
        # "quote", "reread", or memory in some layers only: the others hold no passage keys.
        if self.config.read_sentences:
            evidence = self.sentences_for(session.token_ids, evidence, prompt_ids[question], context, query)
        if self.config.read == "quote":
            session, inputs = self.quote_session(session, evidence, prompt, chat)
        else:
            session, inputs = self.reread_session(session, evidence, prompt_ids)
        return session, inputs, evidence, candidates

    def generate(self, prompt: Prompt, memory: str | None = None, **options) -> str:
        return "".join(piece.text for piece in self.stream(prompt, memory, **options))

    def generate_full(self, prompt: Prompt, memory: str | None = None, **options) -> GenerationResult:
        generation = self.stream(prompt, memory, **options)
        for _ in generation:
            pass
        return generation.result


class Generation:
    """A generation under way: iterate it for its pieces; when they are all out, `result`
    holds the whole answer and what the question read. `close()` stops it early (the model
    computes no further token)."""

    def __init__(self, steps: Generator[Piece, None, GenerationResult]):
        self._steps = steps
        self.result: GenerationResult | None = None

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> Piece:
        try:
            return next(self._steps)
        except StopIteration as finished:
            self.result = finished.value
            raise

    def close(self) -> None:
        self._steps.close()


def check_generation(prompt: Prompt, memory: str | None, max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Raise ValueError, saying what is wrong, for arguments `MemoryLM.stream` cannot use."""
    if not prompt or isinstance(prompt, str) and not prompt.strip():
        raise ValueError("the prompt is empty")
    if not isinstance(prompt, str):
        for turn in prompt:
            if turn.get("role") not in CHAT_ROLES:
                raise ValueError(f"chat message role {turn.get('role')!r}: use one of {', '.join(CHAT_ROLES)}")
            if not isinstance(turn.get("content"), str):
                raise ValueError(f"a chat message's content must be text, got {turn.get('content')!r}")
        if not prompt[last_user_turn(prompt)]["content"].strip():
            raise ValueError("the last user message, the question, is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 <= temperature <= 5.0:
        raise ValueError(f"temperature must lie in [0, 5], got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if memory is not None:
        check_memory_name(memory)


def quoted_prompt(prompt: Prompt, quote: str) -> Prompt:
    """`prompt` with `quote` just before the question: before a question's text, or before
    the content of the last user turn of chat turns."""
    if isinstance(prompt, str):
        return quote + prompt
    turns = list(prompt)
    asked = last_user_turn(turns)
    turns[asked] = {**turns[asked], "content": quote + turns[asked]["content"]}
    return turns


def earlier_turns(prompt: Prompt) -> str:
    """The text of the chat turns before the question (user and assistant; not the system
    turn, which is the same for every question): what a follow-up question leans on."""
    if isinstance(prompt, str):
        return ""
    asked = last_user_turn(prompt)
    return "\n".join(turn["content"] for turn in prompt[:asked] if turn["role"] != "system").strip()


def last_user_turn(turns: Sequence[Mapping[str, str]]) -> int:
    """The index of the question among chat turns: the last user turn."""
    for index in range(len(turns) - 1, -1, -1):
        if turns[index]["role"] == "user":
            return index
    raise ValueError("chat messages need a user message: the question")


class StopMatcher:
    """The text of the tokens generated so far, cut before the first stop string."""

    def __init__(self, tokenizer, stop: list[str] | None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.token_ids: list[int] = []
        self.text = ""
        self.stopped = False  # a stop string appeared: the text ends before it

    def add(self, token: int) -> str:
        """Take the next token; returns the text it adds (empty while a character is
        incomplete; only what comes before a stop string)."""
        self.token_ids.append(token)
        # Decode the whole answer each time: a token's text can depend on its neighbours.
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        piece, self.text = full[len(self.text) :], full
        hit = next((s for s in self.stop if s in self.text), None)
        if hit is not None:
            cut = self.text.index(hit)
            piece = piece[: max(0, len(piece) - (len(self.text) - cut))]
            self.text, self.stopped = self.text[:cut], True
        return piece


def bag_evidence(retrieved: dict[int, Retrieval], block_len: int, grid: int) -> list[Passage]:
    """What a bag read placed in front of the prompt: every block some head read, ranked by
    how many (layer, head, chunk) retrievals chose it."""
    votes = new_votes()
    for retrieval in retrieved.values():
        for start in retrieval.positions[..., 0].reshape(-1):
            votes[int(start)] += 1.0
    return select_passages(votes, block_len, len(votes), 0, int(1e12), grid)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [int(value)]


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    # Keep the smallest set of tokens whose mass reaches top_p (always at least the first).
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])
