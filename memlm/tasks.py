"""Generated long-context tasks with checkable answers, deterministic under a seed.

Every generator takes a length in tokens (approximate: the text is sized by characters with
a measured tokens-per-character ratio of the embedded model's tokenizer) and a seed, and
returns `Task`s: a document, a question about it, the expected answer and where in the
document (0 = start, 1 = end) the fact that answers it sits. Generators that can carry
several questions on one document take a list of depths and return one task per depth, so
that a benchmark ingests a document once and asks it several things.

- `passkey`: a 5-digit key hidden at a chosen depth in repeated filler (Landmark Attention,
  Focused Transformer evaluations).
- `kv_lines`: LongChat-Lines key-value retrieval, `line <words>: REGISTER_CONTENT is <n>`
  lines, one of them asked for.
- `multi_needle`: several "special magic number" facts in prose (RULER's multi-key and
  multi-value needles); ask for one of them, or for all at once.
- `babilong`: bAbI facts (who went where, who picked up what) scattered in long narrative
  filler, as BABILong does with PG-19 books: single-fact and two-fact questions.
- `handbook`: a fictional company handbook with facts (who leads which team, which room,
  which code) scattered through long, varied prose; the document-QA demo's default input
  and the suite's free-form document-QA task.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

# Tokens per character of the embedded model's tokenizer, measured on these generators' text
# (16k-token documents); a document's true length is counted by whoever tokenizes it.
PROSE_TOKENS_PER_CHAR = 0.215
LINES_TOKENS_PER_CHAR = 0.55

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class Task:
    document: str  # what is ingested into memory
    question: str  # what is asked afterwards
    answer: str  # the expected answer (a whole-word match scores it)
    depth: float = 0.0  # where the fact sits in the document, 0 = start, 1 = end
    prompt: str | None = None  # raw continuation prompt (no chat template), when the task has one
    kind: str = ""  # which task this is ("passkey", "kv-lines", "babilong-2fact", ...)
    # Every one of these must appear (a question asking for several facts at once); the
    # answer is then their join, for display.
    answers: tuple[str, ...] = ()
    # Other values the document offers for the same kind of question (the other rooms, the
    # other numbers): an output that names one of them before the answer is wrong, so that
    # listing every candidate does not count as knowing which one is right.
    distractors: tuple[str, ...] = ()
    # New tokens enough to hold the answer: through the chat template the model first restates
    # the question ("The pass key is ..."), and a budget cut to the bare answer scored right
    # codes wrong halfway ("The access code for the server room is RW9Z3" for RW9Z36).
    answer_tokens: int = 24
    # The sentences of the document worth noting, in document order, as written there: what
    # an rmt memory is trained to write down (memlm/train/methods.py).
    facts: tuple[str, ...] = ()
    # The document's sentences that answer the question, as written there: what a memory's
    # read must place in front of the model (evidence recall, memlm/memory/reading.py `evidence_found`).
    evidence: tuple[str, ...] = ()

    def score(self, output: str) -> bool:
        if self.answers:
            return all(score_answer(output, answer) for answer in self.answers)
        return score_answer(output, self.answer, self.distractors)


def score_answer(output: str, answer: str, distractors: Sequence[str] = ()) -> bool:
    """Right when the answer appears in the output as a whole word or number, case aside,
    and no distractor appears before it."""
    first = _first_match(output, answer)
    if first is None:
        return False
    return all((at := _first_match(output, other)) is None or at > first for other in distractors if other != answer)


def _first_match(output: str, word: str) -> int | None:
    found = re.search(rf"(?<![\w]){re.escape(word.lower())}(?![\w])", output.lower())
    return None if found is None else found.start()


def passkey(num_tokens: int, depth: float, seed: int, tokens_per_char: float = 0.25) -> Task:
    """About `num_tokens` tokens of filler with the pass key line at `depth` (0..1)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    repeats = max(1, int(num_tokens / (len(FILLER) * tokens_per_char)))
    before = int(repeats * depth)
    document = FILLER * before + needle + FILLER * (repeats - before)
    question = "What is the pass key?"
    return Task(document, question, key, depth, prompt="What is the pass key? The pass key is", kind="passkey",
                facts=(f"The pass key is {key}.",), evidence=(f"The pass key is {key}.",))


