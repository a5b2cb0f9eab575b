"""The embedded world and its files: schemas, determinism, balance, answerability, learnability, no leaks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from coalora.artifacts import read_json, read_jsonl
from coalora.data import phrasing as ph
from coalora.data.benchmarks import benchmark_items, capacity
from coalora.data.embedded import WORLD_FILE, build_embedded, write_embedded
from coalora.data.layout import BENCHMARK_KEYS, FILES, TEXT_KEYS, data_file
from coalora.data.leaks import leaked_items, normalise, probes, training_documents
from coalora.data.summary import BENCHMARK_NAMES
from coalora.data.world import World, generate_world
from coalora.errors import UserError
from coalora.params import load_params, validate
from coalora.stages.core import run_stage
from coalora.stages.data import STAGE
from coalora.stages.evaluate import benchmark_names

ROOT = Path(__file__).resolve().parents[1]


def params_with(profile: str | None = None, **world_or_seed):
    raw = load_params(ROOT, profile).model_dump(mode="json")
    if "seed" in world_or_seed:
        raw["seed"] = world_or_seed.pop("seed")
    raw["world"].update(world_or_seed)
    return validate(raw)


@pytest.fixture(scope="module")
def default():
    """The default-size world (params.yaml) in memory: world, rows per file, benchmark items."""
    params = load_params(ROOT)
    world, rows = build_embedded(params.seed, **params.world.model_dump())
    items = benchmark_items(world, params.world.n_items, params.seed)
    return world, rows, items


# ---- the world ------------------------------------------------------------------------------------------
def test_world_is_deterministic_and_round_trips_through_json():
    world = generate_world(5, 30, 10)
    assert world == generate_world(5, 30, 10)
    assert generate_world(6, 30, 10) != world
    assert World.from_dict(json.loads(json.dumps(world.to_dict()))) == world


def test_world_names_groups_and_balanced_attributes():
    world = generate_world(11, 96, 24)
    names = [e.name.lower() for e in world.entities]
    assert len(set(names)) == 96
    assert not any(a != b and b.startswith(a) for a in names for b in names), "a name is a prefix of another"
    assert world.practice == tuple(e.name for e in world.entities[:24]) and len(world.tested()) == 72
    for group in (world.entities[:24], world.tested()):   # balanced within each group, not just overall
        for relation in ("kind", "color", "food", "home", "sound"):
            counts = Counter(getattr(e, relation) for e in group)
            assert len(counts) == 6 and max(counts.values()) - min(counts.values()) <= 1, relation
    for entity in world.entities:  # best friends are mutual, and of the same group
        assert entity.friend and world.entity(entity.friend).friend == entity.name
        assert world.is_practice(entity.friend) == world.is_practice(entity.name)
    odd = generate_world(11, 22, 5)  # two odd-sized groups: one creature without a friend in each
    assert sum(e.friend is None for e in odd.entities) == 2
    with pytest.raises(ValueError, match="at least 4 practice and 8 tested"):
        generate_world(11, 20, 13)


def test_no_name_is_a_word_of_the_corpus():
    """Every word of the text is a creature's name, a pool word, or reserved (so no creature is called "Lake")."""
    from coalora.data import world as w

    world, rows = build_embedded(21, 40, 10, 300, 300, 20, 100, 40)
    names = {e.name.lower() for e in world.entities}
    pools = {x.lower() for pool in (w.KIND_POOL, w.PLACE_POOL, w.COLOR_POOL, w.FOOD_POOL, w.COVERING_POOL)
             for x in pool}
    pools |= {k + "s" for k in pools} | {x for pool in (w.SOUND_POOL, w.WINTER_POOL) for forms in pool
                                         for form in forms for x in form.split()}
    words = {x for key in ("c4_pretrain", "c4_train", "instruct", "boolq", "arc_easy", "arc_challenge", "winogrande")
             for row in rows[key] for field in ("text", "instruction", "input", "output", "question", "passage",
                                                "sentence") if field in row
             for x in re.findall(r"[a-z]+", row[field].lower()) if len(x) >= 4}
    assert words - names - pools <= w.RESERVED_WORDS, sorted(words - names - pools - w.RESERVED_WORDS)
    assert not names & w.RESERVED_WORDS


