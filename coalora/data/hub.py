"""The real data path: C4, an instruction set and the four benchmarks through Hugging Face ``datasets``.

Each ``params.data.<key>`` (a :class:`~coalora.params.HubDataset`) is either

* a hub id (``allenai/ai2_arc`` + ``name`` + ``split`` [+ ``data_files``]), loaded with
  ``datasets.load_dataset`` from the network or the local Hugging Face cache; or
* a local copy: a file (json/jsonl/parquet/csv, optionally gzipped) or a folder. A folder with
  ``data_files`` is read with the builder matching the files' extension; a folder without is handed to
  ``load_dataset`` whole (a ``hf download`` snapshot, whose README names its configurations).

The first ``max_examples`` rows are converted to the layout's schemas (layout.py) and written. When the
hub cannot be reached (``HF_HUB_OFFLINE=1``, no connection) and the dataset is not cached, the error is an
:class:`~coalora.errors.OfflineError` that names the params key and says how to fetch the data ahead of
time; a local copy never touches the network.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

from coalora.artifacts import write_jsonl
from coalora.data.layout import FILES, data_file
from coalora.data.summary import summarize
from coalora.errors import OfflineError, UserError
from coalora.params import HubDataset, Params

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


# ---- schema conversion: one function per layout schema --------------------------------------------------
def _need(key: str, row: dict, columns: tuple[str, ...], schema: str) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise UserError(f"data.{key}: the dataset has no column {missing[0]!r} (columns: {', '.join(row)}); "
                        f"expected the {schema} schema")


def _timestamp(value: Any) -> str:
    """C4 timestamps as strings (``datasets`` may parse ISO strings in JSON into datetimes)."""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return "" if value is None else str(value)


def to_c4(key: str, row: dict, i: int) -> dict:
    _need(key, row, ("text",), "C4 {text, url, timestamp}")
    return {"text": str(row["text"]), "timestamp": _timestamp(row.get("timestamp")), "url": str(row.get("url") or "")}


def to_instruct(key: str, row: dict, i: int) -> dict:
    _need(key, row, ("instruction", "output"), "alpaca {instruction, input, output}")
    return {"instruction": str(row["instruction"]), "input": str(row.get("input") or ""), "output": str(row["output"])}


def to_boolq(key: str, row: dict, i: int) -> dict:
    _need(key, row, ("question", "passage"), "BoolQ {question, passage, idx, label}")
    if "label" in row:
        label = row["label"]
    elif "answer" in row:  # google/boolq serves answer: bool; some copies spell it "True"/"False"
        answer = row["answer"]
        label = {"true": 1, "false": 0}.get(answer.strip().lower(), answer) if isinstance(answer, str) else answer
    else:
        raise UserError(f"data.{key}: the dataset has neither 'label' nor 'answer' (columns: {', '.join(row)})")
    if label not in (0, 1, True, False):
        raise UserError(f"data.{key}.split: row {i} has label {label!r}, not 0|1 (a test split without answers?); "
                        "use a split with labels, e.g. validation")
    return {"question": str(row["question"]), "passage": str(row["passage"]), "idx": int(row.get("idx", i)),
            "label": int(label)}


def to_arc(key: str, row: dict, i: int) -> dict:
    _need(key, row, ("id", "question", "choices", "answerKey"), "ARC {id, question, choices, answerKey}")
    choices = {"text": [str(t) for t in row["choices"]["text"]], "label": [str(lb) for lb in row["choices"]["label"]]}
    if row["answerKey"] not in choices["label"]:
        raise UserError(f"data.{key}: row {i} ({row['id']}) has answerKey {row['answerKey']!r} not among its "
                        f"choice labels {choices['label']}")
    return {"id": str(row["id"]), "question": str(row["question"]), "choices": choices,
            "answerKey": str(row["answerKey"])}


def to_winogrande(key: str, row: dict, i: int) -> dict:
    _need(key, row, ("sentence", "option1", "option2", "answer"), "WinoGrande {sentence, option1, option2, answer}")
    answer = str(row["answer"])
    if answer not in ("1", "2"):
        raise UserError(f"data.{key}.split: row {i} has answer {row['answer']!r}, not '1'|'2' (a test split "
                        "without answers?); use a split with answers, e.g. validation")
    if str(row["sentence"]).count("_") != 1:
        raise UserError(f"data.{key}: row {i} has no single '_' to fill in its sentence")
    return {"sentence": str(row["sentence"]), "option1": str(row["option1"]), "option2": str(row["option2"]),
            "answer": answer}


CONVERTERS: dict[str, Callable[[str, dict, int], dict]] = {
    "c4_pretrain": to_c4, "c4_train": to_c4, "c4_validation": to_c4, "instruct": to_instruct, "boolq": to_boolq,
    "arc_easy": to_arc, "arc_challenge": to_arc, "winogrande": to_winogrande,
}


# ---- loading ----------------------------------------------------------------------------------------------
def describe(spec: HubDataset) -> str:
    """``path (name=…, split=…, data_files=…)``: how a dataset is named in messages."""
    parts = [f"{field}={getattr(spec, field)}" for field in ("name", "split", "data_files") if getattr(spec, field)]
    return f"{spec.path} ({', '.join(parts)})"


def fetch_hint(key: str, spec: HubDataset) -> str:
    """How to make a hub dataset available offline."""
    folder = f"data/hub/{spec.path.replace('/', '--')}"
    include = f" --include '{spec.data_files}'" if spec.data_files else ""
    args = ", ".join([repr(spec.path)] + ([repr(spec.name)] if spec.name else [])
                     + ([f"data_files={{{spec.split!r}: {spec.data_files!r}}}"] if spec.data_files else [])
                     + [f"split={spec.split!r}"])
    return (f"Fetch it ahead of time on a machine with network access:\n"
            f"  hf download {spec.path} --repo-type dataset{include} --local-dir {folder}\n"
            f"  (older huggingface_hub: huggingface-cli download {spec.path} --repo-type dataset{include} "
            f"--local-dir {folder})\n"
            f"and set data.{key}.path: {folder} in params.yaml (relative to the project root; keep name, split "
            f"and data_files); "
            f"or fill the local cache once online: python -c \"import datasets; datasets.load_dataset({args})\"")


def _offline_env() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means the hub could not be reached."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    while exc is not None:
        if isinstance(exc, (ConnectionError, TimeoutError, LocalEntryNotFoundError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def _local_only() -> Iterator[None]:
    """While reading a local copy, keep ``datasets`` off the network (it otherwise pings the hub to count
    downloads of its packaged json/parquet builders, even for local files)."""
    import datasets
    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = True, False
    datasets.disable_progress_bars()  # a local copy loads in a blink; no bars for it
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = saved
        if bars_were_on:
            datasets.enable_progress_bars()


def _builder(key: str, path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    builder = BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise UserError(f"data.{key}.path: cannot tell the format of {path}; allowed extensions: "
                        f"{', '.join(BUILDERS)} (optionally compressed)")
    return builder


def _load_local(key: str, spec: HubDataset, root: Path):
    import datasets
    target = root / spec.data_files if root.is_dir() and spec.data_files else root
    with _local_only(), tempfile.TemporaryDirectory(prefix="coalora-hub-") as cache:
        try:
            if target.is_dir():
                ds = datasets.load_dataset(str(target), spec.name, split=spec.split, cache_dir=cache)
            else:
                ds = datasets.load_dataset(_builder(key, target), data_files={spec.split: str(target)},
                                           split=spec.split, cache_dir=cache)
            return _take(ds, spec)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad local copy
            raise UserError(f"data.{key}.path: could not read the local dataset {target} "
                            f"(name={spec.name}, split={spec.split}): {type(exc).__name__}: {exc}") from None


def _load_hub(key: str, spec: HubDataset):
    import datasets
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
    data_files = {spec.split: spec.data_files} if spec.data_files else None
    try:
        ds = datasets.load_dataset(spec.path, spec.name, data_files=data_files, split=spec.split)
    except Exception as exc:  # noqa: BLE001 - translated into a message that names the params key
        offline = datasets.config.HF_HUB_OFFLINE or _offline_env()
        if _is_connection_error(exc) or (offline and isinstance(exc, FileNotFoundError)):
            why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
            raise OfflineError(f"data.{key}: dataset {describe(spec)} is not in the local Hugging Face cache and "
                               f"{why}.\n{fetch_hint(key, spec)}") from None
        if isinstance(exc, DataFilesNotFoundError):
            raise UserError(f"data.{key}.data_files: no file of {spec.path} matches {spec.data_files!r}") from None
        if isinstance(exc, DatasetNotFoundError):
            raise UserError(f"data.{key}.path: dataset {spec.path!r} was not found on the hub (or is gated: "
                            f"log in with `hf auth login`): {exc}") from None
        raise UserError(f"data.{key}: could not load {describe(spec)}: {type(exc).__name__}: {exc}") from None
    return _take(ds, spec)


def _take(ds, spec: HubDataset) -> list[dict]:
    """The first ``max_examples`` rows as plain dicts."""
    if spec.max_examples is not None and len(ds) > spec.max_examples:
        ds = ds.select(range(spec.max_examples))
    return [dict(row) for row in ds]


def load_rows(key: str, spec: HubDataset, root: Path | None = None) -> list[dict]:
    """The rows of ``params.data.<key>`` converted to the layout schema of ``key``. A relative local path is
    looked up under ``root`` (the project root) when given, else under the working directory."""
    local = Path(spec.path).expanduser()
    if root is not None and not local.is_absolute():
        local = Path(root) / local
    rows = _load_local(key, spec, local) if local.exists() else _load_hub(key, spec)
    if not rows:
        raise UserError(f"data.{key}: {describe(spec)} has no rows")
    convert = CONVERTERS[key]
    return [convert(key, row, i) for i, row in enumerate(rows)]


def write_hub(params: Params, out: Path, root: Path | None = None) -> dict:
    """Load every dataset of ``params.data`` and write the layout's files under ``out``.

    Args:
        params: the validated params; ``params.data`` names the datasets.
        out: the output folder (the data stage's temporary folder).
        root: the project root, against which relative local paths resolve (default: working directory).

    Returns:
        the summary: ``source``, ``datasets`` (key → what was loaded), ``files``, ``labels``, ``words``.
    """
    out = Path(out)
    rows = {key: load_rows(key, getattr(params.data, key), root) for key in FILES}
    rows["c4_pretrain"], dropped = disjoint(rows["c4_pretrain"], rows["c4_train"] + rows["c4_validation"])
    if not rows["c4_pretrain"]:
        raise UserError("data.c4_pretrain: every document is also in data.c4_train or data.c4_validation; "
                        "point it at other text (e.g. another shard of C4's train split)")
    for key, key_rows in rows.items():
        write_jsonl(data_file(out, key), key_rows)
    return {"source": "hub", "datasets": {key: describe(getattr(params.data, key)) for key in FILES},
            "c4_pretrain_dropped": dropped, **summarize(rows)}


def disjoint(rows: list[dict], others: list[dict]) -> tuple[list[dict], int]:
    """``rows`` without the documents whose text is also in ``others`` (layout.py: the pretraining text shares
    no document with the fine-tuning and validation text), and how many were dropped."""
    taken = {row["text"] for row in others}
    kept = [row for row in rows if row["text"] not in taken]
    return kept, len(rows) - len(kept)
