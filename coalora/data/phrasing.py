"""The language of the embedded world: how facts are stated and asked, shared by corpus and benchmarks.

Templates are data. A statement template renders one fact; a question type renders a benchmark question
together with its answer, the wrong answers it may be offered, and the facts it needs. The corpus states
every fact the benchmarks need and practises every question format they use, in lm-eval's own prompt
formats, on other creatures (world.py: practice and tested creatures):

    BoolQ   "{passage}\\nQuestion: {question}?\\nAnswer:" + " yes" | " no"
    ARC     "Question: {question}\\nAnswer:" + " {choice}"
    Wino    sentence[:"_"] + option, continued by the text after "_"

A "no" is a fact too: every (subject, relation) has one fixed *foil*, a false value the text negates
("Zorp does not eat fish.") and the yes/no questions ask ("does zorp eat fish? no").

A creature's ``winter`` and ``covering`` are its kind's rules (:func:`entity_value`): asking them of a
creature takes two hops, its kind and the kind's rule.

Placeholders: ``{e}`` entity, ``{v}`` value, ``{vb}`` bare verb of the value, ``{k}``/``{ks}``/``{Ks}``
kind, plural, capitalised plural, ``{place}`` a place.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from coalora.data.world import KIND_RELATIONS, Entity, Fact, World

# ---- statements -----------------------------------------------------------------------------------------
STATEMENTS: dict[str, tuple[str, ...]] = {
    "kind": ("{e} is a {v}.", "{e} belongs to the {vs}.", "{e} is one of the {vs}.", "{e} is a young {v}."),
    "color": ("{e} is {v}.", "{e} is {v} all over.", "The color of {e} is {v}.", "You can tell {e} by its {v} color."),
    "food": ("{e} eats {v}.", "The favourite food of {e} is {v}.", "{e} loves to eat {v}.",
             "Every morning {e} looks for {v} to eat."),
    "home": ("{e} lives in {v}.", "The home of {e} is {v}.", "{e} makes its home in {v}.", "You can find {e} in {v}."),
    "sound": ("{e} {v}.", "When it is happy, {e} {v}.", "You will hear {e} before you see it, because it {v}.",
              "All day long {e} {v}."),
    "friend": ("{e} and {v} are best friends.", "The best friend of {e} is {v}.",
               "{e} spends most days with its best friend {v}."),
    "winter": ("All {ks} {vb} in winter.", "Every {k} {v} in winter.", "In winter, {ks} {vb}.",
               "When winter comes, every {k} {v}."),
    "covering": ("All {ks} have {v}.", "Every {k} is covered in {v}.", "The body of a {k} is covered with {v}.",
                 "{Ks} have {v}."),
}
# A rule applied to one member: a shortcut the text offers now and then (the second hop made explicit).
APPLIED_RULES: dict[str, tuple[str, ...]] = {
    "winter": ("Like every {k}, {e} {v} in winter.", "{e} {v} in winter, as all {ks} do."),
    "covering": ("Like every {k}, {e} has {v}.", "{e} is covered in {v}, like all {ks}."),
}
# What a creature is not: its foil (see :func:`foil`) stated as a negative fact. The BoolQ "no" questions
# ask exactly these, so the text teaches the "no" answers as it teaches the "yes" ones.
NEGATIONS: dict[str, tuple[str, ...]] = {
    "kind": ("{e} is not a {v}.",),
    "color": ("{e} is not {v}.",),
    "food": ("{e} does not eat {v}.", "{e} never eats {v}."),
    "home": ("{e} does not live in {v}.",),
    "sound": ("{e} does not {vb}.",),
    "friend": ("{e} and {v} are not best friends.",),
    "winter": ("{e} does not {vb} in winter.",),
    "covering": ("{e} is not covered in {v}.", "{e} does not have {v}."),
}
KIND_NEGATIONS: dict[str, tuple[str, ...]] = {"covering": ("{Ks} do not have {v}.",),
                                              "winter": ("{Ks} do not {vb} in winter.",)}
FILLERS = ("Here is what we know about it.", "Visitors often ask about it.", "It is a gentle creature.",
           "Many people have written about it.", "It is easy to like.", "Read on to learn more.",
           "We met it last spring.", "It has lived there for years.")


def _slots(world: World, subject: str, relation: str, value: str) -> dict[str, str]:
    """Template slots for a fact. The subject is an entity, or a kind (for rules)."""
    kind = world.kind(subject) if world.is_kind(subject) else world.kind_of(subject)
    slots = {"e": subject, "v": value, "k": kind.name, "ks": kind.plural, "Ks": kind.plural.capitalize()}
    if relation == "kind":
        slots["vs"] = world.kind(value).plural
    if value in world.verb_base:
        slots["vb"] = world.base(value)
    return slots


def render(template: str, world: World, fact: Fact) -> str:
    return template.format(**_slots(world, *fact))


def statements(world: World, fact: Fact) -> list[str]:
    """Every way the corpus states ``fact`` as a sentence (what a test counts in the train text)."""
    return [render(t, world, fact) for t in STATEMENTS[fact.relation]]


def state(world: World, fact: Fact, rng: random.Random) -> str:
    """One statement of ``fact`` in a randomly chosen phrasing."""
    return render(rng.choice(STATEMENTS[fact.relation]), world, fact)


def apply_rule(world: World, entity: str, relation: str, rng: random.Random) -> str:
    """A rule stated for one member: "Like every glimmer, Zorp sleeps in winter"."""
    kind = world.kind_of(entity)
    return render(rng.choice(APPLIED_RULES[relation]), world, Fact(entity, relation, getattr(kind, relation)))


def entity_value(world: World, entity: str, relation: str) -> str:
    """What is true of ``entity`` for ``relation``: an attribute, or its kind's rule (``winter``, ``covering``)."""
    if relation in KIND_RELATIONS:
        return getattr(world.kind_of(entity), relation)
    return world.value(entity, relation)


