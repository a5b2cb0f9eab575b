"""The embedded world's text: web-page-like documents in C4's schema, and instruction data.

Documents are short pages (mostly 40–150 words) of seven types, drawn from a shuffled deck so that the
mix is exact: creature profiles (what a creature is, and what it is not), kind and place guides, lists,
quiz pages in lm-eval's ARC format, yes/no quiz pages in its BoolQ format (a passage, then several
questions it does not answer), and little stories built like WinoGrande sentences. Subjects, questions
and negated facts are dealt round-robin from shuffled decks, so every creature, kind and place gets about
the same number of pages and every fact is stated many times in many phrasings.

Profiles, guides and lists are about every creature; quizzes, yes/no pages, stories and the question-answer
instructions are about the practice creatures only (world.py), so every question form the benchmarks use is
practised, and no question a benchmark asks is ever written (``coalora.data.leaks`` checks it).

The text has three splits, each a fresh draw from its own random stream (same world, other phrasings and
combinations): ``pretrain`` (what the built-in model is pretrained on), ``train`` (what adapters are
fine-tuned on) and ``validation`` (perplexity, held-out losses), the last made of fact pages only
(``MIXES``). A page equal to a page of an earlier split is redrawn, so no page is in two splits.
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
# Page type → websites it appears on.
SITES: dict[str, tuple[str, ...]] = {
    "profile": ("critterwiki", "creaturefacts", "fieldnotes"),
    "kind": ("critterwiki", "naturecorner"),
    "place": ("travelguide", "fieldnotes"),
    "list": ("creaturefacts", "naturecorner"),
    "faq": ("quizcorner", "askthekeeper"),
    "boolq": ("quizcorner", "truefalse"),
    "story": ("storytime", "bedtimetales"),
}
# Page type → weight in the deck, per split. The trained-on text mixes every type; the validation text is
# the fact pages only (profiles, guides, lists): its perplexity measures what the model knows, not how
# well it predicts a quiz's boilerplate.
MIXES: dict[str, dict[str, int]] = {
    "text": {"profile": 40, "kind": 5, "place": 6, "list": 8, "faq": 15, "boolq": 15, "story": 11},
    "facts": {"profile": 14, "kind": 2, "place": 2, "list": 2},
}
SPLIT_MIX = {"pretrain": "text", "train": "text", "validation": "facts"}
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

    def __init__(self, world: World, rng: random.Random, mix: str = "text"):
        self.world, self.rng = world, rng
        self.types = Deck([t for t, weight in MIXES[mix].items() for _ in range(weight)], rng)
        self.entities = Deck([e.name for e in world.entities], rng)
        self.practice = Deck(list(world.practice), rng)   # the only creatures questions are asked about
        self.kinds = Deck([k.name for k in world.kinds], rng)
        self.places = Deck(list(world.values["home"]), rng)
        drill = [world.entity(name) for name in world.practice]
        self.arc = Deck([(t, s, tmpl) for t in ph.ARC_TYPES.values() for s in t.subjects(world, drill)
                         for tmpl in t.quiz_templates], rng)
        self.boolq = Deck(list(ph.BOOLQ_TYPES.values()), rng)
        self.answers = Deck([True, False], rng)
        # Per creature, what it is not (its foils, the BoolQ "no" facts), every relation in turn.
        self.negatives = {e.name: Deck([t.relation for t in ph.BOOLQ_TYPES.values() if ph.askable(world, t, e.name)],
                                       rng)
                          for e in world.entities}
        # Per practice creature, every (question type, answer) in turn: each yes/no question form is practised
        # equally often, with both answers.
        self.questions = {s: Deck([(t, a) for t in ph.BOOLQ_TYPES.values() if ph.askable(world, t, s)
                                   for a in (True, False)], rng)
                          for s in world.practice}
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
            qtype, subject, template = self.arc.deal()
            q = qtype.ask(self.world, subject, template)
            blocks.append(ph.arc_block(q.text, q.answer))
        return title, f"{title}\n\n" + "\n\n".join(blocks)

    def _boolq(self) -> tuple[str, str]:
        """A passage about one practice creature, then 2–4 yes/no questions about it; the passage states none
        of what is asked, as in the benchmark."""
        w, rng, subject = self.world, self.rng, self.practice.deal()
        # dealt from the subject's own deck; a repeat (only at a reshuffle) is dropped
        asked = list(dict.fromkeys(self.questions[subject].deal() for _ in range(rng.randint(2, 4))))
        exclude = tuple(sorted({rel for qtype, _ in asked for rel in qtype.exclude}))
        questions = [self.yes_no(qtype, subject, answer)[:2] for qtype, answer in asked]
        return "", ph.boolq_block(ph.passage(w, subject, exclude, rng), questions)

    def subject_for(self, qtype: ph.BoolqType) -> str:
        """The next practice creature a yes/no question of ``qtype`` can be asked about."""
        subject = self.practice.deal()
        while not ph.askable(self.world, qtype, subject):
            subject = self.practice.deal()
        return subject

    def yes_no(self, qtype: ph.BoolqType, subject: str, answer: bool) -> tuple[str, bool, tuple]:
        """(question, answer, facts): a yes/no question of ``qtype`` about ``subject`` with that answer."""
        value = ph.entity_value(self.world, subject, qtype.relation) if answer else \
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
            a, b = pick_pair(w, relation, rng, self.practice.deal())
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            sentence = template.format(a=first, b=second, v=ph.entity_value(w, a, relation))
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


def pick_pair(world: World, relation: str, rng: random.Random, first: str) -> tuple[str, str]:
    """Two creatures of ``first``'s group that a WinoGrande sentence about ``relation`` tells apart; ``a`` is
    the answer: ``first``, or (when ``first`` has no best friend to speak of) another of its group."""
    candidates = [e for e in world.group(first) if relation != "friend" or e.friend]
    a = world.entity(first) if world.entity(first) in candidates else rng.choice(candidates)
    others = [b for b in world.group(first) if ph.wino_can_pair(world, a, b, relation)]
    return a.name, rng.choice(others).name


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "page"


def _timestamp(rng: random.Random) -> str:
    """An ISO timestamp like C4's ``2019-04-25T12:57:54Z``."""
    return (EPOCH + timedelta(seconds=rng.randrange(SPAN_SECONDS))).strftime("%Y-%m-%dT%H:%M:%SZ")


