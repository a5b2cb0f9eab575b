"""Benchmark leakage: whether a benchmark item occurs in text a model is trained on.

The definition is strict on purpose (it may flag more than a real leak, never less). Text is normalised
(lowercase, every run of whitespace one space); a *probe* of an item occurring in a training document as
whole words (not inside a longer word) makes the item leak:

    BoolQ       its question ("does zorp eat fish")
    ARC         its question, without the trailing "?" ("what does zorp eat")
    WinoGrande  its sentence with the blank filled by either option (the right one: the answer was seen;
                the wrong one: a false statement was)

Training documents are every text a model is trained on: the pretraining text (``c4_pretrain``), the
fine-tuning text (``c4_train``) and the instruction rows (instruction, input and output joined). The
validation text is not trained on and not checked.

A question *form* may occur ("What does Mip eat?" practises "What does Zorp eat?"), and so may a fact in
any phrasing ("Zorp eats berries."): what may not is the benchmark's own question.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

TRAINED_KEYS = ("c4_pretrain", "c4_train", "instruct")
_SPACE = re.compile(r"\s+")
_SEP = "\x00"  # between documents: a probe never spans two


def normalise(text: str) -> str:
    """Lowercase, runs of whitespace as one space, stripped."""
    return _SPACE.sub(" ", text.lower()).strip()


def probes(task: str, row: dict) -> list[str]:
    """The normalised strings whose occurrence in a training document makes ``row`` of ``task`` leak."""
    if task == "boolq":
        return [normalise(row["question"])]
    if task.startswith("arc"):
        return [normalise(row["question"]).rstrip("?").rstrip()]
    if task == "winogrande":
        return [normalise(row["sentence"].replace("_", row[option])) for option in ("option1", "option2")]
    raise ValueError(f"no leak probe for task {task!r}")


def training_documents(rows: Mapping[str, Sequence[dict]]) -> list[str]:
    """The documents of every trained-on layout file present in ``rows`` (layout key → rows)."""
    docs = [row["text"] for key in ("c4_pretrain", "c4_train") for row in rows.get(key, ())]
    docs += ["\n".join((row["instruction"], row["input"], row["output"])) for row in rows.get("instruct", ())]
    return docs


def _occurs(probe: str, corpus: str) -> bool:
    """Whether ``probe`` occurs in ``corpus`` with no letter or digit right before or after it."""
    start = corpus.find(probe)
    while start >= 0:
        end = start + len(probe)
        if (start == 0 or not corpus[start - 1].isalnum()) and (end == len(corpus) or not corpus[end].isalnum()):
            return True
        start = corpus.find(probe, start + 1)
    return False


def leaked_items(benchmarks: Mapping[str, Sequence[dict]], documents: Iterable[str]) -> dict[str, list[int]]:
    """Per task, the indices of the items that leak into ``documents`` (module docstring).

    Args:
        benchmarks: task → rows in the layout's schema (boolq, arc_easy, arc_challenge, winogrande).
        documents: the training documents (:func:`training_documents`).
    """
    corpus = _SEP.join(normalise(doc) for doc in documents)
    return {task: [i for i, row in enumerate(rows) if any(_occurs(p, corpus) for p in probes(task, row))]
            for task, rows in benchmarks.items()}