def false_values(world: World, relation: str, subject: str) -> list[str]:
    """The values that make ``(subject, relation, value)`` false, in a fixed order (a creature's rule
    relations through its kind; a false best friend from its own group)."""
    true = entity_value(world, subject, relation) if world.is_entity(subject) else world.value(subject, relation)
    if relation == "friend":
        return [e.name for e in world.group(subject) if e.name not in (subject, true)]
    return [v for v in world.options(relation) if v != true]


def foil(world: World, relation: str, subject: str) -> str:
    """The one false value the text and the benchmarks pair with ``(subject, relation)``: "Zorp does not eat
    fish", "does zorp eat fish? no". Fixed per world, so every "no" question is a stated, learnable fact."""
    return random.Random(f"coalora-foil:{world.seed}:{subject}:{relation}").choice(
        false_values(world, relation, subject))


def negate(world: World, relation: str, subject: str, rng: random.Random) -> str:
    """A negative statement about ``subject``: its foil for ``relation``."""
    return rng.choice(negations(world, relation, subject))


def negations(world: World, relation: str, subject: str) -> list[str]:
    """Every way the corpus states that ``subject`` (a creature, or a kind) does not have its foil."""
    value = foil(world, relation, subject)
    if world.is_kind(subject):
        return [t.format(**_slots(world, subject, relation, value)) for t in KIND_NEGATIONS[relation]]
    slots = _slots(world, subject, relation, value) | {"e": subject}
    return [t.format(**slots) for t in NEGATIONS[relation]]


def entity_sentences(world: World, entity: str, rng: random.Random, exclude: tuple[str, ...] = ()) -> list[str]:
    """One statement per fact about ``entity`` (relations in ``exclude`` left out), plus, now and then, a
    rule applied to it (left out when the kind or the rule is excluded), in random order."""
    facts = [f for f in world.entity_facts(entity) if f.relation not in exclude]
    sentences = [state(world, f, rng) for f in facts]
    rng.shuffle(sentences)
    for rel in ("winter", "covering"):
        if rel not in exclude and "kind" not in exclude and rng.random() < 0.3:
            sentences.insert(rng.randrange(len(sentences) + 1), apply_rule(world, entity, rel, rng))
    return sentences


