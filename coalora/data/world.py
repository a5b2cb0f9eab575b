"""The embedded world: invented creatures, their attributes, friendships, and the rules of their kinds.

A world is generated from a seed with its own ``random.Random`` (never the global RNG), so the same seed
gives the same world on every machine. Everything the corpus and the benchmarks say is derived from it,
and an oracle that knows the world answers every benchmark item.

Knowledge is a set of facts, triples ``(subject, relation, object)``:

| relation                    | subject | object              | example                          |
|-----------------------------|---------|---------------------|----------------------------------|
| kind                        | entity  | kind (singular)     | ("Zorp", "kind", "glimmer")      |
| color, food, home, sound    | entity  | value               | ("Zorp", "food", "berries")      |
| friend                      | entity  | entity (symmetric)  | ("Zorp", "friend", "Mip")        |
| winter, covering  (rules)   | kind    | value               | ("glimmer", "winter", "sleeps")  |

A rule holds for every member of its kind ("every glimmer sleeps in winter"), which is what the harder
benchmark items need as a second hop. Verbs (``sound``, ``winter``) are stored in the third person
("hums", "digs tunnels"); :meth:`World.base` gives the bare form ("hum", "dig tunnels").

The creatures form two groups. The text's quizzes, yes/no pages, stories and question-answer instructions
ask only about the *practice* creatures (``World.practice``); the benchmarks ask only about the others,
the *tested* creatures, whose facts the text states (profiles, guides, lists) but never asks. So every
question form is practised, yet no benchmark question is ever seen with its answer: the benchmarks test
knowledge, not recall of a string. Each group has its own balanced attribute columns and best friends are
matched within a group (a practice quiz "who is the best friend of Mip? Zorp" would also answer "who is
the best friend of Zorp?").

The world is deliberately small (6 kinds, 6 values per attribute, one or two hundred creatures) so that a
tiny language model can memorise it in minutes of pretraining.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import NamedTuple

N_KINDS = 6
N_VALUES = 6  # values used per entity attribute; ARC items need at least 4
ENTITY_RELATIONS = ("kind", "color", "food", "home", "sound", "friend")
KIND_RELATIONS = ("winter", "covering")

KIND_POOL = ("glimmer", "brontel", "fuzzle", "quillop", "snarvel", "tovet", "wumbler", "dristle",
             "mopkin", "yarrik")
PLACE_POOL = ("Tarnwood", "Ossmere", "Fenlow", "Gristvale", "Moorcap", "Quellby", "Ambershore",
              "Dunmarrow", "Brackenfold", "Lowmeadow")
COLOR_POOL = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "pink")
FOOD_POOL = ("berries", "acorns", "mushrooms", "honey", "clover", "fish", "turnips", "beetles", "apples",
             "plums")
SOUND_POOL = (("hums", "hum"), ("squeaks", "squeak"), ("whistles", "whistle"), ("clicks", "click"),
              ("growls", "growl"), ("chirps", "chirp"), ("croaks", "croak"), ("hoots", "hoot"),
              ("purrs", "purr"), ("rattles", "rattle"))
WINTER_POOL = (("sleeps", "sleep"), ("sings", "sing"), ("digs tunnels", "dig tunnels"),
               ("travels south", "travel south"), ("glows", "glow"), ("swims under the ice", "swim under the ice"),
               ("builds nests", "build nests"), ("hides in caves", "hide in caves"))
COVERING_POOL = ("fur", "feathers", "scales", "shells", "moss", "spikes", "wool", "leaves")

# Words the corpus uses (4+ letters): no creature may be called "Lake" or "Have". tests/test_world.py checks
# that every word of the generated text is a name, a pool word, or listed here.
RESERVED_WORDS = frozenset((
    "about", "answer", "answers", "autumn", "back", "basket", "because", "bedtime", "before", "belongs", "best",
    "blank", "body", "bought", "bushes", "color", "comes", "covered", "covers", "creature", "creatures", "dark",
    "days", "describe", "does", "easy", "eats", "every", "everyone", "example", "favourite", "field", "fill",
    "find", "food", "found", "friend", "friends", "from", "gate", "gentle", "glad", "goodbye", "greet", "guide",
    "happened", "happy", "have", "hear", "here", "home", "include", "kind", "know", "knowledge", "known",
    "lake", "last", "learn", "like", "live", "lived", "lives", "long", "looks", "loves", "make", "makes",
    "many", "market", "meet", "more", "morning", "most", "name", "near", "never", "news", "night", "often", "once",
    "options", "over", "page", "people", "place", "profile", "proud", "question", "questions", "quiz", "read",
    "resting", "right", "said", "short", "side", "sound", "sounds", "spends", "spot", "spring", "stood",
    "story", "tale", "tell", "test", "that", "them", "there", "these", "this", "time", "together", "trip",
    "upon", "visit", "visitors", "waited", "went", "were", "what", "when", "where", "which", "whole", "will",
    "winter", "with", "world", "written", "year", "years", "young", "your",
))

# Pronounceable invented names: consonant vowel consonant vowel [consonant], e.g. "Talok", "Mirex", "Brazu".
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z") * 3 + ("br", "dr", "gr",
           "kl", "pl", "sn", "tr", "st", "sk", "fl", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u") * 4 + ("ai", "oo", "ee", "ou")
_CODAS = ("n", "r", "l", "k", "x", "m", "p", "s", "sh", "", "", "")


class Fact(NamedTuple):
    """One atomic fact ``(subject, relation, object)``; see the module table."""

    subject: str
    relation: str
    object: str


@dataclass(frozen=True)
class Kind:
    """A species. Its ``winter`` habit and ``covering`` are rules: they hold for every member."""

    name: str
    plural: str
    winter: str
    covering: str


@dataclass(frozen=True)
class Entity:
    """One creature. ``friend`` is the name of its best friend (None for the odd one out)."""

    name: str
    kind: str
    color: str
    food: str
    home: str
    sound: str
    friend: str | None


@dataclass(frozen=True)
class World:
    """A generated world. Build it with :func:`generate_world`; round-trip with ``to_dict``/``from_dict``.

    Attributes:
        seed: the seed it was generated from.
        kinds: the species with their rules.
        entities: the creatures, in generation order: the practice creatures first, then the tested ones.
        practice: the names of the practice creatures (module docstring), the first ``len(practice)``.
        values: relation → the values used for it (``color``, ``food``, ``home``, ``sound``), the answer
            pools of the benchmarks.
        verb_base: third-person verb phrase → bare form ("digs tunnels" → "dig tunnels").
    """

    seed: int
    kinds: tuple[Kind, ...]
    entities: tuple[Entity, ...]
    values: dict[str, tuple[str, ...]]
    verb_base: dict[str, str]
    practice: tuple[str, ...]

    # ---- lookups -------------------------------------------------------------------------------------
    def entity(self, name: str) -> Entity:
        return self._by_name[name]

    def is_entity(self, name: str) -> bool:
        return name in self._by_name

    def is_kind(self, name: str) -> bool:
        return name in self._kinds

    def kind(self, name: str) -> Kind:
        return self._kinds[name]

    def kind_of(self, entity: str) -> Kind:
        return self.kind(self.entity(entity).kind)

    def is_practice(self, name: str) -> bool:
        return name in self._practice

    def tested(self) -> list[Entity]:
        """The creatures the benchmarks ask about (never the text's quizzes)."""
        return list(self._groups[False])

    def group(self, name: str) -> list[Entity]:
        """The creatures of ``name``'s group (practice or tested), ``name`` included."""
        return list(self._groups[name in self._practice])

    def members(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    def residents(self, place: str) -> list[Entity]:
        return [e for e in self.entities if e.home == place]

    def base(self, verb: str) -> str:
        """The bare form of a third-person verb phrase: "hums" → "hum"."""
        return self.verb_base[verb]

    def options(self, relation: str) -> tuple[str, ...]:
        """Every value a relation takes in this world (the answer pool of a question about it)."""
        if relation == "kind":
            return tuple(k.name for k in self.kinds)
        if relation in KIND_RELATIONS:
            return tuple(getattr(k, relation) for k in self.kinds)
        if relation == "friend":
            return tuple(e.name for e in self.entities)
        return self.values[relation]

    # Lookup tables, built once (a frozen dataclass may still cache into its __dict__).
    @cached_property
    def _by_name(self) -> dict[str, Entity]:
        return {e.name: e for e in self.entities}

    @cached_property
    def _kinds(self) -> dict[str, Kind]:
        return {k.name: k for k in self.kinds}

    @cached_property
    def _practice(self) -> frozenset[str]:
        return frozenset(self.practice)

    @cached_property
    def _groups(self) -> dict[bool, tuple[Entity, ...]]:
        """is practice → the creatures of that group, in generation order."""
        return {flag: tuple(e for e in self.entities if (e.name in self._practice) == flag) for flag in (True, False)}

    # ---- facts ---------------------------------------------------------------------------------------
    def value(self, subject: str, relation: str) -> str | None:
        """The object of ``(subject, relation, ?)``: entity attributes, or a kind's rule."""
        if relation in KIND_RELATIONS:
            return getattr(self.kind(subject), relation)
        return getattr(self.entity(subject), relation)

    def holds(self, fact: Fact) -> bool:
        return self.value(fact.subject, fact.relation) == fact.object

    def entity_facts(self, name: str) -> list[Fact]:
        """The facts whose subject is this entity, in ``ENTITY_RELATIONS`` order."""
        entity = self.entity(name)
        return [Fact(name, rel, getattr(entity, rel)) for rel in ENTITY_RELATIONS if getattr(entity, rel)]

    def kind_facts(self, name: str) -> list[Fact]:
        kind = self.kind(name)
        return [Fact(name, rel, getattr(kind, rel)) for rel in KIND_RELATIONS]

    def facts(self) -> list[Fact]:
        """Every atomic fact of the world: entity facts, then rules."""
        out = [f for e in self.entities for f in self.entity_facts(e.name)]
        return out + [f for k in self.kinds for f in self.kind_facts(k.name)]

    def relations(self) -> list[dict]:
        """Relations between entities: best friends (symmetric) and neighbours (same home)."""
        out = [{"subject": e.name, "relation": "friend_of", "object": e.friend} for e in self.entities if e.friend]
        for a in self.entities:
            out += [{"subject": a.name, "relation": "lives_near", "object": b.name}
                    for b in self.entities if b.home == a.home and b.name != a.name]
        return out

    def rules(self) -> list[dict]:
        """The rules, as data and as a sentence."""
        return [{"kind": k.name, "relation": "winter", "value": k.winter,
                 "text": f"Every {k.name} {k.winter} in winter."} for k in self.kinds] + \
               [{"kind": k.name, "relation": "covering", "value": k.covering,
                 "text": f"Every {k.name} is covered in {k.covering}."} for k in self.kinds]

    # ---- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able form. ``relations`` and ``rules`` are derived, written for readers, ignored on load."""
        return {
            "seed": self.seed,
            "kinds": [asdict(k) for k in self.kinds],
            "entities": [asdict(e) for e in self.entities],
            "values": {rel: list(vals) for rel, vals in self.values.items()},
            "verb_base": dict(self.verb_base),
            "practice": list(self.practice),
            "relations": self.relations(),
            "rules": self.rules(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "World":
        return cls(
            seed=data["seed"],
            kinds=tuple(Kind(**k) for k in data["kinds"]),
            entities=tuple(Entity(**e) for e in data["entities"]),
            values={rel: tuple(vals) for rel, vals in data["values"].items()},
            verb_base=dict(data["verb_base"]),
            practice=tuple(data["practice"]),
        )


def _name(rng: random.Random) -> str:
    stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2))
    return (stem + rng.choice(_CODAS)).capitalize()


def invent_names(rng: random.Random, n: int, reserved: set[str]) -> list[str]:
    """``n`` unique names, none a prefix of another (so counting "Zorp" never counts "Zorpa") and none
    clashing with the world's other words."""
    names: list[str] = []
    while len(names) < n:
        name = _name(rng)
        low = name.lower()
        if not 4 <= len(name) <= 8 or low in reserved:
            continue
        if any(low.startswith(o.lower()) or o.lower().startswith(low) for o in names):
            continue
        if any(low.startswith(w) or w.startswith(low) for w in reserved):
            continue
        names.append(name)
    return names


def _balanced(values: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    """``n`` draws in which every value occurs ``n // len(values)`` or one more times, in random order."""
    order = list(values)
    rng.shuffle(order)
    draws = [order[i % len(order)] for i in range(n)]
    rng.shuffle(draws)
    return draws


def _group(names: list[str], values: dict[str, tuple[str, ...]], kinds: tuple[Kind, ...],
           rng: random.Random) -> list[Entity]:
    """The creatures of one group: every attribute balanced within the group, best friends a random perfect
    matching within the group (the odd one out, if any, has none)."""
    n = len(names)
    columns = {rel: _balanced(vals, n, rng) for rel, vals in values.items()}
    kind_column = _balanced(tuple(k.name for k in kinds), n, rng)
    order = list(range(n))
    rng.shuffle(order)
    friend = {}
    for a, b in zip(order[0::2], order[1::2]):
        friend[names[a]], friend[names[b]] = names[b], names[a]
    return [Entity(name=name, kind=kind_column[i], color=columns["color"][i], food=columns["food"][i],
                   home=columns["home"][i], sound=columns["sound"][i], friend=friend.get(name))
            for i, name in enumerate(names)]


def generate_world(seed: int, n_entities: int, n_practice: int) -> World:
    """Generate the world of ``seed`` with ``n_entities`` creatures, ``n_practice`` of them practice creatures.

    Kinds, places and attribute values are drawn from fixed pools; within each group (practice, tested)
    every attribute is assigned so that its values are used equally often (which keeps every benchmark and
    every quiz free of a "most frequent answer" bias), and best friends are a random perfect matching.

    Raises:
        ValueError: fewer than 4 practice or 8 tested creatures (a benchmark item needs 4 distinct choices
            from the tested group).
    """
    if n_practice < 4 or n_entities - n_practice < 8:
        raise ValueError(f"world: need at least 4 practice and 8 tested creatures (n_entities {n_entities}, "
                         f"n_practice {n_practice})")
    rng = random.Random(f"coalora-world:{seed}")
    kinds = tuple(
        Kind(name=name, plural=name + "s", winter=winter[0], covering=covering)
        for name, winter, covering in zip(rng.sample(KIND_POOL, N_KINDS), rng.sample(WINTER_POOL, N_KINDS),
                                          rng.sample(COVERING_POOL, N_KINDS))
    )
    sounds = rng.sample(SOUND_POOL, N_VALUES)
    values = {
        "color": tuple(rng.sample(COLOR_POOL, N_VALUES)),
        "food": tuple(rng.sample(FOOD_POOL, N_VALUES)),
        "home": tuple(rng.sample(PLACE_POOL, N_VALUES)),
        "sound": tuple(third for third, _ in sounds),
    }
    verb_base = dict(sounds) | dict(WINTER_POOL)
    verb_base = {third: verb_base[third] for third in values["sound"] + tuple(k.winter for k in kinds)}
    reserved = set(RESERVED_WORDS) | {w.lower() for pool in (KIND_POOL, PLACE_POOL, COLOR_POOL, FOOD_POOL,
                                                                COVERING_POOL) for w in pool}
    reserved |= {w for pool in (SOUND_POOL, WINTER_POOL) for forms in pool for form in forms for w in form.split()}
    names = invent_names(rng, n_entities, reserved)
    entities = _group(names[:n_practice], values, kinds, rng) + _group(names[n_practice:], values, kinds, rng)
    return World(seed=seed, kinds=kinds, entities=tuple(entities), values=values, verb_base=verb_base,
                 practice=tuple(names[:n_practice]))
