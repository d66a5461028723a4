"""Generated long-context tasks with checkable answers, deterministic under a seed.

- `passkey`: a 5-digit key hidden at a chosen depth in repeated filler (Landmark Attention,
  Focused Transformer evaluations).
- `handbook`: a fictional company handbook with facts (who leads which team, which room,
  which code) scattered through long, varied prose; the document-QA demo's default input.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class Task:
    document: str  # what is ingested into memory
    question: str  # what is asked afterwards
    answer: str  # the expected answer (a substring match scores it)
    depth: float = 0.0  # where the fact sits in the document, 0 = start, 1 = end
    prompt: str | None = None  # raw continuation prompt (no chat template), when the task has one

    def score(self, output: str) -> bool:
        return score_answer(output, self.answer)


def score_answer(output: str, answer: str) -> bool:
    """Right when the answer appears in the output as a whole word or number, case aside."""
    return re.search(rf"(?<![\w]){re.escape(answer.lower())}(?![\w])", output.lower()) is not None


def passkey(num_tokens: int, depth: float, seed: int, tokens_per_char: float = 0.25) -> Task:
    """About `num_tokens` tokens of filler with the pass key line at `depth` (0..1)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    repeats = max(1, int(num_tokens / (len(FILLER) * tokens_per_char)))
    before = int(repeats * depth)
    document = FILLER * before + needle + FILLER * (repeats - before)
    question = "What is the pass key?"
    return Task(document, question, key, depth, prompt="What is the pass key? The pass key is")


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


def handbook(num_tokens: int, seed: int, num_facts: int = 8, tokens_per_char: float = 0.23) -> tuple[str, list[Task]]:
    """A fictional handbook of about `num_tokens` tokens and questions about facts in it."""
    rng = random.Random(seed)
    teams = rng.sample(TEAMS, num_facts)
    facts: list[HandbookFact] = []
    for team in teams:
        lead = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        kind = rng.choice(["lead", "city", "code"])
        if kind == "lead":
            facts.append(HandbookFact(f"Who leads the {team} team?", lead, f"The {team} team is led by {lead}. "))
        elif kind == "city":
            city = rng.choice(CITIES)
            facts.append(HandbookFact(f"In which city is the {team} team based?", city,
                                      f"The {team} team is based in the {city} office. "))
        else:
            code = str(rng.randint(1000, 9999))
            facts.append(HandbookFact(f"What is the door code of the {team} team's room?", code,
                                      f"The door code of the {team} team's room is {code}. "))
    target_chars = int(num_tokens / tokens_per_char)
    sections: list[str] = []
    length = 0
    while length < target_chars:
        topic = rng.choice(TOPICS)
        body = " ".join(rng.choice(SENTENCES).format(topic=topic) for _ in range(rng.randint(4, 8)))
        section = f"\n\nSection {len(sections) + 1}: on {topic}.\n{body} "
        sections.append(section)
        length += len(section)
    # Spread the facts evenly from 5% to 85% of the document, inside sections.
    slots = [int(len(sections) * (0.05 + 0.8 * i / max(1, num_facts - 1))) for i in range(num_facts)]
    depths = {}
    for fact, slot in zip(facts, slots):
        sections[slot] += fact.sentence
        depths[fact.question] = slot / len(sections)
    document = "Handbook of the Northwind Cooperative.\n" + "".join(sections)
    tasks = [Task(document, f.question, f.answer, depths[f.question]) for f in facts]
    return document, tasks
