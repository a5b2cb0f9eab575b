"""Write the embedded world's data in the data stage's layout (layout.py), plus ``world.json``.

Everything is a deterministic function of ``params.seed`` and ``params.world``: the same params write the
same bytes.
"""

from __future__ import annotations

from pathlib import Path

from coalora.artifacts import write_json, write_jsonl
from coalora.data.benchmarks import benchmark_items
from coalora.data.corpus import instructions, text_splits
from coalora.data.layout import BENCHMARK_KEYS, data_file
from coalora.data.summary import BENCHMARK_NAMES, summarize
from coalora.data.world import World, generate_world
from coalora.params import Params

WORLD_FILE = "world.json"


def build_embedded(seed: int, n_entities: int, n_practice: int, n_pretrain_docs: int, n_train_docs: int,
                   n_validation_docs: int, n_instructions: int, n_items: int) -> tuple[World, dict[str, list[dict]]]:
    """The world and every layout file's rows (key → rows), in memory. The arguments are ``seed`` and the
    fields of ``params.world``."""
    world = generate_world(seed, n_entities, n_practice)
    text = text_splits(world, {"pretrain": n_pretrain_docs, "train": n_train_docs,
                               "validation": n_validation_docs}, seed)
    rows = {"c4_pretrain": text["pretrain"], "c4_train": text["train"], "c4_validation": text["validation"],
            "instruct": instructions(world, n_instructions, seed)}
    rows |= {key: [item.row for item in items] for key, items in benchmark_items(world, n_items, seed).items()}
    return world, rows


def write_embedded(params: Params, out: Path) -> dict:
    """Generate the world of ``params.seed``/``params.world`` and write the layout's files under ``out``.

    Returns:
        the summary: ``source``, ``files`` (relative path → rows), ``labels`` (per benchmark, label →
        count), ``words`` (text splits) and ``world`` (entities, kinds, places, facts).
    """
    out = Path(out)
    w = params.world
    world, rows = build_embedded(params.seed, **w.model_dump())
    for key, key_rows in rows.items():
        write_jsonl(data_file(out, key), key_rows)
    write_json(out / WORLD_FILE, world.to_dict())
    summary = {"source": "embedded", **summarize(rows)}
    tested = len(world.tested())
    # what the report calls each benchmark (coalora.stages.evaluate.benchmark_names): what it really is
    summary["benchmarks"] = {key: f"synthetic {BENCHMARK_NAMES[key]}-format quiz about {tested} held-out creatures "
                                  f"of the embedded world (facts stated in the pretraining text, never asked there)"
                             for key in BENCHMARK_KEYS}
    summary["world"] = {"entities": len(world.entities), "practice": len(world.practice),
                        "tested": tested, "kinds": len(world.kinds),
                        "places": len(world.values["home"]), "facts": len(world.facts())}
    return summary
