"""The file layout of the data stage's output (``artifacts/data/``), shared by every reader.

Both sources, the embedded world and the hub, write exactly this layout, so every later stage takes the
same code path for the built-in default and for a real model on real data.

| key            | file                             | schema                                              |
|----------------|----------------------------------|-----------------------------------------------------|
| c4_pretrain    | text/pretrain.jsonl              | C4: {text, url, timestamp}                          |
| c4_train       | text/train.jsonl                 | C4: {text, url, timestamp}                          |
| c4_validation  | text/validation.jsonl            | C4: {text, url, timestamp}                          |
| instruct       | instruct/train.jsonl             | {instruction, input, output}                        |
| boolq          | benchmarks/boolq.jsonl           | {question, passage, idx, label 0|1}                 |
| arc_easy       | benchmarks/arc_easy.jsonl        | {id, question, choices: {text, label}, answerKey}   |
| arc_challenge  | benchmarks/arc_challenge.jsonl   | as arc_easy                                         |
| winogrande     | benchmarks/winogrande.jsonl      | {sentence (with "_"), option1, option2, answer "1"|"2"} |

The benchmark files are the evaluation splits (BoolQ/WinoGrande validation, ARC test).

The three text splits have distinct readers and share no document (a source drops from ``c4_pretrain`` any
page equal to one of ``c4_train`` or ``c4_validation``):

* ``c4_pretrain`` — what the built-in model (``model.name_or_path: builtin``) and its tokenizer are
  pretrained on; nothing else reads it. The embedded world writes its own pages for it; the hub source
  loads ``data.c4_pretrain`` (by default another shard of C4's train split than ``data.c4_train``). The
  packaged source (a single corpus, for an already pretrained model) writes it empty.
* ``c4_train`` — what adapters are fine-tuned on (``train.data: text``), and the calibration text.
* ``c4_validation`` — perplexity, held-out losses and search's f1; never trained on.
"""

from __future__ import annotations

from pathlib import Path

FILES = {
    "c4_pretrain": "text/pretrain.jsonl",
    "c4_train": "text/train.jsonl",
    "c4_validation": "text/validation.jsonl",
    "instruct": "instruct/train.jsonl",
    "boolq": "benchmarks/boolq.jsonl",
    "arc_easy": "benchmarks/arc_easy.jsonl",
    "arc_challenge": "benchmarks/arc_challenge.jsonl",
    "winogrande": "benchmarks/winogrande.jsonl",
}
BENCHMARK_KEYS = ("boolq", "arc_easy", "arc_challenge", "winogrande")
TEXT_KEYS = ("c4_pretrain", "c4_train", "c4_validation")


def data_file(data_dir: Path, key: str) -> Path:
    """The path of one dataset inside a data stage output folder."""
    return Path(data_dir) / FILES[key]
