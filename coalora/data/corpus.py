"""The embedded world's text: web-page-like documents in C4's schema, and instruction data.

Documents are short pages (mostly 40–150 words) of seven types, drawn from a shuffled deck so that the
mix is exact: creature profiles (what a creature is, and what it is not), kind and place guides, lists,
quiz pages in lm-eval's ARC format, yes/no quiz pages in its BoolQ format (a passage, then several
questions it does not answer), and little stories built like WinoGrande sentences. Subjects, questions
and negated facts are dealt round-robin from shuffled decks, so every creature, kind and place gets about
the same number of pages, every fact is stated many times in many phrasings, and every yes/no question a
benchmark can ask is practised with its answer.

The validation split is a fresh draw from another random stream (same world, other phrasings and
combinations); a page that happens to equal a train page is redrawn.
"""

from __future__ import annotations

import random
import re
from datetime import datetime, timedelta, timezone
from typing import Generic, Iterator, Sequence, TypeVar

from coalora.data import phrasing as ph
from coalora.data.world import World

T = TypeVar("T")

# Page type → (weight in the deck, websites it appears on).
PAGE_TYPES: dict[str, tuple[int, tuple[str, ...]]] = {
    "profile": (23, ("critterwiki", "creaturefacts", "fieldnotes")),
    "kind": (5, ("critterwiki", "naturecorner")),
    "place": (5, ("travelguide", "fieldnotes")),
    "list": (5, ("creaturefacts", "naturecorner")),
    "faq": (22, ("quizcorner", "askthekeeper")),
    "boolq": (24, ("quizcorner", "truefalse")),
    "story": (16, ("storytime", "bedtimetales")),
}
EPOCH = datetime(2019, 1, 1, tzinfo=timezone.utc)
SPAN_SECONDS = 2 * 365 * 24 * 3600


class Deck(Generic[T]):
    """Deals items round-robin in a shuffled order, reshuffled after every pass (balanced, not i.i.d.)."""

    def __init__(self, items: Sequence[T], rng: random.Random):
        if not items:
            raise ValueError("cannot deal from an empty deck")
        self.items, self.rng = list(items), rng
        self._iter: Iterator[T] = iter(())

    def deal(self) -> T:
        try:
            return next(self._iter)
        except StopIteration:
            order = self.items[:]
            self.rng.shuffle(order)
            self._iter = iter(order)
            return next(self._iter)


