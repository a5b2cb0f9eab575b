"""The embedded world and its files: schemas, determinism. Its benchmark items (balance, answerability, no
leaks, learnability): test_world_items.py."""

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
from coalora.data.embedded import WORLD_FILE, build_embedded, write_embedded
from coalora.data.layout import BENCHMARK_KEYS, FILES, TEXT_KEYS, data_file
from coalora.data.summary import BENCHMARK_NAMES
from coalora.data.world import World, generate_world
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


def test_default_sizes_schemas(default_world):
    _, rows, _ = default_world
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
