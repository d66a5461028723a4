"""The question-time read: turn a memory into the few passages a question needs.

The per-head read (`read="bag"`) lets every head of every layer fetch its own top-k
blocks for a chunk of the prompt's queries and attend to them all at one position: each
head reads a different bag of 16-token fragments, out of document order, and the prompt's
chat-template tokens steer the search as much as the question does. A small model cannot
use that (0/8 on the demo's handbook, while the same model given the 1.5k tokens around
each fact answers 7/8). The passage read instead:

1. *probes*: the prompt runs once over the local window only, and each memory layer keeps
   its queries at the question's own tokens (`question_span`: never the template's);
2. *scores* blocks: per layer and query head, the question's summed query searches the
   memory's blocks and each head's top blocks get votes weighted by how reliably that head
   finds evidence (`HeadProfile`, measured by `memlm calibrate heads`) and by rank; the
   question's rare words in each block's text score them too (`lexical_scores`, on `Words`),
   combined with the question's similarity to the dense index's windows (`combine`;
   memlm/memory/dense.py), and the votes are fused with those by rank (`fuse`; `read_scoring`
   picks which take part);
3. *selects* one set of passages for the whole model (`select_passages`): the best blocks,
   widened by their neighbours to whole blocks, merged, in document order: the candidates,
   of which the best `read_blocks` are read;
4. *reads* them coherently: every layer's stored keys and values of those blocks go between
   the document's first tokens and its local window, at consecutive positions
   (`MemorySession.place_passages`), or, with `read="reread"`, the passages' text (the
   memory's state keeps every token id) runs through the model again there (`reread_ids`);
   with `read="quote"` (the default) their text is quoted in the question's own turn, right
   before the question, after the re-read first tokens and local window (`MemoryLM.quote_session`).
   A text read first trims each passage to the sentences the question needs, with one either
   side within their paragraph (`question_sentences`): the rest of a ~270-token passage is
   text a small model answers from instead of the fact.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memlm.memory.attention import rotate
from memlm.store.base import SearchResult

# Profiles measured for the embedded model (`memlm calibrate heads`), shipped in the package.
SHIPPED_PROFILE = Path(__file__).resolve().parent.parent / "adapters" / "heads.json"


@dataclass(frozen=True)
class Passage:
    """A run of document tokens [start, end) that the question's read placed before it."""

    start: int
    end: int
    score: float  # the summed votes of its blocks
    rank: int  # 0 = the best-voted passage


@dataclass
class HeadProfile:
    """How much each (layer, query head)'s vote counts: its rate of finding the evidence
    block among its top blocks on calibration questions. Uniform when none was measured."""

    weights: np.ndarray  # (layers, query heads) float32, >= 0
    source: str = "uniform"  # what measured it (the calibration command), for reports

    @classmethod
    def uniform(cls, num_layers: int, num_heads: int) -> HeadProfile:
        return cls(np.ones((num_layers, num_heads), dtype=np.float32))

    @classmethod
    def load(cls, path: str | Path, num_layers: int, num_heads: int) -> HeadProfile:
        data = json.loads(Path(path).read_text())
        weights = np.asarray(data["weights"], dtype=np.float32)
        if weights.shape != (num_layers, num_heads):
            raise ValueError(
                f"head profile {path} is for {weights.shape[0]} layers x {weights.shape[1]} heads; "
                f"this model has {num_layers} x {num_heads}: run `memlm calibrate heads --model PATH` for it"
            )
        if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() == 0:
            raise ValueError(f"head profile {path}: weights must be finite, >= 0 and not all 0")
        return cls(weights, str(data.get("source", path)))

    def save(self, path: str | Path, **provenance) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"source": self.source, **provenance, "weights": np.round(self.weights, 4).tolist()}
        path.write_text(json.dumps(record, indent=1) + "\n")
        return path