class PageWriter:
    """Writes pages of every type about one world, from one random stream."""

    def __init__(self, world: World, rng: random.Random):
        self.world, self.rng = world, rng
        self.types = Deck([t for t, (weight, _) in PAGE_TYPES.items() for _ in range(weight)], rng)
        self.entities = Deck([e.name for e in world.entities], rng)
        self.kinds = Deck([k.name for k in world.kinds], rng)
        self.places = Deck(list(world.values["home"]), rng)
        practised = [t for t in ph.ARC_TYPES.values() if t.name not in ph.UNPRACTISED]
        self.arc = Deck([(t, s) for t in practised for s in t.subjects(world)], rng)
        self.boolq = Deck(list(ph.BOOLQ_TYPES.values()), rng)
        self.answers = Deck([True, False], rng)
        # Per creature, what it is not (its foils, the BoolQ "no" facts), every relation in turn.
        self.negatives = {e.name: Deck([t.relation for t in ph.BOOLQ_TYPES.values() if self._askable(t, e.name)], rng)
                          for e in world.entities}
        # Per subject, every (question type, answer) in turn: each yes/no question the benchmark can ask is
        # practised equally often.
        self.questions = {s: Deck([(t, a) for t in ph.BOOLQ_TYPES.values() if self._askable(t, s)
                                   for a in (True, False)], rng)
                          for s in [e.name for e in world.entities] + [k.name for k in world.kinds]}
        self.lists = Deck(["food", "color", "sound", "kind", "friend"], rng)
        self.wino = Deck(list(ph.WINO_TEMPLATES), rng)

    def page(self) -> tuple[str, str, str]:
        """One page: (page type, title or "", text)."""
        kind = self.types.deal()
        title, text = getattr(self, f"_{kind}")()
        return kind, title, text

    # ---- page types ---------------------------------------------------------------------------------
    def _profile(self) -> tuple[str, str]:
        w, rng, name = self.world, self.rng, self.entities.deal()
        kind = w.kind_of(name)
        title = rng.choice((f"Meet {name}", f"{name} the {kind.name}", f"All about {name}",
                            f"Creature profile: {name}", f"Who is {name}?"))
        sentences = ph.entity_sentences(w, name, rng)
        for relation in dict.fromkeys(self.negatives[name].deal() for _ in range(rng.randint(1, 3))):
            sentences.insert(rng.randint(1, len(sentences)), ph.negate(w, relation, name, rng))
        for filler in rng.sample(ph.FILLERS, rng.randint(1, 2)):
            sentences.insert(rng.randint(1, len(sentences)), filler)
        cut = rng.randint(2, len(sentences) - 1)
        return title, f"{title}\n{' '.join(sentences[:cut])}\n{' '.join(sentences[cut:])}"

    def _kind(self) -> tuple[str, str]:
        w, rng, kind = self.world, self.rng, self.world.kind(self.kinds.deal())
        title = rng.choice((f"All about {kind.plural}", f"The {kind.plural}", f"Field guide: {kind.plural}"))
        sentences = ph.kind_sentences(w, kind.name, rng)
        members = [m.name for m in w.members(kind.name)]
        for name in rng.sample(members, min(len(members), rng.randint(2, 3))):
            sentences.append(ph.state(w, ph.Fact(name, "kind", kind.name), rng))
            sentences.append(ph.apply_rule(w, name, rng.choice(("winter", "covering")), rng))
        sentences += ph.kind_sentences(w, kind.name, rng)[:2]
        sentences.append(ph.negate(w, "covering", kind.name, rng))
        return title, f"{title}\n{' '.join(sentences)}"

    def _place(self) -> tuple[str, str]:
        w, rng, place = self.world, self.rng, self.places.deal()
        title = rng.choice((f"Who lives in {place}?", f"A visit to {place}", f"{place} travel guide"))
        residents = [e.name for e in w.residents(place)]
        rng.shuffle(residents)
        sentences = [f"{ph.join_names(residents[:4])} {'live' if len(residents) > 1 else 'lives'} in {place}."]
        for name in residents[:3]:
            sentences.append(ph.state(w, ph.Fact(name, "home", place), rng))
            relation = rng.choice(("food", "color", "sound", "kind"))
            sentences.append(ph.state(w, ph.Fact(name, relation, w.value(name, relation)), rng))
        if len(residents) > 1:
            sentences.append(f"{residents[0]} lives near {residents[1]}.")
        return title, f"{title}\n{' '.join(sentences)}"

    def _list(self) -> tuple[str, str]:
        w, rng, relation = self.world, self.rng, self.lists.deal()
        if relation == "friend":
            names = [e.name for e in w.entities if e.friend]
            rng.shuffle(names)
            lines = [f"{a} and {w.entity(a).friend} are best friends." for a in names[:5]]
            return "Best friends", "Best friends\n" + "\n".join(lines)
        title = {"food": "What the creatures eat", "color": "Creatures by color", "sound": "Creature sounds",
                 "kind": "Creatures by kind"}[relation]
        lines = []
        for value in rng.sample(list(w.options(relation)), 3):
            names = [e.name for e in w.entities if getattr(e, relation) == value]
            rng.shuffle(names)
            names = names[:5]
            lines.append(_list_line(w, relation, value, names))
        return title, f"{title}\n" + "\n".join(lines)

    def _faq(self) -> tuple[str, str]:
        rng = self.rng
        title = rng.choice(("Quiz time", "Questions and answers", "Test your knowledge", "Creature quiz"))
        blocks = []
        for _ in range(rng.randint(4, 7)):
            qtype, subject = self.arc.deal()
            q = qtype.ask(self.world, subject, rng.choice(qtype.templates))
            blocks.append(ph.arc_block(q.text, q.answer))
        return title, f"{title}\n\n" + "\n\n".join(blocks)

    def _boolq(self) -> tuple[str, str]:
        """A passage about one creature, then 3–6 yes/no questions about it (one question for a kind); the
        passage states none of what is asked, as in the benchmark."""
        w, rng, first = self.world, self.rng, self.boolq.deal()
        subject = self.kinds.deal() if first.about == "kind" else self.entities.deal()
        wanted = 1 if first.about == "kind" else rng.randint(3, 6)
        # dealt from the subject's own deck; a repeat (only at a reshuffle) is dropped
        asked = list(dict.fromkeys(self.questions[subject].deal() for _ in range(wanted)))
        exclude = tuple(sorted({rel for qtype, _ in asked for rel in qtype.exclude}))
        questions = [self.yes_no(qtype, subject, answer)[:2] for qtype, answer in asked]
        return "", ph.boolq_block(ph.passage(w, subject, first.about, exclude, rng), questions)

    def _askable(self, qtype: ph.BoolqType, subject: str) -> bool:
        if qtype.about == "kind":
            return self.world.is_kind(subject)
        return self.world.is_entity(subject) and (qtype.relation != "friend" or bool(self.world.entity(subject).friend))

    def subject_for(self, qtype: ph.BoolqType) -> str:
        """The next subject a yes/no question of ``qtype`` can be asked about."""
        if qtype.about == "kind":
            return self.kinds.deal()
        subject = self.entities.deal()
        while qtype.relation == "friend" and not self.world.entity(subject).friend:
            subject = self.entities.deal()
        return subject

    def yes_no(self, qtype: ph.BoolqType, subject: str, answer: bool) -> tuple[str, bool, tuple]:
        """(question, answer, facts): a yes/no question of ``qtype`` about ``subject`` with that answer."""
        value = ph.wino_value(self.world, subject, qtype.relation) if answer else \
            ph.foil(self.world, qtype.relation, subject)
        question, facts = ph.boolq_question(self.world, qtype, subject, value)
        return question, answer, facts

    def _story(self) -> tuple[str, str]:
        w, rng = self.world, self.rng
        place = rng.choice(w.values["home"])
        title = rng.choice((f"A day in {place}", "A short story", "Bedtime story", f"News from {place}"))
        sentences = [rng.choice(("Once upon a time, two friends set out together.", "This happened last year.",
                                 "Here is a story we like.", "Every creature here has a tale."))]
        for _ in range(rng.randint(2, 4)):
            relation, template = self.wino.deal()
            a, b = pick_pair(w, relation, rng, self.entities.deal())
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            sentence = template.format(a=first, b=second, v=ph.wino_value(w, a, relation))
            sentences.append(sentence.replace("_", a))
        sentences.append(rng.choice(("The end.", "And that is how it went.", "Everyone went home happy.")))
        return title, f"{title}\n{' '.join(sentences)}"