def _scatter(filler: list[str], facts: list[tuple[float, str]]) -> str:
    """Filler sentences with each fact sentence put between them at its depth (0..1)."""
    sentences = list(filler)
    # From the deepest fact up, so that earlier insertions do not shift later indices.
    for depth, fact in sorted(facts, key=lambda item: item[0], reverse=True):
        sentences.insert(round(depth * len(filler)), fact)
    return " ".join(sentences)


# -- LongChat-Lines ---------------------------------------------------------------------------

LINE_WORDS = [
    "amber", "brisk", "candid", "dapper", "eager", "fabled", "gentle", "hollow", "idle", "jolly", "keen", "lucid",
    "mellow", "nimble", "oaken", "placid", "quaint", "rustic", "silent", "tidy", "upbeat", "vivid", "wistful",
    "zesty", "anchor", "beacon", "cactus", "dynamo", "ember", "fjord", "garnet", "harbor", "igloo", "jigsaw",
    "kettle", "lantern", "meadow", "nectar", "orbit", "pepper", "quiver", "rocket", "saddle", "thimble", "umbra",
    "velvet", "walnut", "yonder",
]  # fmt: skip


def kv_lines(
    num_tokens: int, depths: Sequence[float], seed: int, tokens_per_char: float = LINES_TOKENS_PER_CHAR
) -> list[Task]:
    """LongChat-Lines: about `num_tokens` tokens of `line <a-b-c>: REGISTER_CONTENT is <n>`
    lines under a short preamble; one question per depth, each about the line there."""
    rng = random.Random(seed)
    num_lines = max(len(depths) + 1, int(num_tokens / tokens_per_char / 45))  # a line is ~45 characters
    names: set[str] = set()
    while len(names) < num_lines:  # 48**3 names: always enough distinct ones
        names.add("-".join(rng.choice(LINE_WORDS) for _ in range(3)))
    keys = sorted(names)
    rng.shuffle(keys)
    values = [str(rng.randint(10000, 99999)) for _ in keys]
    lines = [f"line {key}: REGISTER_CONTENT is <{value}>" for key, value in zip(keys, values)]
    preamble = (
        "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
        "contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, "
        "memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve "
        "the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n"
    )
    document = preamble + "\n".join(lines) + "\n"
    tasks = []
    for depth in depths:
        at = min(num_lines - 1, int(depth * num_lines))
        key, value = keys[at], values[at]
        question = f"What is the <REGISTER_CONTENT> in line {key}?"
        # Any other line's value is a wrong answer, however close the line.
        others = tuple(v for v in values if v != value)
        prompt = f"{question} line {key}: REGISTER_CONTENT is <"
        tasks.append(Task(document, question, value, at / num_lines, prompt, kind="kv-lines", distractors=others,
                          evidence=(lines[at],)))
    return tasks


# -- prose filler (multi-needle, BABILong) -----------------------------------------------------

WALKERS = ["the old captain", "a tired traveller", "the miller's daughter", "the schoolteacher", "a young clerk",
           "the ferryman", "the baker", "an elderly poet", "the blacksmith", "a quiet stranger"]
SIGHTS = ["the river", "the hills", "the harbour lights", "the orchard", "the bell tower", "the frozen lake",
          "the market square", "the pine forest", "the long road", "the lighthouse"]
PROSE = [
    "{who} looked out at {what} and thought about the years that had passed.",
    "The wind came down from {what}, cold and smelling of rain.",
    "Nobody in the village could remember a winter as long as that one.",
    "{who} wrote a long letter that evening and never sent it.",
    "There was talk of a fair in the spring, and of new roads, and of money that never came.",
    "{who} said little, but listened to every story about {what}.",
    "The days grew shorter, and the lamps were lit earlier each week.",
    "By noon the fog had lifted from {what}, and the carts began to move again.",
    "Some said the old ways were better; others only laughed and went back to work.",
    "{who} counted the coins twice and put them away in a tin box.",
    "A dog barked somewhere near {what}, and then everything was quiet.",
    "It was the kind of evening when every sound seemed to carry for miles.",
    "{who} had promised to fix the fence before the first snow.",
    "The newspaper spoke of storms at sea and of prices rising in the towns.",
    "Every Sunday {who} walked as far as {what} and back.",
    "The harvest was poor that year, though nobody wanted to say so aloud.",
]  # fmt: skip


def prose(rng: random.Random, num_chars: int) -> list[str]:
    """Narrative filler sentences (about `num_chars` characters) that state no task facts."""
    sentences: list[str] = []
    length = 0
    while length < num_chars:
        sentence = rng.choice(PROSE).format(who=rng.choice(WALKERS), what=rng.choice(SIGHTS))
        sentences.append(sentence[0].upper() + sentence[1:])
        length += len(sentence) + 1
    return sentences