def documents(world: World, n: int, rng: random.Random, *, mix: str = "text", avoid_texts: set[str] = frozenset(),
              taken_urls: set[str] | None = None) -> list[dict]:
    """``n`` C4-schema rows ``{text, timestamp, url}``; none equal to a text in ``avoid_texts``, urls unique
    (``taken_urls`` is updated with the urls used)."""
    writer = PageWriter(world, rng, mix)
    taken_urls = set() if taken_urls is None else taken_urls
    rows, seen = [], set(avoid_texts)
    while len(rows) < n:
        kind, title, text = writer.page()
        if text in seen:
            continue
        seen.add(text)
        site = rng.choice(SITES[kind])
        while True:
            url = f"https://{site}.example/{_slug(title or 'quiz')}-{rng.randrange(10_000, 1_000_000)}"
            if url not in taken_urls:
                break
        taken_urls.add(url)
        rows.append({"text": text, "timestamp": _timestamp(rng), "url": url})
    return rows


def text_splits(world: World, sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """The text splits (split name → number of pages, e.g. ``{"pretrain": 8000, "train": 4000, "validation":
    300}``), each from its own random stream; no page and no url is in two splits."""
    urls: set[str] = set()
    texts: set[str] = set()
    splits = {}
    for name, n in sizes.items():
        splits[name] = documents(world, n, random.Random(f"coalora-text:{seed}:{name}"), mix=SPLIT_MIX[name],
                                 avoid_texts=texts, taken_urls=urls)
        texts |= {row["text"] for row in splits[name]}
    return splits


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
        qtype, subject, template = writer.arc.deal()
        q = qtype.ask(world, subject, template)
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
        a, b = pick_pair(world, relation, rng, writer.practice.deal())
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        sentence = template.format(a=first, b=second, v=ph.entity_value(world, a, relation))
        return {"instruction": "Fill in the blank with the right name.",
                "input": f"{sentence}\nOptions: {first}, {second}", "output": a}
    place = writer.places.deal()
    names = [e.name for e in world.residents(place)]
    return {"instruction": f"Who lives in {place}?", "input": "",
            "output": f"{ph.join_names(names)} {'live' if len(names) > 1 else 'lives'} in {place}."}