def _list_line(world: World, relation: str, value: str, names: list[str]) -> str:
    """ "A, B and C eat berries." (or the singular when there is one name)."""
    joined, many = ph.join_names(names), len(names) > 1
    if relation == "food":
        return f"{joined} {'eat' if many else 'eats'} {value}."
    if relation == "color":
        return f"{joined} {'are' if many else 'is'} {value}."
    if relation == "sound":
        return f"{joined} {world.base(value) if many else value}."
    return f"{joined} are {world.kind(value).plural}." if many else f"{joined} is a {value}."


def pick_pair(world: World, relation: str, rng: random.Random, first: str | None = None) -> tuple[str, str]:
    """Two entities that a WinoGrande sentence about ``relation`` tells apart; ``a`` is the answer."""
    candidates = [e for e in world.entities if relation != "friend" or e.friend]
    a = world.entity(first) if first and world.entity(first) in candidates else rng.choice(candidates)
    others = [b for b in world.entities if ph.wino_can_pair(world, a, b, relation)]
    return a.name, rng.choice(others).name


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "page"


def _timestamp(rng: random.Random) -> str:
    """An ISO timestamp like C4's ``2019-04-25T12:57:54Z``."""
    return (EPOCH + timedelta(seconds=rng.randrange(SPAN_SECONDS))).strftime("%Y-%m-%dT%H:%M:%SZ")


