"""DVC in step with ``coalora run``: each finished stage recorded into ``dvc.lock`` and DVC's cache.

``dvc repro`` records a stage itself after running its command. The Prefect flow runs the same stages
without DVC, so it records them through DVC's own API, as ``dvc commit --force <stage>`` does: dvc.lock gets
the hashes of the stage's deps, params and output, and the output is copied into ``.dvc/cache``. After a
run ``dvc status`` is clean, ``dvc push`` has every output, and ``dvc repro`` has nothing to redo.

Recorded only where it is true: in a DVC project (``.dvc/`` and ``dvc.yaml`` at the root), with DVC
installed, and without a profile (dvc.yaml reads params.yaml alone, so outputs built under a profile's
params do not belong in dvc.lock). A failure to record never fails the run: it is one warning naming the
command that records by hand.

``.coalora/dvc-recorded.json`` remembers what was recorded (the exact digest of each stage's output and
dvc.lock's), so an up-to-date run can tell that DVC is in step without importing DVC (seconds).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from coalora.artifacts import ARTIFACTS, MANIFEST, read_json, sha256_file, write_json

log = logging.getLogger("coalora.dvc")

MARKER = Path(".coalora") / "dvc-recorded.json"


def skip_reason(root: Path | str, profile: str | None) -> str | None:
    """Why stages of the project at ``root`` are not recorded into dvc.lock (None: they are)."""
    root = Path(root)
    profile = profile if profile is not None else os.environ.get("COALORA_PROFILE") or None
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return "not a DVC project"
    if profile:
        return f"params come from profile {profile!r}, and dvc.yaml reads params.yaml alone"
    try:
        import dvc  # noqa: F401
    except ImportError:
        return "DVC is not installed"
    return None


def _output_digest(root: Path, name: str) -> str | None:
    manifest = root / ARTIFACTS / name / MANIFEST
    return sha256_file(manifest) if manifest.is_file() else None


def _lock_digest(root: Path) -> str | None:
    return sha256_file(root / "dvc.lock") if (root / "dvc.lock").is_file() else None


def in_step(root: Path | str, names: list[str]) -> bool:
    """Whether dvc.lock was written by a record of exactly these stage outputs (the marker says so)."""
    root = Path(root)
    try:
        marker = read_json(root / MARKER)
    except (OSError, ValueError):
        return False
    recorded = marker.get("stages", {}) if isinstance(marker, dict) else {}
    return (marker.get("lock") == _lock_digest(root) and marker.get("yaml") == sha256_file(root / "dvc.yaml")
            and all(recorded.get(name) == _output_digest(root, name) for name in names))


class Recorder:
    """Records stages into dvc.lock through one DVC ``Repo`` (opened on first use; close it when done)."""

    def __init__(self, root: Path | str, profile: str | None):
        self.root = Path(root).resolve()
        self.reason = skip_reason(self.root, profile)
        self.repo = None
        self.failed = False
        self.recorded: set[str] = set()

    def record(self, name: str, deps: tuple[str, ...] = ()) -> bool:
        """``dvc commit --force <name>`` unless DVC is in step with it already and none of its upstream
        stages ``deps`` was recorded anew; True when recorded. A failure warns once and stops recording."""
        if self.reason or self.failed:
            return False
        if in_step(self.root, [name]) and not self.recorded.intersection(deps):
            return False
        try:
            from dvc.exceptions import DvcException
        except ImportError:  # pragma: no cover - skip_reason checked
            return False
        try:
            if self.repo is None:
                from dvc.repo import Repo

                # importing dvc sets its logger to INFO with its own handlers: a line per lock update
                verbose = logging.getLogger("coalora").isEnabledFor(logging.DEBUG)
                logging.getLogger("dvc").setLevel(logging.DEBUG if verbose else logging.WARNING)
                self.repo = Repo(str(self.root))
            self.repo.commit(name, force=True)
        except (DvcException, OSError) as exc:
            self.failed = True
            log.warning("dvc.lock not updated for stage %s (%s: %s); record it with `dvc commit --force %s`",
                        name, type(exc).__name__, exc, name)
            return False
        self._remember(name)
        self.recorded.add(name)
        return True

    def _remember(self, name: str) -> None:
        marker_path = self.root / MARKER
        try:
            marker = read_json(marker_path)
        except (OSError, ValueError):
            marker = {}
        stages = marker.get("stages", {}) if marker.get("yaml") == sha256_file(self.root / "dvc.yaml") else {}
        stages[name] = _output_digest(self.root, name)
        write_json(marker_path, {"lock": _lock_digest(self.root), "yaml": sha256_file(self.root / "dvc.yaml"),
                                 "stages": stages})

    def close(self) -> None:
        if self.repo is not None:
            self.repo.close()
            self.repo = None

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def record_stages(root: Path | str, profile: str | None, names: list[str]) -> list[str]:
    """Record the stages ``names`` (in pipeline order) that DVC is not in step with; returns those recorded."""
    if skip_reason(root, profile) or in_step(root, names):
        return []
    from coalora.stages import get_stage

    with Recorder(root, profile) as recorder:
        return [name for name in names if recorder.record(name, get_stage(name).deps)]