# -- multi-needle -----------------------------------------------------------------------------

NEEDLE_KEYS = ["Tromso", "Valparaiso", "Kigali", "Ljubljana", "Hobart", "Cusco", "Tartu", "Oaxaca", "Bergen", "Hue",
               "Quito", "Dunedin", "Windhoek", "Galway", "Izmir", "Lagos"]  # fmt: skip


def multi_needle(
    num_tokens: int, depths: Sequence[float], seed: int, tokens_per_char: float = PROSE_TOKENS_PER_CHAR
) -> list[Task]:
    """One "special magic number" needle per depth in about `num_tokens` tokens of prose.
    Returns a question per needle (kind "multi-needle-one"; the other needles' numbers are
    its distractors) and one asking for all of them (kind "multi-needle-all", at the depth
    of the first needle, as in LangChain's multi-needle test)."""
    rng = random.Random(seed)
    keys = rng.sample(NEEDLE_KEYS, len(depths))
    numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    needles = [f"The special magic number for {key} is {number}." for key, number in zip(keys, numbers)]
    document = _scatter(prose(rng, int(num_tokens / tokens_per_char)), list(zip(depths, needles)))
    tasks = []
    for key, number, depth, needle in zip(keys, numbers, depths, needles):
        question = f"What is the special magic number for {key}?"
        tasks.append(Task(document, question, number, depth, prompt=f"{question} The special magic number for {key} is",
                          kind="multi-needle-one", distractors=tuple(n for n in numbers if n != number),
                          evidence=(needle,)))  # fmt: skip
    listed = ", ".join(keys[:-1]) + f" and {keys[-1]}" if len(keys) > 1 else keys[0]
    question = f"What are the special magic numbers for {listed}?"
    tasks.append(Task(document, question, ", ".join(numbers), min(depths),
                      prompt=f"{question} The special magic numbers for {listed} are", kind="multi-needle-all",
                      answers=tuple(numbers), answer_tokens=12 * len(keys), evidence=tuple(needles)))  # fmt: skip
    return tasks


# -- BABILong ---------------------------------------------------------------------------------

PEOPLE = ["Mary", "John", "Sandra", "Daniel", "Julie", "Fred", "Bill", "Emily"]
ROOMS = ["kitchen", "garden", "hallway", "bathroom", "bedroom", "office"]
THINGS = ["apple", "football", "milk", "book", "key", "umbrella"]
MOVES = ["went to", "travelled to", "journeyed to", "moved to"]


def babilong(
    num_tokens: int, depths: Sequence[float], seed: int, tokens_per_char: float = PROSE_TOKENS_PER_CHAR
) -> list[Task]:
    """bAbI facts in about `num_tokens` tokens of narrative filler, one question per depth,
    alternating (by seed) between the single-fact question ("Mary went to the kitchen. ...
    Where is Mary?", kind "babilong-1fact") and the two-fact one ("Mary picked up the apple.
    ... Mary went to the kitchen. ... Where is the apple?", kind "babilong-2fact", its second
    fact deeper than the first). Each question has its own person; every other room named
    in the document is a distractor."""
    rng = random.Random(seed)
    people = rng.sample(PEOPLE, len(depths))
    things = rng.sample(THINGS, len(depths))
    rooms = [rng.choice(ROOMS) for _ in depths]
    first_kind = rng.randrange(2)
    facts: list[tuple[float, str]] = []
    questions: list[tuple[str, str, str, float, str, tuple[str, ...]]] = []  # (kind, question, prompt, depth, room, evidence)
    for i, (person, thing, room, depth) in enumerate(zip(people, things, rooms, depths)):
        move = f"{person} {rng.choice(MOVES)} the {room}."
        if (i + first_kind) % 2 == 0:
            facts.append((depth, move))
            question = f"Where is {person}?"
            prompt = f"Question: {question}\nAnswer: {person} is in the"
            questions.append(("babilong-1fact", question, prompt, depth, room, (move,)))
        else:
            later = depth + (1 - depth) * rng.uniform(0.2, 0.6)
            picked = f"{person} picked up the {thing}."
            facts += [(depth, picked), (later, move)]
            question = f"Where is the {thing}?"
            prompt = f"Question: {question}\nAnswer: The {thing} is in the"
            questions.append(("babilong-2fact", question, prompt, depth, room, (picked, move)))
    document = _scatter(prose(rng, int(num_tokens / tokens_per_char)), facts)
    noted = tuple(fact for _, fact in sorted(facts, key=lambda item: item[0]))
    return [
        Task(document, question, room, depth, prompt=prompt, kind=kind,
             distractors=tuple(sorted(set(rooms) - {room})), facts=noted, evidence=evidence)  # fmt: skip
        for kind, question, prompt, depth, room, evidence in questions
    ]


