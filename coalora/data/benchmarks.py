"""The embedded world's benchmarks, in the exact schemas lm-eval's BoolQ, ARC and WinoGrande tasks read.

Every item is answerable from the world (an oracle that knows it scores 100%), and no fixed strategy
beats chance: labels are dealt from balanced decks (BoolQ yes/no balanced *within* every question type,
ARC answer keys uniform over A–D, WinoGrande answers 50/50), answers are drawn uniformly from balanced
attribute values, and wrong choices are uniform draws from the same pool as the answer, so neither
position, length nor answer frequency carries information.

ARC-Easy asks one stored fact about a creature, in a question form the train text practises. ARC-Challenge
needs two hops (the creature's kind, then the kind's rule: "What does Zorp do in winter?", a form the
quizzes never practise), a friendship (a creature as the answer), or a reverse look-up ("Which of these
creatures lives in Tarnwood?").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from coalora.data import phrasing as ph
from coalora.data.corpus import pick_pair
from coalora.data.world import Fact, World

ARC_LABELS = ("A", "B", "C", "D")
ARC_ID_PREFIX = {"easy": "WorldEasy", "challenge": "WorldChallenge"}


@dataclass(frozen=True)
class Item:
    """One benchmark row (exactly the file's schema) and the world facts that answer it."""

    row: dict
    facts: tuple[Fact, ...]


def balanced(n: int, k: int, rng: random.Random) -> list[int]:
    """``n`` labels in ``range(k)``, each ``n // k`` or one more times, shuffled."""
    offset = rng.randrange(k)  # which labels get the remainder
    labels = [(i + offset) % k for i in range(n)]
    rng.shuffle(labels)
    return labels


def round_robin(pools: list[list], n: int, rng: random.Random) -> list:
    """``n`` picks, one pool at a time in turn, each pool in shuffled order; a pool is reused (reshuffled)
    only after every pool is exhausted, so items stay distinct as long as there are enough."""
    picks: list = []
    while len(picks) < n:
        queues = [rng.sample(pool, len(pool)) for pool in pools if pool]
        if not queues:
            raise ValueError("no candidates to draw benchmark items from")
        while len(picks) < n and any(queues):
            for queue in queues:
                if queue and len(picks) < n:
                    picks.append(queue.pop())
    return picks


# ---- BoolQ ------------------------------------------------------------------------------------------------
def _boolq_pairs(world: World, qtype: ph.BoolqType, rng: random.Random) -> list[tuple[tuple, tuple]]:
    """(yes, no) pairs of candidate questions ``(subject, value, answer)`` of one type: every true question,
    each paired with a false one (a subject and its foil), so that the type's own yes/no ratio stays 1:1."""
    if qtype.about == "kind":
        subjects = [k.name for k in world.kinds]
    else:
        subjects = [e.name for e in world.entities if qtype.relation != "friend" or e.friend]
    yes = [(s, ph.wino_value(world, s, qtype.relation), True) for s in subjects]
    no = [(s, ph.foil(world, qtype.relation, s), False) for s in subjects]
    rng.shuffle(yes)
    rng.shuffle(no)
    return list(zip(yes, no))


def boolq_items(world: World, n: int, rng: random.Random) -> list[Item]:
    """``n`` BoolQ rows ``{question, passage, idx, label}``, label 1 = yes, balanced within every type."""
    pools = [[(qtype, pair) for pair in _boolq_pairs(world, qtype, rng)] for qtype in ph.BOOLQ_TYPES.values()]
    picks = [(qtype, cand) for qtype, pair in round_robin(pools, (n + 1) // 2, rng) for cand in pair][:n]
    rng.shuffle(picks)
    items = []
    for idx, (qtype, (subject, value, answer)) in enumerate(picks):
        question, facts = ph.boolq_question(world, qtype, subject, value)
        text = ph.passage(world, subject, qtype.about, qtype.exclude, rng)
        items.append(Item({"question": question, "passage": text, "idx": idx, "label": int(answer)}, facts))
    return items


# ---- ARC ----------------------------------------------------------------------------------------------------
def arc_items(world: World, n: int, level: str, rng: random.Random) -> list[Item]:
    """``n`` ARC rows ``{id, question, choices: {text, label}, answerKey}`` of ``level`` easy|challenge."""
    types = [t for t in ph.ARC_TYPES.values() if t.level == level]
    pools = [[(t, s, tmpl) for s in t.subjects(world) for tmpl in t.templates] for t in types]
    positions = balanced(n, len(ARC_LABELS), rng)
    items = []
    for i, ((qtype, subject, template), pos) in enumerate(zip(round_robin(pools, n, rng), positions)):
        q = qtype.ask(world, subject, template)
        choices = rng.sample(q.wrong, len(ARC_LABELS) - 1)
        choices.insert(pos, q.answer)
        row = {"id": f"{ARC_ID_PREFIX[level]}_{i:05d}", "question": q.text,
               "choices": {"text": choices, "label": list(ARC_LABELS)}, "answerKey": ARC_LABELS[pos]}
        items.append(Item(row, q.facts))
    return items


# ---- WinoGrande -----------------------------------------------------------------------------------------------
def winogrande_items(world: World, n: int, rng: random.Random) -> list[Item]:
    """``n`` WinoGrande rows ``{sentence, option1, option2, answer}``: the sentence has one "_", the answer
    ("1"/"2") is the option whose world fact the rest of the sentence states."""
    subjects = [e.name for e in world.entities]
    pools = [[(rel, tmpl, s) for s in subjects if rel != "friend" or world.entity(s).friend]
             for rel, tmpl in ph.WINO_TEMPLATES]
    answers = balanced(n, 2, rng)
    items, seen = [], set()
    for (relation, template, subject), answer in zip(round_robin(pools, n, rng), answers):
        for _ in range(20):  # prefer a sentence not drawn before
            a, b = pick_pair(world, relation, rng, subject)
            options = (a, b) if answer == 0 else (b, a)
            sentence = template.format(a=options[0], b=options[1], v=ph.wino_value(world, a, relation))
            if sentence not in seen:
                break
        seen.add(sentence)
        row = {"sentence": sentence, "option1": options[0], "option2": options[1], "answer": str(answer + 1)}
        items.append(Item(row, ph.wino_facts(world, a, relation)))
    return items


def benchmark_items(world: World, n: int, seed: int) -> dict[str, list[Item]]:
    """The four evaluation splits, ``n`` items each, keyed as in ``layout.BENCHMARK_KEYS``."""
    def rng(name: str) -> random.Random:
        return random.Random(f"coalora-bench:{seed}:{name}")
    return {
        "boolq": boolq_items(world, n, rng("boolq")),
        "arc_easy": arc_items(world, n, "easy", rng("arc_easy")),
        "arc_challenge": arc_items(world, n, "challenge", rng("arc_challenge")),
        "winogrande": winogrande_items(world, n, rng("winogrande")),
    }