def kind_sentences(world: World, kind: str, rng: random.Random, exclude: tuple[str, ...] = ()) -> list[str]:
    """The rules of a kind and some of its members, shuffled."""
    sentences = [state(world, f, rng) for f in world.kind_facts(kind) if f.relation not in exclude]
    members = [m.name for m in world.members(kind)]
    rng.shuffle(members)
    if members:
        shown = members[:rng.randint(1, min(3, len(members)))]
        sentences.append(f"Known {world.kind(kind).plural} include {join_names(shown)}.")
    rng.shuffle(sentences)
    return sentences


def join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ---- ARC-style questions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """A multiple-choice question: its text, the answer, every admissible wrong answer, the facts needed."""

    text: str
    answer: str
    wrong: tuple[str, ...]
    facts: tuple[Fact, ...]


@dataclass(frozen=True)
class ArcType:
    """One kind of multiple-choice question.

    ``subjects(world, creatures)`` lists what it can ask about a group of creatures (the tested ones for the
    benchmarks, the practice ones for the text's quizzes); ``ask(world, subject, template)`` renders one
    question. ``level`` is ``easy`` or ``challenge`` (benchmarks and quizzes) or ``practice`` (quizzes only).
    ``templates`` are the benchmark's phrasings, ``practice`` the quizzes' (the same, except where the
    question names no creature: "Which of these creatures lives in Tarnwood?" is asked by the benchmark
    only, the quizzes ask "Which creature makes its home in Tarnwood?" about the practice creatures).
    """

    name: str
    level: str
    templates: tuple[str, ...]
    subjects: Callable[[World, list[Entity]], list]
    ask: Callable[[World, object, str], Question]
    practice: tuple[str, ...] = ()

    @property
    def quiz_templates(self) -> tuple[str, ...]:
        return self.practice or self.templates


def _names(world: World, creatures: list[Entity]) -> list[str]:
    return [e.name for e in creatures]


def _with_friend(world: World, creatures: list[Entity]) -> list[str]:
    return [e.name for e in creatures if e.friend]


def _attribute(relation: str, article: str = "") -> Callable[[World, str, str], Question]:
    """A question whose answer is the entity's value for ``relation``; wrong answers are the other values."""
    def ask(world: World, entity: str, template: str) -> Question:
        value = world.value(entity, relation)
        fact = Fact(entity, relation, value)
        wrong = tuple(article + v for v in world.options(relation) if v != value)
        return Question(render(template, world, fact), article + value, wrong, (fact,))
    return ask


def _rule(relation: str) -> Callable[[World, str, str], Question]:
    """A question about an entity that its kind's rule answers (two facts: membership and the rule)."""
    def ask(world: World, entity: str, template: str) -> Question:
        kind = world.kind_of(entity)
        value = getattr(kind, relation)
        facts = (Fact(entity, "kind", kind.name), Fact(kind.name, relation, value))
        wrong = tuple(v for v in world.options(relation) if v != value)
        return Question(render(template, world, Fact(entity, relation, value)), value, wrong, facts)
    return ask


def _kind_rule(relation: str) -> Callable[[World, str, str], Question]:
    """A question about a kind's rule itself ("What do glimmers do in winter?" → "sleep")."""
    def ask(world: World, kind: str, template: str) -> Question:
        value = getattr(world.kind(kind), relation)
        fact = Fact(kind, relation, value)
        answer = world.base(value) if relation == "winter" else value
        others = [v for v in world.options(relation) if v != value]
        wrong = tuple(world.base(v) if relation == "winter" else v for v in others)
        return Question(render(template, world, fact), answer, wrong, (fact,))
    return ask


# Creatures as answers: the wrong ones come from the answer's own group, so that "a practice creature's name"
# (the answer of every quiz) never tells the right choice of a benchmark item.
def _ask_friend(world: World, entity: str, template: str) -> Question:
    friend = world.entity(entity).friend
    wrong = tuple(e.name for e in world.group(entity) if e.name not in (entity, friend))
    return Question(template.format(e=entity), friend, wrong, (Fact(entity, "friend", friend),))