# -- the handbook ---------------------------------------------------------------------------

FIRST = ["Ada", "Bram", "Chiara", "Dmitri", "Elif", "Farah", "Goran", "Hana", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sami", "Tove", "Umar", "Vera", "Wim", "Yara"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Haddad", "Silva", "Kowalski", "Brennan", "Costa",
        "Ivanova", "Mensah", "Fischer", "Duarte", "Sato", "Berger", "Nakamura", "Petrov", "Rahman", "Vidal"]
TEAMS = ["Orchid", "Basalt", "Heron", "Quartz", "Juniper", "Falcon", "Cobalt", "Maple", "Tundra", "Saffron",
         "Lynx", "Coral", "Granite", "Willow", "Comet", "Ember"]
CITIES = ["Tromso", "Valparaiso", "Kigali", "Ljubljana", "Hobart", "Cusco", "Tartu", "Oaxaca", "Bergen", "Hue"]
TOPICS = [
    "how expenses are filed", "the review cycle", "on-call duties", "the travel policy", "security badges",
    "the coffee rota", "laptop refresh rules", "the quiet-hours policy", "incident write-ups", "the library",
]
SENTENCES = [
    "Every request must be written down before it is approved, and approvals are kept for seven years.",
    "New staff shadow a colleague for their first two weeks and meet the people who run {topic}.",
    "Questions about {topic} go to the shared inbox, which is read twice a day.",
    "The rules on {topic} were last revised after a long discussion at the spring meeting.",
    "Exceptions are possible, but they need a short note that explains why the usual path does not fit.",
    "Teams are encouraged to keep their notes short, dated and in plain language.",
    "Most disagreements are settled in the weekly planning call, where anyone may add an item.",
    "The handbook is a living document; anyone may propose a change through the usual channel.",
    "Meeting rooms are booked through the front desk, and unused bookings are released after ten minutes.",
    "When in doubt about {topic}, ask a colleague before you ask a manager.",
]


@dataclass
class HandbookFact:
    question: str
    answer: str
    sentence: str
    kind: str  # "lead", "city" or "code": facts of one kind are each other's distractors


def handbook(
    num_tokens: int,
    seed: int,
    num_facts: int = 8,
    tokens_per_char: float = PROSE_TOKENS_PER_CHAR,
    depths: Sequence[float] | None = None,
) -> tuple[str, list[Task]]:
    """A fictional handbook of about `num_tokens` tokens and free-form questions (kind
    "docqa", no raw prompt) about facts in it: `num_facts` of them spread from 5% to 85% of
    the document, or one at each of `depths`."""
    if depths is not None:
        num_facts = len(depths)
    rng = random.Random(seed)
    teams = rng.sample(TEAMS, num_facts)
    facts: list[HandbookFact] = []
    for team in teams:
        lead = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        kind = rng.choice(["lead", "city", "code"])
        if kind == "lead":
            facts.append(HandbookFact(f"Who leads the {team} team?", lead, f"The {team} team is led by {lead}. ", kind))
        elif kind == "city":
            city = rng.choice(CITIES)
            facts.append(HandbookFact(f"In which city is the {team} team based?", city,
                                      f"The {team} team is based in the {city} office. ", kind))
        else:
            code = str(rng.randint(1000, 9999))
            facts.append(HandbookFact(f"What is the door code of the {team} team's room?", code,
                                      f"The door code of the {team} team's room is {code}. ", kind))
    target_chars = int(num_tokens / tokens_per_char)
    sections: list[str] = []
    length = 0
    while length < target_chars:
        topic = rng.choice(TOPICS)
        body = " ".join(rng.choice(SENTENCES).format(topic=topic) for _ in range(rng.randint(4, 8)))
        section = f"\n\nSection {len(sections) + 1}: on {topic}.\n{body} "
        sections.append(section)
        length += len(section)
    # By default spread the facts evenly from 5% to 85% of the document, inside sections.
    if depths is None:
        depths = [0.05 + 0.8 * i / max(1, num_facts - 1) for i in range(num_facts)]
    slots = [min(len(sections) - 1, int(len(sections) * depth)) for depth in depths]
    for fact, slot in zip(facts, slots):
        sections[slot] += fact.sentence
    document = "Handbook of the Northwind Cooperative.\n" + "".join(sections)
    tasks = [
        Task(document, f.question, f.answer, slot / len(sections), kind="docqa", answer_tokens=32,
             distractors=tuple(other.answer for other in facts if other.kind == f.kind and other.answer != f.answer),
             evidence=(f.sentence.strip(),))
        for f, slot in zip(facts, slots)
    ]  # fmt: skip
    return document, tasks


