"""``benchmarks/kill9.md``: a table per category (where each kill landed: tried, held, failed), a row per trial."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .trials import TRIALS


def place(where_: str) -> str:
    """The part of a run an event belongs to."""
    kind, _, what = where_.partition(":")
    if kind == "run":
        return what
    return {"start": "start-up, before Prefect's server", "server": "Prefect server start", "checkpoint": "train",
            "search": "train", "row": "evaluate", "done": "between two stages",
            "mlflow": "MLflow store creation" if what == "init" else "MLflow logging"}.get(kind, kind)


def landed(record: dict) -> str:
    """The category a trial counts under: where its kill landed (load makes timing drift), under the trial's
    own name when it landed where aimed (``train: search round`` is a part of ``train``)."""
    if len(record["kills"]) != 1:
        return record["category"]
    actual = place(record["kills"][0]["where"])
    return record["category"] if record["category"].split(":")[0] == actual else actual


def summary_rows(records: list[dict]) -> list[tuple[str, int, int, int]]:
    categories = list(dict.fromkeys(landed(r) for r in sorted(records, key=_order)))
    rows = []
    for category in categories:
        mine = [r for r in records if landed(r) == category]
        held = sum(r["held"] for r in mine)
        rows.append((category, len(mine), held, len(mine) - held))
    return rows


def _order(record: dict) -> int:
    names = [t.name for t in TRIALS]
    return names.index(record["trial"]) if record["trial"] in names else len(names)


def write_report(records: list[dict], path: Path, command: str, seconds: float, reference_seconds: float) -> None:
    rows = summary_rows(records)
    kills = sum(len(r["kills"]) for r in records)
    lines = [
        "# kill -9 anywhere, any number of times",
        "",
        f"`{command}` (benchmarks/kill9/__init__.py; its docstring says what each trial checks).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the end), Python {platform.python_version()}, smoke profile. "
        f"{len(records)} trials, {kills} kills, {seconds / 60:.0f} minutes; the uninterrupted reference run "
        f"took {reference_seconds:.0f} s.",
        "",
        "| category | tried | held | failed |",
        "|---|---:|---:|---:|",
        *[f"| kill -9 during {c} | {t} | {h} | {f} |" for c, t, h, f in rows],
        f"| **all** | **{len(records)}** | **{sum(r[2] for r in rows)}** | **{sum(r[3] for r in rows)}** |",
        "",
        "Each trial counts where its kill landed (the last event seen before it); a trial aimed elsewhere that "
        "landed there under the machine's load says so below.",
        "",
        "| trial | aimed at | killed (s after start: last event seen) | re-run s | held | problems | "
        "what the runs repaired |",
        "|---|---|---|---:|---|---|---|",
    ]
    for r in sorted(records, key=_order):
        where_ = "; ".join(f"{k['at']:.1f}: {k['where']}" + (f" ({k['last']})" if k.get("last", k["where"]) !=
                                                             k["where"] else "") for k in r["kills"]) or "-"
        problems = "; ".join(r["problems"]).replace("|", "/") or "-"
        notes = "; ".join(r.get("notes", [])).replace("|", "/") or "-"
        lines.append(f"| {r['trial']} | {r['category']} | {where_} | {r.get('final_seconds', 0):.0f} | "
                     f"{'yes' if r['held'] else 'NO'} | {problems} | {notes} |")
    path.write_text("\n".join(lines) + "\n")