def head_profile(model_name: str, num_layers: int, num_heads: int, path: str | Path | None = None) -> HeadProfile:
    """The profile at `path`; without one, the shipped profile when it was measured on a model
    of this name (the embedded model's), and uniform votes for any other model."""
    if path is None and SHIPPED_PROFILE.is_file():
        if json.loads(SHIPPED_PROFILE.read_text()).get("model") == Path(model_name).name:
            path = SHIPPED_PROFILE
    if path is None:
        return HeadProfile.uniform(num_layers, num_heads)
    return HeadProfile.load(path, num_layers, num_heads)


def question_span(with_question: list[int], without_question: list[int]) -> slice:
    """Where the question's own tokens lie in a templated prompt: what differs between the
    prompt and the same template around an empty question (common prefix and suffix cut)."""
    prefix = 0
    limit = min(len(with_question), len(without_question))
    while prefix < limit and with_question[prefix] == without_question[prefix]:
        prefix += 1
    suffix = 0
    while (
        suffix < limit - prefix
        and with_question[len(with_question) - 1 - suffix] == without_question[len(without_question) - 1 - suffix]
    ):
        suffix += 1
    end = len(with_question) - suffix
    if end <= prefix:
        raise ValueError("the prompt's question has no tokens of its own")
    return slice(prefix, end)


def question_search_keys(queries: torch.Tensor, memory_position: int, inv_freq: torch.Tensor) -> np.ndarray:
    """One search key per query head: the sum of its queries at the question's tokens, turned
    to score blocks as if they sat at `memory_position` (as the per-head read places them).

    queries (Hkv, G, Tq, D), rotated at their own positions -> (Hkv, G, D)
    """
    summed = queries.float().sum(dim=2)
    return rotate(summed, torch.tensor(-memory_position), inv_freq).cpu().numpy()


def add_votes(votes: dict[int, float], found: SearchResult, weights: np.ndarray) -> None:
    """Count one layer's search into `votes` (block start position -> votes). `found` holds
    each query head's top blocks, (Hkv, G, k, B); `weights` (Hkv * G,) that layer's head weights.
    A head's i-th block gets weight / (i + 1): its first choice counts most."""
    heads, group, k = found.scores.shape
    starts = found.positions[..., 0].reshape(heads * group, k)
    rank_weight = 1.0 / np.arange(1, k + 1)
    for head in np.flatnonzero(weights > 0):
        for start, share in zip(starts[head], rank_weight):
            votes[int(start)] += float(weights[head] * share)


ANNOUNCES = re.compile(r":\s*>?\s*$")  # a sentence ending in a colon (Vim's help marks examples with ">")
WORD = re.compile(r"(\W*)(\w+)")  # the gap before a word, and the word: letters, digits, _ in any script