# -- needles in real prose ------------------------------------------------------------------

VIM_TOKENS_PER_CHAR = 0.24  # the embedded model's tokenizer on the Vim manual's prose
CODE_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O or 1/I to confuse
PLACES = ["server room", "archive", "bicycle shed", "north gate", "tool cabinet", "rooftop terrace", "print room",
          "wine cellar", "boat house", "radio mast", "music studio", "loading dock"]  # fmt: skip
JOBS = ["nurse", "baker", "carpenter", "pilot", "librarian", "chemist", "gardener", "translator", "welder", "potter"]


def access_code(rng: random.Random) -> str:
    """Six characters mixing letters and digits (at least two of each), e.g. 7QK4M2."""
    while True:
        code = "".join(rng.choice(CODE_CHARS) for _ in range(6))
        if sum(c.isdigit() for c in code) >= 2 and sum(c.isalpha() for c in code) >= 2:
            return code


def real_prose(rng: random.Random, num_chars: int) -> list[str]:
    """About `num_chars` characters of consecutive Vim-manual paragraphs from a random start."""
    from memlm.corpus import vim_manual

    paragraphs = vim_manual()
    at = rng.randrange(len(paragraphs))
    taken: list[str] = []
    length = 0
    while length < num_chars:
        taken.append(paragraphs[at % len(paragraphs)])
        length += len(taken[-1]) + 2
        at += 1
    return taken


def prose_needles(
    num_tokens: int, depths: Sequence[float], seed: int, tokens_per_char: float = VIM_TOKENS_PER_CHAR
) -> list[Task]:
    """Needles phrased as ordinary sentences in about `num_tokens` tokens of the Vim manual,
    one per depth, alternating (from the first) between an access code that mixes letters and
    digits ("The access code for the archive is 7QK4M2.", kind "prose-passkey"; the other
    codes are its distractors) and a single fact about a person ("Lena Sato moved to Tartu
    last spring to work as a baker.", kind "prose-fact"). Each question names its own place
    or person."""
    rng = random.Random(seed)
    places = rng.sample(PLACES, len(depths))
    names = rng.sample([f"{first} {last}" for first in FIRST for last in LAST], len(depths))
    codes = [access_code(rng) for _ in depths]
    paragraphs = real_prose(rng, int(num_tokens / tokens_per_char))
    needles: list[tuple[float, str]] = []
    made: list[tuple[str, str, str, str, float, str]] = []  # (kind, question, prompt, answer, depth, needle)
    for i, (depth, place, name, code) in enumerate(zip(depths, places, names, codes)):
        if i % 2 == 0:
            needle = f"The access code for the {place} is {code}."
            question = f"What is the access code for the {place}?"
            made.append(("prose-passkey", question, f"{question} The access code for the {place} is", code, depth, needle))
        else:
            city = rng.choice(CITIES)
            needle = f"{name} moved to {city} last spring to work as a {rng.choice(JOBS)}."
            question = f"Which city did {name} move to?"
            made.append(("prose-fact", question, f"{question} {name} moved to", city, depth, needle))
        needles.append((depth, needle))
    for depth, needle in sorted(needles, reverse=True):  # deepest first: earlier inserts shift nothing
        paragraphs.insert(round(depth * len(paragraphs)), needle)
    document = "\n\n".join(paragraphs)
    used_codes = [answer for kind, *_, answer, _, _ in made if kind == "prose-passkey"]
    return [
        Task(document, question, answer, depth, prompt=prompt, kind=kind, evidence=(needle,), answer_tokens=32,
             distractors=tuple(c for c in used_codes if c != answer) if kind == "prose-passkey" else ())
        for kind, question, prompt, answer, depth, needle in made
    ]  # fmt: skip
