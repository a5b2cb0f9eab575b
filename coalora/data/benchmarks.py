"""The embedded world's benchmarks, in the exact schemas lm-eval's BoolQ, ARC and WinoGrande tasks read.

Every item is about the *tested* creatures (world.py), whose facts the text states but never asks: no
item's question (nor a WinoGrande sentence filled in) occurs in any text a model is trained on
(``coalora.data.leaks``). Every item is answerable from the world (an oracle that knows it scores 100%),
and no fixed strategy beats chance: labels are dealt from balanced decks (BoolQ yes/no balanced *within*
every question type, ARC answer keys uniform over A–D, WinoGrande answers 50/50), answers are balanced
attribute values, and wrong choices are uniform draws from the same pool as the answer (a creature's name:
from the tested creatures), so neither position, length nor answer frequency carries information.

Items are distinct: each (question type, creature) is asked at most once per benchmark (a WinoGrande
sentence: each (relation, creature)), so a world of T tested creatures holds 5·T ARC-Easy, 5·T
ARC-Challenge, up to 8·T BoolQ and 7·T WinoGrande items
(:func:`capacity`); asking for more is an error naming ``world.n_items``.

ARC-Easy asks one stored fact about a creature. ARC-Challenge needs two hops (the creature's kind, then
the kind's rule: "What does Zorp do in winter?"), a friendship (a creature as the answer), or a reverse
look-up ("Which of these creatures lives in Tarnwood?").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from coalora.data import phrasing as ph
from coalora.data.corpus import pick_pair
from coalora.data.world import Fact, World
from coalora.errors import UserError

ARC_LABELS = ("A", "B", "C", "D")
ARC_ID_PREFIX = {"easy": "WorldEasy", "challenge": "WorldChallenge"}


@dataclass(frozen=True)
class Item:
    """One benchmark row (exactly the file's schema), the world facts that answer it, and its question form
    (the ARC or BoolQ question type's name, the relation a WinoGrande sentence is about)."""

    row: dict
    facts: tuple[Fact, ...]
    form: str


def balanced(n: int, k: int, rng: random.Random) -> list[int]:
    """``n`` labels in ``range(k)``, each ``n // k`` or one more times, shuffled."""
    offset = rng.randrange(k)  # which labels get the remainder
    labels = [(i + offset) % k for i in range(n)]
    rng.shuffle(labels)
    return labels


def round_robin(pools: list[list], n: int, rng: random.Random) -> list:
    """``n`` distinct picks, one pool at a time in turn, each pool in shuffled order (a pool that runs out
    drops out of the turn).

    Raises:
        ValueError: the pools hold fewer than ``n`` candidates.
    """
    if sum(len(pool) for pool in pools) < n:
        raise ValueError(f"{n} items asked, but there are only {sum(len(pool) for pool in pools)} candidates")
    queues = [rng.sample(pool, len(pool)) for pool in pools]
    picks: list = []
    while len(picks) < n:
        for queue in queues:
            if queue and len(picks) < n:
                picks.append(queue.pop())
    return picks


# ---- BoolQ ------------------------------------------------------------------------------------------------
def _boolq_pool(world: World, qtype: ph.BoolqType, rng: random.Random) -> list[tuple[str, str, bool]]:
    """Candidate questions ``(creature, value, answer)`` of one type, one per tested creature, half of them
    "yes" (its true value) and half "no" (its foil), interleaved so that any prefix is balanced."""
    subjects = [e.name for e in world.tested() if ph.askable(world, qtype, e.name)]
    rng.shuffle(subjects)
    subjects = subjects[:len(subjects) // 2 * 2]
    yes = [(s, ph.entity_value(world, s, qtype.relation), True) for s in subjects[0::2]]
    no = [(s, ph.foil(world, qtype.relation, s), False) for s in subjects[1::2]]
    return [cand for pair in zip(yes, no) for cand in pair]


def boolq_items(world: World, n: int, rng: random.Random) -> list[Item]:
    """``n`` BoolQ rows ``{question, passage, idx, label}``, label 1 = yes, balanced within every type."""
    pairs = []
    for qtype in ph.BOOLQ_TYPES.values():
        pool = _boolq_pool(world, qtype, rng)
        pairs.append([(qtype, pool[i], pool[i + 1]) for i in range(0, len(pool), 2)])
    picks = [(qtype, cand) for qtype, *two in round_robin(pairs, (n + 1) // 2, rng) for cand in two][:n]
    rng.shuffle(picks)
    items = []
    for idx, (qtype, (subject, value, answer)) in enumerate(picks):
        question, facts = ph.boolq_question(world, qtype, subject, value)
        text = ph.passage(world, subject, qtype.exclude, rng)
        items.append(Item({"question": question, "passage": text, "idx": idx, "label": int(answer)}, facts,
                          qtype.name))
    return items


# ---- ARC ----------------------------------------------------------------------------------------------------
def arc_items(world: World, n: int, level: str, rng: random.Random) -> list[Item]:
    """``n`` ARC rows ``{id, question, choices: {text, label}, answerKey}`` of ``level`` easy|challenge."""
    types = [t for t in ph.ARC_TYPES.values() if t.level == level]
    pools = [[(t, s) for s in t.subjects(world, world.tested())] for t in types]
    positions = balanced(n, len(ARC_LABELS), rng)
    items = []
    for i, ((qtype, subject), pos) in enumerate(zip(round_robin(pools, n, rng), positions)):
        q = qtype.ask(world, subject, rng.choice(qtype.templates))
        choices = rng.sample(q.wrong, len(ARC_LABELS) - 1)
        choices.insert(pos, q.answer)
        row = {"id": f"{ARC_ID_PREFIX[level]}_{i:05d}", "question": q.text,
               "choices": {"text": choices, "label": list(ARC_LABELS)}, "answerKey": ARC_LABELS[pos]}
        items.append(Item(row, q.facts, qtype.name))
    return items


# ---- WinoGrande -----------------------------------------------------------------------------------------------
def winogrande_items(world: World, n: int, rng: random.Random) -> list[Item]:
    """``n`` WinoGrande rows ``{sentence, option1, option2, answer}``: the sentence has one "_", the answer
    ("1"/"2") is the option whose world fact the rest of the sentence states; both options are tested
    creatures."""
    relations = list(dict.fromkeys(rel for rel, _ in ph.WINO_TEMPLATES))
    pools = [[(rel, e.name) for e in world.tested() if rel != "friend" or e.friend] for rel in relations]
    answers = balanced(n, 2, rng)
    items = []
    for (relation, subject), answer in zip(round_robin(pools, n, rng), answers):
        template = rng.choice([tmpl for rel, tmpl in ph.WINO_TEMPLATES if rel == relation])
        a, b = pick_pair(world, relation, rng, subject)
        options = (a, b) if answer == 0 else (b, a)
        sentence = template.format(a=options[0], b=options[1], v=ph.entity_value(world, a, relation))
        row = {"sentence": sentence, "option1": options[0], "option2": options[1], "answer": str(answer + 1)}
        items.append(Item(row, ph.wino_facts(world, a, relation), relation))
    return items


def capacity(world: World) -> dict[str, int]:
    """The most distinct items each benchmark can hold (module docstring)."""
    tested = world.tested()
    with_friend = sum(bool(e.friend) for e in tested)
    boolq = sum(len([e for e in tested if ph.askable(world, t, e.name)]) // 2 * 2 for t in ph.BOOLQ_TYPES.values())
    arc = {level: sum(len(t.subjects(world, tested)) for t in ph.ARC_TYPES.values() if t.level == level)
           for level in ("easy", "challenge")}
    wino = sum(with_friend if rel == "friend" else len(tested) for rel in {rel for rel, _ in ph.WINO_TEMPLATES})
    return {"boolq": boolq, "arc_easy": arc["easy"], "arc_challenge": arc["challenge"], "winogrande": wino}


def benchmark_items(world: World, n: int, seed: int) -> dict[str, list[Item]]:
    """The four evaluation splits, ``n`` items each, keyed as in ``layout.BENCHMARK_KEYS``.

    Raises:
        UserError: naming ``world.n_items`` when a benchmark cannot hold ``n`` distinct items.
    """
    short = {key: m for key, m in capacity(world).items() if m < n}
    if short:
        raise UserError(f"world.n_items: {n} items per benchmark, but {len(world.tested())} tested creatures "
                        f"hold only {short} distinct items; lower world.n_items to at most {min(short.values())} "
                        f"or raise world.n_entities")

    def rng(name: str) -> random.Random:
        return random.Random(f"coalora-bench:{seed}:{name}")
    return {
        "boolq": boolq_items(world, n, rng("boolq")),
        "arc_easy": arc_items(world, n, "easy", rng("arc_easy")),
        "arc_challenge": arc_items(world, n, "challenge", rng("arc_challenge")),
        "winogrande": winogrande_items(world, n, rng("winogrande")),
    }