def test_rules_hold_for_every_member():
    world = generate_world(3, 20, 4)
    for entity in world.entities:
        kind = world.kind_of(entity.name)
        assert world.holds(ph.Fact(kind.name, "winter", kind.winter))
    assert len(world.facts()) == 20 * 6 + 6 * 2
    assert {r["relation"] for r in world.relations()} == {"friend_of", "lives_near"}


# ---- files: schemas, determinism ----------------------------------------------------------------------------
SCHEMAS = {
    "c4_pretrain": {"text": str, "timestamp": str, "url": str},
    "c4_train": {"text": str, "timestamp": str, "url": str},
    "c4_validation": {"text": str, "timestamp": str, "url": str},
    "instruct": {"instruction": str, "input": str, "output": str},
    "boolq": {"question": str, "passage": str, "idx": int, "label": int},
    "arc_easy": {"id": str, "question": str, "choices": dict, "answerKey": str},
    "arc_challenge": {"id": str, "question": str, "choices": dict, "answerKey": str},
    "winogrande": {"sentence": str, "option1": str, "option2": str, "answer": str},
}


def check_schema(key: str, row: dict) -> None:
    schema = SCHEMAS[key]
    assert set(row) == set(schema), (key, row)
    for field, typ in schema.items():
        assert type(row[field]) is typ, (key, field, row)
    if key in TEXT_KEYS:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["timestamp"])
        assert re.fullmatch(r"https://[a-z0-9-]+\.example/[a-z0-9-]+", row["url"])
    if key == "boolq":
        assert row["label"] in (0, 1)
        assert row["question"] == row["question"].lower() and not row["question"].endswith("?")
    if key.startswith("arc"):
        assert set(row["choices"]) == {"text", "label"} and row["choices"]["label"] == ["A", "B", "C", "D"]
        assert all(type(t) is str for t in row["choices"]["text"]) and len(row["choices"]["text"]) == 4
        assert row["answerKey"] in row["choices"]["label"]
    if key == "winogrande":
        assert row["sentence"].count("_") == 1 and row["answer"] in ("1", "2")
        assert row["option1"] != row["option2"]
        assert row["sentence"].split("_")[1].strip(), "nothing to score after the blank"


