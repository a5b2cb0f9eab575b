"""The file layout of the data stage's output (``artifacts/data/``), shared by every reader.

Both sources, the embedded world and the hub, write exactly this layout, so every later stage takes the
same code path for the built-in default and for a real model on real data.

| key            | file                             | schema                                              |
|----------------|----------------------------------|-----------------------------------------------------|
| c4_train       | text/train.jsonl                 | C4: {text, url, timestamp}                          |
| c4_validation  | text/validation.jsonl            | C4: {text, url, timestamp}                          |
| instruct       | instruct/train.jsonl             | {instruction, input, output}                        |
| boolq          | benchmarks/boolq.jsonl           | {question, passage, idx, label 0|1}                 |
| arc_easy       | benchmarks/arc_easy.jsonl        | {id, question, choices: {text, label}, answerKey}   |
| arc_challenge  | benchmarks/arc_challenge.jsonl   | as arc_easy                                         |
| winogrande     | benchmarks/winogrande.jsonl      | {sentence (with "_"), option1, option2, answer "1"|"2"} |

The benchmark files are the evaluation splits (BoolQ/WinoGrande validation, ARC test).
"""

from __future__ import annotations

from pathlib import Path

FILES = {
    "c4_train": "text/train.jsonl",
    "c4_validation": "text/validation.jsonl",
    "instruct": "instruct/train.jsonl",
    "boolq": "benchmarks/boolq.jsonl",
    "arc_easy": "benchmarks/arc_easy.jsonl",
    "arc_challenge": "benchmarks/arc_challenge.jsonl",
    "winogrande": "benchmarks/winogrande.jsonl",
}
BENCHMARK_KEYS = ("boolq", "arc_easy", "arc_challenge", "winogrande")


def data_file(data_dir: Path, key: str) -> Path:
    """The path of one dataset inside a data stage output folder."""
    return Path(data_dir) / FILES[key]
