"""The embedded world's benchmark items: balanced, unbiased, answerable from the world, learnable from the text,
never leaked into any text a model is trained on."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from coalora.data import phrasing as ph
from coalora.data.benchmarks import benchmark_items, capacity
from coalora.data.embedded import build_embedded
from coalora.data.layout import BENCHMARK_KEYS, TEXT_KEYS
from coalora.data.leaks import leaked_items, normalise, probes, training_documents
from coalora.data.world import World, generate_world
from coalora.errors import UserError
from coalora.params import load_params

ROOT = Path(__file__).resolve().parents[1]






# ---- balance and bias ----------------------------------------------------------------------------------------
def test_labels_are_balanced(default_world):
    _, rows, _ = default_world
    n = len(rows["boolq"])
    assert Counter(r["label"] for r in rows["boolq"]) == {0: n // 2, 1: n // 2}
    assert Counter(r["answer"] for r in rows["winogrande"]) == {"1": n // 2, "2": n // 2}
    for key in ("arc_easy", "arc_challenge"):
        assert Counter(r["answerKey"] for r in rows[key]) == {k: n // 4 for k in "ABCD"}


def test_boolq_balanced_within_every_question_form(default_world):
    _, rows, _ = default_world
    forms = Counter((r["question"].split()[0], r["question"].split()[-1] == "winter", r["label"])
                    for r in rows["boolq"])
    for (first, winter, label), count in forms.items():
        assert count == forms[(first, winter, 1 - label)], (first, winter)


def _accuracy(predictions: list, truths: list) -> float:
    return sum(p == t for p, t in zip(predictions, truths)) / len(truths)


def _answer(row: dict) -> str:
    return row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]


def _arc_choice_by(rows: list[dict], score) -> float:
    """Accuracy of picking the highest-scoring choice; ``score(text, row)``."""
    picks = []
    for r in rows:
        texts = r["choices"]["text"]
        picks.append(r["choices"]["label"][max(range(4), key=lambda i: (score(texts[i], r), -i))])
    return _accuracy(picks, [r["answerKey"] for r in rows])


@pytest.mark.parametrize("key", ["arc_easy", "arc_challenge"])
def test_no_fixed_strategy_beats_chance_on_arc(default_world, key):
    rows = default_world[1][key]
    truth = [r["answerKey"] for r in rows]
    for label in "ABCD":
        assert _accuracy([label] * len(rows), truth) == pytest.approx(0.25, abs=0.01)
    # The answer prior a model can learn: how often each string follows "Answer:" in the trained-on text.
    prior = Counter(re.findall(r"\nAnswer: ([^\n]+)", "\n".join(training_documents(default_world[1]))))
    strategies = {"longest": lambda t, r: len(t), "shortest": lambda t, r: -len(t),
                  "most frequent answer": lambda t, r: prior[t], "least frequent answer": lambda t, r: -prior[t]}
    for name, score in strategies.items():
        assert _arc_choice_by(rows, score) == pytest.approx(0.25, abs=0.08), name


def test_no_fixed_strategy_beats_chance_on_boolq_and_winogrande(default_world):
    rows = default_world[1]
    boolq, wino = rows["boolq"], rows["winogrande"]
    labels = [r["label"] for r in boolq]
    assert _accuracy([1] * len(boolq), labels) == 0.5
    assert _accuracy([0] * len(boolq), labels) == 0.5
    # "yes when the question's last word occurs in the passage" (reading instead of knowing)
    overlap = [int(r["question"].split()[-1] in r["passage"].lower()) for r in boolq]
    assert _accuracy(overlap, labels) == pytest.approx(0.5, abs=0.08)
    answers = [r["answer"] for r in wino]
    assert _accuracy(["1"] * len(wino), answers) == 0.5
    longer = ["1" if len(r["option1"]) >= len(r["option2"]) else "2" for r in wino]
    assert _accuracy(longer, answers) == pytest.approx(0.5, abs=0.08)
    first_in_sentence = ["1" if r["sentence"].index(r["option1"]) < r["sentence"].index(r["option2"]) else "2"
                         for r in wino]
    assert _accuracy(first_in_sentence, answers) == pytest.approx(0.5, abs=0.08)


# ---- answerability: an oracle that reads only the world ---------------------------------------------------------
def _phrases(world: World, entity: str) -> set[str]:
    """Every word or phrase that is true of an entity (lowercase)."""
    e, kind = world.entity(entity), world.kind_of(entity)
    out = {e.color, e.food, e.home, e.sound, world.base(e.sound), kind.name, kind.plural, kind.winter,
           world.base(kind.winter), kind.covering, e.friend or ""}
    return {p.lower() for p in out if p}


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w']){re.escape(phrase)}(?![\w'])", text.lower()) is not None


def oracle_boolq(world: World, row: dict) -> int:
    q = row["question"]
    names = [e.name for e in world.entities if _mentions(q, e.name.lower())]
    subject = min(names, key=lambda n: q.index(n.lower()))
    rest = q.replace(subject.lower(), " ", 1)
    return int(any(_mentions(rest, p) for p in _phrases(world, subject)))


def oracle_arc(world: World, row: dict) -> list[str]:
    """The labels of every choice the world makes true."""
    q, texts = row["question"], row["choices"]["text"]
    names = {e.name for e in world.entities}
    if all(t in names for t in texts):  # who is ...? which creature ...?
        keys = [w.lower() for w in re.findall(r"[A-Z][a-z]+", q) if w in names or w in world.values["home"]]
        keys += [k.name for k in world.kinds if _mentions(q, k.name) or _mentions(q, k.plural)]
        good = [i for i, t in enumerate(texts) if any(_mentions(" ".join(_phrases(world, t)), k) for k in keys)]
    else:
        subject = next(n for n in names if _mentions(q, n.lower()))
        truths = _phrases(world, subject)
        good = [i for i, t in enumerate(texts) if t.lower().removeprefix("a ") in truths]
    return [row["choices"]["label"][i] for i in good]


def oracle_winogrande(world: World, row: dict) -> list[str]:
    after = row["sentence"].split("_")[1]
    return [str(i + 1) for i, option in enumerate((row["option1"], row["option2"]))
            if any(_mentions(after, p) for p in _phrases(world, option))]


def test_oracle_that_knows_the_world_scores_100(default_world):
    world, rows, _ = default_world
    assert all(oracle_boolq(world, r) == r["label"] for r in rows["boolq"])
    for key in ("arc_easy", "arc_challenge"):
        for r in rows[key]:
            assert oracle_arc(world, r) == [r["answerKey"]], r  # exactly one true choice: the key
    for r in rows["winogrande"]:
        assert oracle_winogrande(world, r) == [r["answer"]], r


def test_arc_choices_are_distinct(default_world):
    for key in ("arc_easy", "arc_challenge"):
        for r in default_world[1][key]:
            assert len(set(r["choices"]["text"])) == 4


def test_arc_challenge_needs_more_than_one_stored_fact(default_world):
    """Challenge items need a rule (two facts), a friendship, or a reverse look-up (a creature as answer)."""
    world, _, items = default_world
    names = {e.name for e in world.entities}
    for item in items["arc_challenge"]:
        answer = item.row["choices"]["text"]["ABCD".index(item.row["answerKey"])]
        assert len(item.facts) == 2 or answer in names, item.row
    for item in items["arc_easy"]:
        assert len(item.facts) == 1 and item.facts[0].relation != "friend"
    assert sum(len(i.facts) == 2 for i in items["arc_challenge"]) >= len(items["arc_challenge"]) // 3


def test_benchmark_items_are_distinct_and_about_tested_creatures(default_world):
    world, rows, items = default_world
    assert len({r["question"] for r in rows["boolq"]}) == len(rows["boolq"])
    assert len({r["sentence"] for r in rows["winogrande"]}) == len(rows["winogrande"])
    names = {e.name for e in world.entities}
    for key in BENCHMARK_KEYS:
        # each (question form, creature) at most once: no item repeats another's question about the same fact
        subjects = [(item.form, item.facts[0].subject) for item in items[key]]
        if key == "arc_challenge":  # reverse look-ups: the creature is the answer
            subjects = [(item.form, tuple(f.subject for f in item.facts)) for item in items[key]]
        assert len(set(subjects)) == len(subjects), key
        for item in items[key]:
            mentioned = {w for field in ("question", "passage", "sentence", "option1", "option2") if field in item.row
                         for w in re.findall(r"[A-Za-z]+", item.row[field]) if w.capitalize() in names}
            mentioned |= {t for t in item.row.get("choices", {}).get("text", ()) if t in names}
            assert mentioned and not any(world.is_practice(n.capitalize()) for n in mentioned), item.row


def test_the_default_world_holds_500_distinct_items_per_benchmark_and_refuses_more():
    params = load_params(ROOT)
    world = generate_world(params.seed, params.world.n_entities, params.world.n_practice)
    assert params.world.n_items >= 500
    assert min(capacity(world).values()) >= params.world.n_items
    tested = len(world.tested())
    assert capacity(world)["arc_easy"] == 5 * tested and capacity(world)["winogrande"] == 7 * tested
    small = generate_world(1, 20, 4)
    with pytest.raises(UserError, match=r"world\.n_items: 81 items .* at most 80"):
        benchmark_items(small, 81, 1)
    assert all(len(rows) == 80 for rows in benchmark_items(small, 80, 1).values())


# ---- no leaks: no benchmark item occurs in any text a model is trained on --------------------------------------
def test_leak_probes_find_a_planted_item_and_nothing_inside_longer_words():
    boolq = {"question": "does zorp eat fish", "passage": "", "idx": 0, "label": 0}
    arc = {"id": "x", "question": "What does Zorp eat?", "choices": {"text": ["fish"] * 4, "label": list("ABCD")},
           "answerKey": "A"}
    wino = {"sentence": "Zorp and Mip met, and _ was red.", "option1": "Zorp", "option2": "Mip", "answer": "1"}
    bench = {"boolq": [boolq], "arc_easy": [arc], "winogrande": [wino]}
    assert probes("winogrande", wino) == ["zorp and mip met, and zorp was red.", "zorp and mip met, and mip was red."]
    clean = ["Zorp does not eat fish.", "What does Zorpa eat?", "Zorp and Mip met, and Zorp was redder.",
             "Question: Does Zorp eat fishcakes?", "What does Zorp\x00eat?"]
    assert leaked_items(bench, clean) == {"boolq": [], "arc_easy": [], "winogrande": []}
    assert leaked_items(bench, ["Tell me what does Zorp eat"])["arc_easy"] == [0]  # strict: no "?" needed
    planted = ["Quiz\nQuestion: Does   Zorp EAT fish?\nAnswer: no", "zorp and mip met, and MIP was red. The end."]
    assert leaked_items(bench, planted) == {"boolq": [0], "arc_easy": [], "winogrande": [0]}
    assert normalise(" A\n b\t\tC ") == "a b c"


@pytest.mark.parametrize("profile", [None, "smoke"])
def test_no_benchmark_item_leaks_into_trained_text(profile, default_world):
    """The pretraining text, the fine-tuning text and the instruction data never hold a benchmark question
    (BoolQ, ARC) nor a WinoGrande sentence filled in with either option."""
    if profile is None:
        rows = default_world[1]
    else:
        params = load_params(ROOT, profile)
        rows = build_embedded(params.seed, **params.world.model_dump())[1]
    found = leaked_items({key: rows[key] for key in BENCHMARK_KEYS}, training_documents(rows))
    assert found == {key: [] for key in BENCHMARK_KEYS}


def test_the_leak_check_would_catch_the_old_world_s_quizzes(default_world):
    """The same question form asked about a tested creature (what the quizzes did before) is caught."""
    world, rows, items = default_world
    item = items["arc_easy"][0]
    qtype = ph.ARC_TYPES[item.form]
    quiz = ph.arc_block(item.row["question"], item.row["choices"]["text"]["ABCD".index(item.row["answerKey"])])
    found = leaked_items({"arc_easy": rows["arc_easy"]}, [quiz])
    assert 0 in found["arc_easy"] and qtype.level == "easy"


# ---- learnability: the text states every fact and practises every prompt format, on other creatures ------------
def _sentences(text: str) -> Counter:
    """How often each sentence occurs in ``text``."""
    return Counter(re.split(r"(?<=[.?!])[ \n]+|\n", text))


def _statement_counts(world: World, text: str, items) -> Counter:
    """For every fact the items need: how many sentences of the text state it."""
    sentences, counts = _sentences(text), Counter()
    for item in items:
        for fact in item.facts:
            counts[fact] = sum(sentences[s] for s in ph.statements(world, fact))
    return counts


def _text(rows: dict, key: str) -> str:
    return "\n".join(r["text"] for r in rows[key])


@pytest.mark.parametrize("key, least", [("c4_pretrain", 10), ("c4_train", 5)])
def test_every_benchmark_fact_is_stated_many_times(default_world, key, least):
    """The pretraining text teaches every fact a benchmark asks; the fine-tuning text restates them (other
    pages), so an adapter can recover what quantization damaged."""
    world, rows, items = default_world
    text = _text(rows, key)
    for bench in BENCHMARK_KEYS:
        counts = _statement_counts(world, text, items[bench])
        assert min(counts.values()) >= least, (bench, counts.most_common()[-3:])


def test_smoke_world_still_states_every_benchmark_fact():
    params = load_params(ROOT, "smoke")
    world, rows = build_embedded(params.seed, **params.world.model_dump())
    items = benchmark_items(world, params.world.n_items, params.seed)
    text = _text(rows, "c4_pretrain")
    for key in BENCHMARK_KEYS:
        assert min(_statement_counts(world, text, items[key]).values()) >= 2, key


def test_text_practises_every_lm_eval_prompt_format_on_practice_creatures(default_world):
    world, rows, items = default_world
    for key in ("c4_pretrain", "c4_train"):
        text = _text(rows, key)
        yes = re.findall(r"\nQuestion: [a-z ]+\?\nAnswer: yes(?:\n|$)", text)
        no = re.findall(r"\nQuestion: [a-z ]+\?\nAnswer: no(?:\n|$)", text)
        assert len(yes) >= 300 and len(no) >= 300 and abs(len(yes) - len(no)) < 0.2 * len(yes)
        quiz = re.findall(r"(?:^|\n)Question: ([A-Z][^\n]*\?)\nAnswer: ([^\n]+)", text)
        assert len(quiz) >= 1000
        # every creature named in a question or an answer is a practice creature
        names = {e.name for e in world.entities}
        for question, answer in quiz + [(q, "") for q in re.findall(r"\nQuestion: ([a-z ]+)\?", text)]:
            named = {w.capitalize() for w in re.findall(r"[A-Za-z]+", question + " " + answer)} & names
            assert all(world.is_practice(n) for n in named), (question, answer)
    text = _text(rows, "c4_pretrain")
    # every BoolQ form with both answers, and every ARC form the benchmarks use, in the same words
    for qtype in ph.BOOLQ_TYPES.values():
        head = qtype.template.split()[0]
        for answer in ("yes", "no"):
            assert re.search(rf"\nQuestion: {head} [a-z ]+\?\nAnswer: {answer}", text), (qtype.name, answer)
    for qtype in ph.ARC_TYPES.values():
        for template in qtype.quiz_templates:
            form = re.sub(r"\\\{\w+\\\}", "[A-Za-z]+", re.escape(template))
            assert re.search(rf"\nQuestion: {form}\nAnswer: ", text), (qtype.name, template)


def test_no_answers_are_stated_facts(default_world):
    """A BoolQ "no" asks a creature's foil, which the text negates (and never asks about a tested creature)."""
    world, rows, items = default_world
    sentences = _sentences(_text(rows, "c4_pretrain"))
    for item in items["boolq"]:
        subject = item.facts[0].subject
        qtype = ph.BOOLQ_TYPES[item.form]
        foil = ph.foil(world, qtype.relation, subject)
        assert foil != ph.entity_value(world, subject, qtype.relation)
        if not item.row["label"]:
            assert sum(sentences[s] for s in ph.negations(world, qtype.relation, subject)) >= 2, item.row


def test_text_splits_share_no_page(default_world):
    world, rows, _ = default_world
    texts = {key: [r["text"] for r in rows[key]] for key in TEXT_KEYS}
    for key, split in texts.items():
        assert len(set(split)) == len(split), key
    assert not set(texts["c4_pretrain"]) & set(texts["c4_train"])
    assert not (set(texts["c4_pretrain"]) | set(texts["c4_train"])) & set(texts["c4_validation"])
    names = {e.name for e in world.entities}
    assert all(any(n in t for n in names) or "Question:" in t for t in texts["c4_validation"])
    urls = [r["url"] for key in TEXT_KEYS for r in rows[key]]
    assert len(set(urls)) == len(urls)


def test_documents_are_short_web_pages(default_world):
    _, rows, _ = default_world
    for key in TEXT_KEYS:
        words = [len(r["text"].split()) for r in rows[key]]
        assert sum(30 <= w <= 150 for w in words) >= 0.8 * len(words), key
        assert max(words) <= 250