def test_write_embedded_smoke_profile(tmp_path):
    params = load_params(ROOT, "smoke")
    summary = write_embedded(params, tmp_path)
    w = params.world
    expected = {"c4_pretrain": w.n_pretrain_docs, "c4_train": w.n_train_docs, "c4_validation": w.n_validation_docs,
                "instruct": w.n_instructions,
                **{key: w.n_items for key in BENCHMARK_KEYS}}
    for key, count in expected.items():
        rows = read_jsonl(data_file(tmp_path, key))
        assert len(rows) == count and summary["files"][FILES[key]] == count
        for row in rows:
            check_schema(key, row)
    world = World.from_dict(read_json(tmp_path / WORLD_FILE))
    assert world == generate_world(params.seed, w.n_entities, w.n_practice)
    assert summary["world"]["entities"] == w.n_entities
    assert summary["world"]["tested"] == w.n_entities - w.n_practice
    assert summary["labels"]["boolq"] == {"0": w.n_items // 2, "1": w.n_items // 2}
    json.dumps(summary)
    # the report calls the benchmarks what they are (stages.evaluate.benchmark_names reads the summary)
    (tmp_path / "stage.json").write_text(json.dumps({"summary": summary}))
    names = benchmark_names(tmp_path, BENCHMARK_KEYS)
    tested = w.n_entities - w.n_practice
    assert names["arc_challenge"].startswith(f"synthetic ARC-Challenge-format quiz about {tested} held-out creatures")
    assert all(f"{BENCHMARK_NAMES[key]}-format" in names[key] and "never asked" in names[key] for key in BENCHMARK_KEYS)


def test_benchmark_names_read_a_source_s_own_names(tmp_path):
    """A source may describe a benchmark by a string or by an object with a ``name`` (packaged); else the
    report falls back to the task and the source."""
    summary = {"source": "packaged", "benchmarks": {"boolq": {"name": "BoolQ validation, 3,270 items"},
                                                    "arc_easy": "ARC-Easy test"}}
    (tmp_path / "stage.json").write_text(json.dumps({"summary": summary}))
    assert benchmark_names(tmp_path, ["boolq", "arc_easy", "winogrande"]) == {
        "boolq": "BoolQ validation, 3,270 items", "arc_easy": "ARC-Easy test",
        "winogrande": "WinoGrande (packaged data)"}


def test_default_sizes_schemas(default):
    _, rows, _ = default
    for key, key_rows in rows.items():
        for row in key_rows:
            check_schema(key, row)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    params = load_params(ROOT, "smoke")
    write_embedded(params, tmp_path / "a")
    write_embedded(params, tmp_path / "b")
    write_embedded(params_with("smoke", seed=params.seed + 1), tmp_path / "c")
    for rel in list(FILES.values()) + [WORLD_FILE]:
        a, b, c = ((tmp_path / d / rel).read_bytes() for d in "abc")
        assert a == b, rel
        assert a != c, rel


def test_same_bytes_in_another_process_with_another_hash_seed(tmp_path):
    """Nothing may depend on set/dict ordering of strings (PYTHONHASHSEED) or on the process."""
    write_embedded(load_params(ROOT, "smoke"), tmp_path / "here")
    script = ("import sys; from pathlib import Path; from coalora.params import load_params; "
              "from coalora.data.embedded import write_embedded; "
              "write_embedded(load_params(sys.argv[1], 'smoke'), Path(sys.argv[2]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(ROOT), str(tmp_path / "there")], check=True, env=env, cwd=ROOT)
    for rel in list(FILES.values()) + [WORLD_FILE]:
        assert (tmp_path / "here" / rel).read_bytes() == (tmp_path / "there" / rel).read_bytes(), rel


def test_stage_runs_and_summarises(tmp_path):
    summary = run_stage(STAGE, load_params(ROOT, "smoke"), tmp_path, progress=False)
    out = STAGE.out_dir(tmp_path)
    assert summary["source"] == "embedded"
    assert all((out / rel).is_file() for rel in FILES.values())
    assert run_stage(STAGE, load_params(ROOT, "smoke"), tmp_path, progress=False) == summary  # up to date


# ---- balance and bias ----------------------------------------------------------------------------------------
def test_labels_are_balanced(default):
    _, rows, _ = default
    n = len(rows["boolq"])
    assert Counter(r["label"] for r in rows["boolq"]) == {0: n // 2, 1: n // 2}
    assert Counter(r["answer"] for r in rows["winogrande"]) == {"1": n // 2, "2": n // 2}
    for key in ("arc_easy", "arc_challenge"):
        assert Counter(r["answerKey"] for r in rows[key]) == {k: n // 4 for k in "ABCD"}


def test_boolq_balanced_within_every_question_form(default):
    _, rows, _ = default
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
def test_no_fixed_strategy_beats_chance_on_arc(default, key):
    rows = default[1][key]
    truth = [r["answerKey"] for r in rows]
    for label in "ABCD":
        assert _accuracy([label] * len(rows), truth) == pytest.approx(0.25, abs=0.01)
    # The answer prior a model can learn: how often each string follows "Answer:" in the trained-on text.
    prior = Counter(re.findall(r"\nAnswer: ([^\n]+)", "\n".join(training_documents(default[1]))))
    strategies = {"longest": lambda t, r: len(t), "shortest": lambda t, r: -len(t),
                  "most frequent answer": lambda t, r: prior[t], "least frequent answer": lambda t, r: -prior[t]}
    for name, score in strategies.items():
        assert _arc_choice_by(rows, score) == pytest.approx(0.25, abs=0.08), name


def test_no_fixed_strategy_beats_chance_on_boolq_and_winogrande(default):
    rows = default[1]
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


def test_oracle_that_knows_the_world_scores_100(default):
    world, rows, _ = default
    assert all(oracle_boolq(world, r) == r["label"] for r in rows["boolq"])
    for key in ("arc_easy", "arc_challenge"):
        for r in rows[key]:
            assert oracle_arc(world, r) == [r["answerKey"]], r  # exactly one true choice: the key
    for r in rows["winogrande"]:
        assert oracle_winogrande(world, r) == [r["answer"]], r


def test_arc_choices_are_distinct(default):
    for key in ("arc_easy", "arc_challenge"):
        for r in default[1][key]:
            assert len(set(r["choices"]["text"])) == 4


def test_arc_challenge_needs_more_than_one_stored_fact(default):
    """Challenge items need a rule (two facts), a friendship, or a reverse look-up (a creature as answer)."""
    world, _, items = default
    names = {e.name for e in world.entities}
    for item in items["arc_challenge"]:
        answer = item.row["choices"]["text"]["ABCD".index(item.row["answerKey"])]
        assert len(item.facts) == 2 or answer in names, item.row
    for item in items["arc_easy"]:
        assert len(item.facts) == 1 and item.facts[0].relation != "friend"
    assert sum(len(i.facts) == 2 for i in items["arc_challenge"]) >= len(items["arc_challenge"]) // 3


def test_benchmark_items_are_distinct_and_about_tested_creatures(default):
    world, rows, items = default
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
def test_no_benchmark_item_leaks_into_trained_text(profile, default):
    """The pretraining text, the fine-tuning text and the instruction data never hold a benchmark question
    (BoolQ, ARC) nor a WinoGrande sentence filled in with either option."""
    if profile is None:
        rows = default[1]
    else:
        params = load_params(ROOT, profile)
        rows = build_embedded(params.seed, **params.world.model_dump())[1]
    found = leaked_items({key: rows[key] for key in BENCHMARK_KEYS}, training_documents(rows))
    assert found == {key: [] for key in BENCHMARK_KEYS}


def test_the_leak_check_would_catch_the_old_world_s_quizzes(default):
    """The same question form asked about a tested creature (what the quizzes did before) is caught."""
    world, rows, items = default
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
def test_every_benchmark_fact_is_stated_many_times(default, key, least):
    """The pretraining text teaches every fact a benchmark asks; the fine-tuning text restates them (other
    pages), so an adapter can recover what quantization damaged."""
    world, rows, items = default
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


def test_text_practises_every_lm_eval_prompt_format_on_practice_creatures(default):
    world, rows, items = default
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


def test_no_answers_are_stated_facts(default):
    """A BoolQ "no" asks a creature's foil, which the text negates (and never asks about a tested creature)."""
    world, rows, items = default
    sentences = _sentences(_text(rows, "c4_pretrain"))
    for item in items["boolq"]:
        subject = item.facts[0].subject
        qtype = ph.BOOLQ_TYPES[item.form]
        foil = ph.foil(world, qtype.relation, subject)
        assert foil != ph.entity_value(world, subject, qtype.relation)
        if not item.row["label"]:
            assert sum(sentences[s] for s in ph.negations(world, qtype.relation, subject)) >= 2, item.row


def test_text_splits_share_no_page(default):
    world, rows, _ = default
    texts = {key: [r["text"] for r in rows[key]] for key in TEXT_KEYS}
    for key, split in texts.items():
        assert len(set(split)) == len(split), key
    assert not set(texts["c4_pretrain"]) & set(texts["c4_train"])
    assert not (set(texts["c4_pretrain"]) | set(texts["c4_train"])) & set(texts["c4_validation"])
    names = {e.name for e in world.entities}
    assert all(any(n in t for n in names) or "Question:" in t for t in texts["c4_validation"])
    urls = [r["url"] for key in TEXT_KEYS for r in rows[key]]
    assert len(set(urls)) == len(urls)


def test_documents_are_short_web_pages(default):
    _, rows, _ = default
    for key in TEXT_KEYS:
        words = [len(r["text"].split()) for r in rows[key]]
        assert sum(30 <= w <= 150 for w in words) >= 0.8 * len(words), key
        assert max(words) <= 250
