"""A run's results as compared between runs: every file of every stage output, without wall-clock fields."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

# Keys (JSON) and columns (CSV) holding wall-clock times or timestamps, which no two runs share.
# Words separated by _ . - (DVC's metrics files flatten keys with dots: "coalora.seconds").
WALL_CLOCK = re.compile(r"(^|[_.-])(seconds|secs|time|timestamp|started|finished|date|wall)($|[_.-])|_s$")


def _timeless(obj):
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if not WALL_CLOCK.search(str(k))}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def _csv_timeless(text: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return text
    keep = [i for i, name in enumerate(rows[0]) if not WALL_CLOCK.search(name)]
    return "\n".join(",".join(row[i] for i in keep if i < len(row)) for row in rows)


SECONDS_IN_TEXT = re.compile(r"\d+(?:\.\d+)? s\b")


def _md_timeless(text: str) -> str:
    """The report without the table columns whose header names a wall-clock quantity, and with every
    "<number> s" in its prose masked."""
    out, keep = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if keep is None:
                keep = [i for i, c in enumerate(cells) if not re.search(r"(^|\s)s(\s|\)|$)|seconds|time", c, re.I)]
            line = "|".join(cells[i] for i in keep if i < len(cells))
        else:
            keep = None
            line = SECONDS_IN_TEXT.sub("<t> s", line)  # "33 rows at 0.549 s each"
        out.append(line)
    return "\n".join(out)


def results(root: Path) -> dict[str, str]:
    """Every file of every stage output, as compared between runs: its bytes' digest, or for JSON, CSV and
    Markdown its content without wall-clock fields. Manifests (digests of files holding times) are left
    out: the files they list are compared themselves."""
    import hashlib

    art = root / "artifacts"
    found = {}
    for path in sorted(art.rglob("*")):
        rel = path.relative_to(art).as_posix()
        if not path.is_file() or rel.startswith(".") or path.name == "MANIFEST.json":
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            found[rel] = json.dumps(_timeless(json.loads(data)), sort_keys=True)
        elif path.suffix == ".csv":
            found[rel] = _csv_timeless(data.decode())
        elif path.suffix == ".md":
            found[rel] = _md_timeless(data.decode())
        else:
            found[rel] = hashlib.sha256(data).hexdigest()
    return found


def differences(got: dict[str, str], want: dict[str, str]) -> list[str]:
    names = sorted(set(got) | set(want))
    return [name for name in names if got.get(name) != want.get(name)]
