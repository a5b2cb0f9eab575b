"""Artifacts on disk: digests, manifests, atomic writes.

Every stage output folder ``artifacts/<stage>/`` carries ``MANIFEST.json`` (sha256 of every file in it) and
``stage.json`` (the cache key it was built under and its summary). A folder whose files do not match its
manifest is corrupt or foreign: it is never used, it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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


def folder_digest(folder: Path) -> str:
    """The digest of a verified stage output: the hash of its manifest's file table."""
    return content_id(read_json(Path(folder) / MANIFEST)["files"], length=64)


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