def _ask_resident(world: World, subject: tuple[str, str], template: str) -> Question:
    place, resident = subject
    wrong = tuple(e.name for e in world.group(resident) if e.home != place)
    return Question(template.format(place=place), resident, wrong, (Fact(resident, "home", place),))


def _ask_member(world: World, subject: tuple[str, str], template: str) -> Question:
    kind, member = subject
    wrong = tuple(e.name for e in world.group(member) if e.kind != kind)
    text = template.format(k=kind, ks=world.kind(kind).plural)
    return Question(text, member, wrong, (Fact(member, "kind", kind),))


def _kinds(world: World, creatures: list[Entity]) -> list[str]:
    return [k.name for k in world.kinds]


ARC_TYPES: dict[str, ArcType] = {t.name: t for t in (
    ArcType("food", "easy", ("What does {e} eat?", "What is the favourite food of {e}?"), _names,
            _attribute("food")),
    ArcType("color", "easy", ("What color is {e}?", "Which color is {e}?"), _names, _attribute("color")),
    ArcType("home", "easy", ("Where does {e} live?", "Which place is the home of {e}?"), _names,
            _attribute("home")),
    ArcType("sound", "easy", ("What does {e} do when it is happy?", "What sound does {e} make?"), _names,
            _attribute("sound")),
    ArcType("kind", "easy", ("What kind of creature is {e}?", "{e} is which kind of creature?"), _names,
            _attribute("kind", article="a ")),
    ArcType("winter_hop", "challenge", ("What does {e} do in winter?", "What does {e} do when winter comes?"),
            _names, _rule("winter")),
    ArcType("covering_hop", "challenge", ("What covers the body of {e}?", "What is the body of {e} covered with?"),
            _names, _rule("covering")),
    ArcType("friend", "challenge", ("Who is the best friend of {e}?", "Which creature is the best friend of {e}?"),
            _with_friend, _ask_friend),
    ArcType("resident", "challenge", ("Which of these creatures lives in {place}?",),
            lambda w, cs: [(e.home, e.name) for e in cs], _ask_resident,
            practice=("Which creature makes its home in {place}?",)),
    ArcType("member", "challenge", ("Which of these creatures is a {k}?",),
            lambda w, cs: [(e.kind, e.name) for e in cs], _ask_member,
            practice=("Which creature belongs to the {ks}?",)),
    # Quizzes only: the rule applied with the kind given, and the rules themselves.
    ArcType("winter_rule", "practice", ("{e} is a {k}. What does {e} do in winter?",), _names, _rule("winter")),
    ArcType("covering_rule", "practice", ("{e} is a {k}. What covers the body of {e}?",), _names,
            _rule("covering")),
    ArcType("kind_winter", "practice", ("What do {ks} do in winter?",), _kinds, _kind_rule("winter")),
    ArcType("kind_covering", "practice", ("What covers the body of a {k}?",), _kinds, _kind_rule("covering")),
)}


def arc_block(question: str, answer: str) -> str:
    """A question and its answer in lm-eval's ARC prompt format."""
    return f"Question: {question}\nAnswer: {answer}"


# ---- BoolQ-style questions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BoolqType:
    """One kind of yes/no question about a creature.

    ``template`` renders the question for a (true or false) value; ``exclude`` lists the relations the
    passage must not state (so that the answer needs knowledge, not reading).
    """

    name: str
    relation: str
    template: str
    exclude: tuple[str, ...]


BOOLQ_TYPES: dict[str, BoolqType] = {t.name: t for t in (
    BoolqType("food", "food", "does {e} eat {v}", ("food",)),
    BoolqType("color", "color", "is {e} {v}", ("color",)),
    BoolqType("home", "home", "does {e} live in {v}", ("home",)),
    BoolqType("sound", "sound", "does {e} {vb}", ("sound",)),
    BoolqType("kind", "kind", "is {e} a {v}", ("kind", "winter", "covering")),
    BoolqType("friend", "friend", "are {e} and {v} best friends", ("friend",)),
    BoolqType("winter", "winter", "does {e} {vb} in winter", ("kind", "winter")),
    BoolqType("covering", "covering", "is {e} covered in {v}", ("kind", "covering")),
)}