@dataclass(frozen=True)
class Words:
    """The words of a run of tokens, in lower case, each at the position of its first token:
    what a question's words are matched against. A word is a run of letters, digits or _,
    however the tokenizer split it: a name opening a paragraph is "B" + "ram" to the embedded
    model's tokenizer and " Bram" elsewhere, and matched on token ids the question "Bram
    Ivanova" found only the surname, in another needle (the wrong answer at 128k)."""

    text: np.ndarray  # (words,) str
    starts: np.ndarray  # (words,) int64, the token position where each word begins

    @classmethod
    def of(cls, pieces: Sequence[str]) -> Words:
        """The words of tokens whose texts are `pieces`, positions counted from the first."""
        # findall, not finditer: a 128k-token document has ~90k words, and a match object each took 0.3 s.
        gaps_and_words = WORD.findall("".join(pieces))
        gaps = np.fromiter((len(gap) for gap, _ in gaps_and_words), dtype=np.int64, count=len(gaps_and_words))
        lengths = np.fromiter((len(word) for _, word in gaps_and_words), dtype=np.int64, count=len(gaps_and_words))
        first_chars = np.cumsum(gaps + lengths) - lengths
        token_ends = np.cumsum([len(piece) for piece in pieces])
        starts = np.searchsorted(token_ends, first_chars, side="right")
        return cls(np.array([word.lower() for _, word in gaps_and_words], dtype=str), starts.astype(np.int64))

    def holding(self, words: Iterable[str], block_len: int, start: int, end: int) -> dict[str, np.ndarray]:
        """For each of `words`, which of the whole blocks of [start, end) (block_len tokens
        each, in order) hold it: (blocks,) bool."""
        num_blocks = max(0, (end - start) // block_len)
        inside = (self.starts >= start) & (self.starts < start + num_blocks * block_len)
        holds = {}
        for word in set(words):
            blocks = (self.starts[inside & (self.text == word)] - start) // block_len
            holds[word] = np.zeros(num_blocks, dtype=bool)
            holds[word][blocks] = True
        return holds


def term_weights(holding: dict[str, np.ndarray]) -> dict[str, float]:
    """Each of the question's words found in the blocks (`Words.holding`), weighed by its
    inverse block frequency, log((n + 1) / (df + 0.5)) as BM25 weighs terms: a name that
    occurs in one block counts far more than "the"."""
    weights = {}
    for word, holds in holding.items():
        if holds.any():
            weights[word] = float(np.log((len(holds) + 1) / (holds.sum() + 0.5)))
    return weights


# How much an earlier chat turn's words count against the question's own: a follow-up
# ("and where is her team based?") names its subject only in the turns before it.
CONTEXT_WEIGHT = 0.5


def lexical_scores(
    words: Words, question: Sequence[str], block_len: int, grid: int, end: int, context: Sequence[str] = ()
) -> dict[int, float]:
    """Each block's share of the `question`'s words: the sum of the `term_weights` of
    those found in the block or its two neighbours (the words of earlier chat turns,
    `context`, at CONTEXT_WEIGHT). The neighbours count because a sentence
    often straddles two blocks: without them, a block holding the words a question shares
    with every sentence of its kind ("the door code of the ... room") beat the block holding
    the one name that tells them apart. Blocks [grid, end) in steps of block_len (the store's,
    or for the quote read the sinks' and local window's too); only those with a match. The
    memory keeps every token id: this needs nothing from the store."""
    asked = set(question)
    holding = words.holding(asked | set(context), block_len, grid, end)
    scores = np.zeros(max(0, (end - grid) // block_len))
    for word, weight in question_weights(holding, asked).items():
        holds = holding[word]
        near = holds.copy()
        near[1:] |= holds[:-1]
        near[:-1] |= holds[1:]
        scores += near * weight
    # A share of the weight of all the question's words, a word the memory lacks weighing as
    # a word in no block would: a question whose rare words are nowhere scores low everywhere.
    total = sum(question_weights(holding, asked, missing=float(np.log((len(scores) + 1) / 0.5))).values())
    return {grid + i * block_len: float(scores[i] / total) for i in np.flatnonzero(scores > 0)}


def question_weights(holding: dict[str, np.ndarray], asked: set[str], missing: float = 0.0) -> dict[str, float]:
    """Each word's `term_weights` (`missing` for a word in no block), a word of an earlier
    chat turn (not in `asked`, the question's own) at CONTEXT_WEIGHT."""
    found = term_weights(holding)
    return {word: found.get(word, missing) * (1.0 if word in asked else CONTEXT_WEIGHT) for word in holding}


def combine(lexical: dict[int, float], dense: dict[int, float], dense_weight: float) -> dict[int, float]:
    """The first stage's blocks scored by both rankings: `dense_weight` of the dense index's
    similarity (each block's best window; the weakest one fetched for blocks it did not
    fetch) and the rest of the lexical share (`lexical_scores`, 0 where no word matched). A
    question that names its fact's rare words is decided by them; one that paraphrases it,
    by its embedding. Reciprocal rank fusion weighed both alike, and among look-alike facts
    ("the access code for the ...") the embedding's favourite beat the one the name picks."""
    floor = min(dense.values(), default=0.0)
    return {block: dense_weight * dense.get(block, floor) + (1 - dense_weight) * lexical.get(block, 0.0)
            for block in lexical.keys() | dense.keys()}  # fmt: skip


def sentence_starts(pieces: Sequence[str]) -> tuple[list[int], set[int]]:
    """Where sentences begin in a run of tokens (each token's text, `pieces`), and which of
    them also begin a paragraph. A sentence begins at 0, and at the first token with text
    after . ! or ? and white space, or after a blank line (which begins a paragraph too). A
    single newline ends none: manuals wrap their sentences over lines. White space between
    two sentences stays with the first."""
    starts, paragraphs = [0], {0}
    before = pieces[0] if pieces else ""
    for i in range(1, len(pieces)):
        piece = pieces[i]
        if piece.strip():
            gap = before[len(before.rstrip()) :] + piece[: len(piece) - len(piece.lstrip())]
            blank_line = gap.count("\n") >= 2
            if blank_line or (before.rstrip().endswith((".", "!", "?")) and gap != ""):
                starts.append(i)
            if blank_line:
                paragraphs.add(i)
        before = (before + piece)[-32:]  # enough to see the white space and the stop before a token
    return starts, paragraphs


def question_sentences(
    passage: Passage,
    pieces: Sequence[str],
    weights: dict[str, float],
    similarity: Callable[[list[str]], np.ndarray] | None = None,
) -> list[Passage]:
    """The sentences of `passage` (its tokens' texts, `pieces`) that a question
    with these `term_weights` needs: those holding at least half the weight of the best one,
    and, given a `similarity` (sentence texts -> their similarity to the question, as the
    dense index measures it), the most similar one: a paraphrased question shares no rare word
    with its answer's sentence. Each with the sentence before and the one after it in its
    paragraph (an answer often lies next to the sentence that names its subject: "There is a
    special command for this: :wnext"); as runs of consecutive sentences, each a Passage with
    the passage's score and rank. The whole passage when nothing picks a sentence. Neighbours
    stop at a blank line: across one, they are about something else, and a small model
    answered from them ("The OLE mechanism will use the first registered Vim it finds." for
    the city the needle before it named)."""
    starts, paragraphs = sentence_starts(pieces)
    bounds = list(zip(starts, [*starts[1:], len(pieces)]))
    words = Words.of(pieces)
    in_sentence = [set(words.text[(words.starts >= a) & (words.starts < b)]) for a, b in bounds]
    held = [sum(weights.get(word, 0.0) for word in found) for found in in_sentence]
    best = max(held)
    picked = {i for i, weight in enumerate(held) if best > 0 and weight >= best / 2}
    if similarity is not None:
        texts = ["".join(pieces[a:b]).strip() for a, b in bounds]
        scores = np.where([bool(text) for text in texts], similarity(texts), -np.inf)
        picked.add(int(np.argmax(scores)))
    if not picked:
        return [passage]
    kept = set()
    for i in picked:
        kept.add(i)
        if starts[i] not in paragraphs:
            kept.add(i - 1)
        if i + 1 < len(bounds) and starts[i + 1] not in paragraphs:
            kept.add(i + 1)
    # A sentence that ends announcing what follows ("It is: >" and the command on its own
    # line, in manuals) keeps what follows, blank line or not: that is usually the answer.
    for i in sorted(kept):
        if i + 1 < len(bounds) and ANNOUNCES.search("".join(pieces[slice(*bounds[i])])):
            kept.add(i + 1)
    positions = [passage.start + t for i in sorted(kept) for t in range(*bounds[i])]
    return [Passage(start, end, passage.score, passage.rank) for start, end in runs(positions)]


def fuse(rankings: Sequence[dict[int, float]], k: int = 60) -> dict[int, float]:
    """Reciprocal rank fusion (Cormack et al. 2009): each ranking gives its i-th block
    1 / (k + i); a block high in both beats one high in either alone."""
    fused: defaultdict[int, float] = defaultdict(float)
    for scores in rankings:
        for rank, start in enumerate(sorted(scores, key=lambda block: (-scores[block], block))):
            fused[start] += 1.0 / (k + rank)
    return dict(fused)


def select_passages(
    votes: dict[int, float], block_len: int, num_blocks: int, context: int, doc_len: int, grid: int = 0
) -> list[Passage]:
    """The `num_blocks` best-voted blocks, each widened by `context` tokens on either side to
    whole blocks (blocks start at `grid` + a multiple of `block_len`: what the store holds),
    overlapping or touching ones merged; in document order, ranked by their best block's votes."""

    def block_start(position: int) -> int:  # the start of the block holding `position`
        return position if position < grid else grid + (position - grid) // block_len * block_len

    def block_end(position: int) -> int:  # the end of the block holding `position - 1`
        return position if position <= grid else grid + -(-(position - grid) // block_len) * block_len

    best = sorted(votes.items(), key=lambda item: (-item[1], item[0]))[:num_blocks]
    spans = sorted(
        (block_start(max(0, start - context)), min(doc_len, block_end(start + block_len + context)), score, rank)
        for rank, (start, score) in enumerate(best)
    )
    merged: list[list] = []
    for start, end, score, rank in spans:
        if merged and start <= merged[-1][1]:
            last = merged[-1]
            last[1], last[2], last[3] = max(last[1], end), last[2] + score, min(last[3], rank)
        else:
            merged.append([start, end, score, rank])
    # Passages ranked by their best block; a passage's rank is its place in that order.
    order = sorted(range(len(merged)), key=lambda i: merged[i][3])
    ranks = {index: place for place, index in enumerate(order)}
    return [Passage(int(s), int(e), float(score), ranks[i]) for i, (s, e, score, _) in enumerate(merged)]


def reread_ids(token_ids: list[int], kept_positions: list[int], passages: list[Passage], separator: list[int]) -> list[int]:
    """The text the question reads: the tokens at `kept_positions` (the document's first
    tokens and its local window) and the passages', in document order, with `separator`
    where the document skips ahead."""
    positions = sorted(set(kept_positions).union(*(range(p.start, p.end) for p in passages)))
    ids: list[int] = []
    for i, position in enumerate(positions):
        if i > 0 and position != positions[i - 1] + 1:
            ids.extend(separator)
        ids.append(token_ids[position])
    return ids


def token_spans(tokenizer, document: str, sentences: Sequence[str]) -> list[tuple[int, int]]:
    """Token positions [start, end) of each sentence's first occurrence in `document`, as
    `MemoryLM.ingest` tokenizes it (no special tokens)."""
    offsets = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ends = np.array([end for _, end in offsets])
    starts = np.array([start for start, _ in offsets])
    spans = []
    for sentence in sentences:
        at = document.find(sentence)
        if at < 0:
            raise ValueError(f"evidence {sentence!r} is not in the document")
        inside = np.flatnonzero((starts < at + len(sentence)) & (ends > at))
        spans.append((int(inside[0]), int(inside[-1]) + 1))
    return spans


def runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted token positions as runs [start, end) of consecutive ones."""
    found: list[tuple[int, int]] = []
    for position in positions:
        if found and position == found[-1][1]:
            found[-1] = (found[-1][0], position + 1)
        else:
            found.append((position, position + 1))
    return found


def evidence_found(
    passages: list[Passage], in_view: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> tuple[int | None, bool]:
    """(rank, read): whether every evidence span was in front of the model, in a passage the
    read placed there or in what is always in view (the sinks and the local window), and the
    worst rank among the passages that brought it (None when none was needed or it was missed)."""
    in_window = [any(start <= a and b <= end for start, end in in_view) for a, b in spans]
    from_memory = [span for span, seen in zip(spans, in_window) if not seen]
    rank = evidence_rank(passages, from_memory) if from_memory else None
    return rank, not from_memory or rank is not None


def evidence_rank(passages: list[Passage], spans: Sequence[tuple[int, int]]) -> int | None:
    """Whether the read placed every evidence span [start, end) in front of the model: the
    worst rank among the passages holding them, or None when one was not read whole."""
    ranks = []
    for start, end in spans:
        holding = [p.rank for p in passages if p.start <= start and end <= p.end]
        if not holding:
            return None
        ranks.append(min(holding))
    return max(ranks) if ranks else None


def new_votes() -> defaultdict[int, float]:
    return defaultdict(float)
