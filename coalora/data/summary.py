"""The summary of a data stage output: counts per file and the label balance of every benchmark."""

from __future__ import annotations

from collections import Counter

from coalora.data.layout import BENCHMARK_KEYS, FILES, TEXT_KEYS

LABEL_FIELDS = {"boolq": "label", "arc_easy": "answerKey", "arc_challenge": "answerKey", "winogrande": "answer"}
# What each benchmark is called in the report (coalora.stages.evaluate.benchmark_names).
BENCHMARK_NAMES = {"boolq": "BoolQ", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge",
                   "winogrande": "WinoGrande"}


def label_balance(key: str, rows: list[dict]) -> dict[str, int]:
    """How often each label occurs in a benchmark file (BoolQ label, ARC answerKey, WinoGrande answer)."""
    counts = Counter(str(row[LABEL_FIELDS[key]]) for row in rows)
    return dict(sorted(counts.items()))


def summarize(rows: dict[str, list[dict]]) -> dict:
    """``files`` (layout path → rows), ``labels`` (benchmark → label → count), ``words`` (text splits)."""
    return {
        "files": {FILES[key]: len(key_rows) for key, key_rows in rows.items()},
        "labels": {key: label_balance(key, rows[key]) for key in BENCHMARK_KEYS if key in rows},
        "words": {key: sum(len(row["text"].split()) for row in rows[key])
                  for key in TEXT_KEYS if key in rows},
    }