def documents(world: World, n: int, rng: random.Random, *, avoid_texts: set[str] = frozenset(),
              taken_urls: set[str] | None = None) -> list[dict]:
    """``n`` C4-schema rows ``{text, timestamp, url}``; none equal to a text in ``avoid_texts``, urls unique
    (``taken_urls`` is updated with the urls used)."""
    writer = PageWriter(world, rng)
    taken_urls = set() if taken_urls is None else taken_urls
    rows, seen = [], set(avoid_texts)
    while len(rows) < n:
        kind, title, text = writer.page()
        if text in seen:
            continue
        seen.add(text)
        site = rng.choice(PAGE_TYPES[kind][1])
        while True:
            url = f"https://{site}.example/{_slug(title or 'quiz')}-{rng.randrange(10_000, 1_000_000)}"
            if url not in taken_urls:
                break
        taken_urls.add(url)
        rows.append({"text": text, "timestamp": _timestamp(rng), "url": url})
    return rows


def text_splits(world: World, n_train: int, n_validation: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The train and validation text: two random streams; validation pages never repeat a train page."""
    urls: set[str] = set()
    train = documents(world, n_train, random.Random(f"coalora-text:{seed}:train"), taken_urls=urls)
    validation = documents(world, n_validation, random.Random(f"coalora-text:{seed}:validation"),
                           avoid_texts={row["text"] for row in train}, taken_urls=urls)
    return train, validation


# ---- instruction data ---------------------------------------------------------------------------------------
INSTRUCTION_TYPES = {"qa": 40, "yesno": 25, "describe": 15, "kind": 5, "blank": 10, "residents": 5}


def _answer_sentence(world: World, facts: tuple) -> str:
    """The facts behind an answer, each in its first (plainest) phrasing."""
    return " ".join(ph.statements(world, f)[0] for f in facts)


def instructions(world: World, n: int, seed: int) -> list[dict]:
    """``n`` instruction rows ``{instruction, input, output}`` (alpaca schema) about the world."""
    rng = random.Random(f"coalora-instruct:{seed}")
    writer = PageWriter(world, rng)
    deck = Deck([t for t, weight in INSTRUCTION_TYPES.items() for _ in range(weight)], rng)
    rows, seen, draws = [], set(), 0
    while len(rows) < n:
        row, draws = _instruction(world, writer, deck.deal(), rng), draws + 1
        key = (row["instruction"], row["input"], row["output"])
        if key not in seen or draws > 20 * n:  # repeats only once a small world has run out of new rows
            seen.add(key)
            rows.append(row)
    return rows


def _instruction(world: World, writer: PageWriter, kind: str, rng: random.Random) -> dict:
    if kind == "qa":
        qtype, subject = writer.arc.deal()
        q = qtype.ask(world, subject, rng.choice(qtype.templates))
        return {"instruction": "Answer the question about the world.", "input": q.text,
                "output": _answer_sentence(world, q.facts)}
    if kind == "yesno":
        qtype = writer.boolq.deal()
        question, answer, facts = writer.yes_no(qtype, writer.subject_for(qtype), writer.answers.deal())
        reason = _answer_sentence(world, facts)
        return {"instruction": "Answer yes or no.", "input": question.capitalize() + "?",
                "output": f"{'Yes' if answer else 'No'}. {reason}"}
    if kind == "describe":
        name = writer.entities.deal()
        return {"instruction": f"Describe {name}.", "input": "",
                "output": " ".join(ph.entity_sentences(world, name, rng))}
    if kind == "kind":
        kind_name = writer.kinds.deal()
        return {"instruction": f"Tell me about the {world.kind(kind_name).plural}.", "input": "",
                "output": " ".join(ph.kind_sentences(world, kind_name, rng))}
    if kind == "blank":
        relation, template = writer.wino.deal()
        a, b = pick_pair(world, relation, rng, writer.entities.deal())
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        sentence = template.format(a=first, b=second, v=ph.wino_value(world, a, relation))
        return {"instruction": "Fill in the blank with the right name.",
                "input": f"{sentence}\nOptions: {first}, {second}", "output": a}
    place = writer.places.deal()
    names = [e.name for e in world.residents(place)]
    return {"instruction": f"Who lives in {place}?", "input": "",
            "output": f"{ph.join_names(names)} {'live' if len(names) > 1 else 'lives'} in {place}."}
