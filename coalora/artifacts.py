"""Artifacts on disk: digests, manifests, atomic writes.

Every stage output folder ``artifacts/<stage>/`` carries ``MANIFEST.json`` (sha256 of every file in it) and
``stage.json`` (the cache key it was built under and its summary). A folder whose files do not match its
manifest is corrupt or foreign: it is never used, it is rebuilt.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

ARTIFACTS = "artifacts"  # the project's stage outputs: <root>/artifacts/<stage>/
MANIFEST = "MANIFEST.json"
RECORD = "stage.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace: the form whose hash is a content id."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_id(obj: Any, length: int = 16) -> str:
    """A short content id: the hex sha256 of the object's canonical JSON."""
    return sha256_bytes(canonical_json(obj).encode())[:length]


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename it, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence | Mapping]) -> None:
    """A CSV table, atomically: the ``columns`` header line, then one line per row (``\\n`` line ends).

    A row is a sequence of values in column order, or a mapping column → value (missing columns are left
    empty; a key that is not a column is a ValueError, as with ``csv.DictWriter``).
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    by_name = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        (by_name if isinstance(row, Mapping) else writer).writerow(row)
    write_text_atomic(path, buffer.getvalue())


def build_manifest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (relative POSIX paths), the manifest itself excluded."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def verify_manifest(folder: Path) -> str | None:
    """None when ``folder`` matches its manifest, else a sentence saying what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    if not (folder / MANIFEST).is_file():
        return f"{folder} has no {MANIFEST} (not written by a coalora stage)"
    try:
        expected = read_json(folder / MANIFEST)["files"]
    except (ValueError, KeyError, TypeError):
        return f"{folder / MANIFEST} is unreadable"
    actual = build_manifest(folder)
    if actual != expected:
        changed = sorted(set(actual.items()) ^ set(expected.items()))
        names = sorted({name for name, _ in changed})
        return f"{folder}: files differ from the manifest: {', '.join(names[:5])}"
    return None


def is_wall_clock(name: str) -> bool:
    """Whether a JSON key or CSV column holds a wall-clock measurement: its name has the word ``seconds``
    (``seconds``, ``fisher_seconds``, ``eval_seconds_per_row``, ``coalora.seconds``). The convention every
    stage follows for timings, so that they can be left out of content digests."""
    return "seconds" in re.split(r"[._\-]", name)


def _without_wall_clock(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_wall_clock(v) for k, v in obj.items() if not is_wall_clock(str(k))}
    if isinstance(obj, list):
        return [_without_wall_clock(v) for v in obj]
    return obj


def content_digest(path: Path, exact: str) -> str:
    """The digest of a file's content without its wall-clock fields; ``exact`` is its sha256.

    JSON: the canonical JSON of the object minus every wall-clock key (at any depth). CSV: the rows minus
    wall-clock columns. Other files (tensors, JSONL data, images, text): ``exact``. A file that does not
    parse as its extension says is digested exactly too.
    """
    path = Path(path)
    try:
        if path.suffix == ".json":
            return sha256_bytes(canonical_json(_without_wall_clock(json.loads(path.read_text()))).encode())
        if path.suffix == ".csv":
            with open(path, newline="") as handle:
                rows = list(csv.reader(handle))
            keep = [i for i, name in enumerate(rows[0] if rows else []) if not is_wall_clock(name)]
            return sha256_bytes(canonical_json([[row[i] for i in keep if i < len(row)] for row in rows]).encode())
    except (ValueError, UnicodeDecodeError, csv.Error):
        pass
    return exact


def folder_digest(folder: Path) -> str:
    """The digest of a verified stage output: what it holds, wall-clock fields left out.

    It feeds the cache keys of downstream stages, so a rebuild that produces the same content leaves them
    cached: a rebuild after damage, or after a code change that does not change what the stage writes. The
    build record (``stage.json``: the key the folder was built under, the summary, its time) is left out too:
    it says how the folder was made, not what it holds, and no stage reads another's. Integrity is the
    manifest's business (:func:`verify_manifest`, exact bytes); this is about meaning.
    """
    folder = Path(folder)
    files = read_json(folder / MANIFEST)["files"]
    return content_id({name: content_digest(folder / name, exact) for name, exact in sorted(files.items())
                       if name != RECORD}, length=64)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success it replaces ``final`` whole.

    On any exception the temporary folder is removed and ``final`` is left as it was, so a failed or
    interrupted stage never leaves a half-written output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        write_json(tmp / MANIFEST, {"files": build_manifest(tmp)})
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