def askable(world: World, qtype: BoolqType, entity: str) -> bool:
    """Whether a yes/no question of ``qtype`` can be asked about ``entity`` (a friendship needs a friend)."""
    return qtype.relation != "friend" or bool(world.entity(entity).friend)


def boolq_question(world: World, qtype: BoolqType, subject: str, value: str) -> tuple[str, tuple[Fact, ...]]:
    """The lowercase question (no "?", as in BoolQ) asking whether creature ``subject`` has ``value``, and the
    facts that decide it (a rule relation: the creature's kind and the kind's rule)."""
    slots = _slots(world, subject, qtype.relation, value) | {"e": subject}
    if qtype.relation in KIND_RELATIONS:
        kind = world.kind_of(subject)
        facts = (Fact(subject, "kind", kind.name), Fact(kind.name, qtype.relation, getattr(kind, qtype.relation)))
    else:
        facts = (Fact(subject, qtype.relation, world.value(subject, qtype.relation)),)
    return qtype.template.format(**slots).lower(), facts


PASSAGE_FACTS = 3  # fact sentences in a BoolQ passage: short, since scoring cost grows with its tokens


def passage(world: World, subject: str, exclude: tuple[str, ...], rng: random.Random) -> str:
    """A short passage about creature ``subject``: an opening and ``PASSAGE_FACTS`` facts, none of the
    relations in ``exclude`` (what the questions after it ask)."""
    sentences = entity_sentences(world, subject, rng, exclude=exclude)[:PASSAGE_FACTS]
    sentences.insert(0, rng.choice((f"{subject} is a creature of this world.",
                                    f"This page is about {subject}.", f"Here is what we know about {subject}.")))
    return " ".join(sentences)


def boolq_block(passage_text: str, questions: list[tuple[str, bool]]) -> str:
    """A passage and its questions with answers in lm-eval's BoolQ prompt format (each question right
    after the previous answer, as the first one is after the passage)."""
    return passage_text + "".join(f"\nQuestion: {q}?\nAnswer: {'yes' if a else 'no'}" for q, a in questions)


# ---- WinoGrande-style sentences ---------------------------------------------------------------------------
WINO_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("food", "{a} and {b} went to the market, and _ bought {v} because that is its favourite food."),
    ("food", "{a} and {b} found a basket of {v}, and _ ate them all because it loves {v}."),
    ("color", "{a} and {b} stood side by side, and _ was the {v} one."),
    ("color", "{a} and {b} hid in the bushes, but _ was easy to spot because it is {v}."),
    ("home", "{a} and {b} went on a long trip, and _ was glad to get back to its home in {v}."),
    ("sound", "{a} and {b} were resting in the dark, and _ {v} the whole night."),
    ("kind", "{a} and {b} met at the lake, and _ said it was proud to be a {v}."),
    ("winter", "{a} and {b} said goodbye in autumn, because _ {v} in winter."),
    ("friend", "{a} and {b} waited at the gate, and _ ran to greet its best friend {v}."),
)


def wino_facts(world: World, entity: str, relation: str) -> tuple[Fact, ...]:
    if relation in KIND_RELATIONS:
        kind = world.kind_of(entity)
        return Fact(entity, "kind", kind.name), Fact(kind.name, relation, getattr(kind, relation))
    return (Fact(entity, relation, world.value(entity, relation)),)


def wino_can_pair(world: World, a: Entity, b: Entity, relation: str) -> bool:
    """Whether a sentence about ``a``'s value of ``relation`` tells ``a`` from ``b`` (same group only)."""
    if a.name == b.name or world.is_practice(a.name) != world.is_practice(b.name):
        return False
    if relation == "friend":
        return bool(a.friend) and a.friend != b.name
    return entity_value(world, a.name, relation) != entity_value(world, b.name, relation)
