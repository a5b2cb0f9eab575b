"""docs/METHOD.md stays true to the code: every section the code cites exists, and every file and function its
equation table names is there (a renamed or moved function fails here, not in a reader's hands)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "METHOD.md"
TABLE_HEADER = "| what | equation | file | function |"


def sections() -> set[str]:
    return set(re.findall(r"^## (§\d+) ", METHOD.read_text(), flags=re.M))


def cited_sections() -> dict[str, set[str]]:
    """``§n`` → the source files citing it (``METHOD.md §2``, ``METHOD.md §4, §6``)."""
    cited: dict[str, set[str]] = {}
    for path in [*ROOT.glob("coalora/**/*.py"), *ROOT.glob("tasks/*.py"), *ROOT.glob("flows/*.py")]:
        for match in re.finditer(r"METHOD\.md (§\d+(?:, ?§\d+)*)", path.read_text()):
            for section in re.findall(r"§\d+", match.group(1)):
                cited.setdefault(section, set()).add(path.relative_to(ROOT).as_posix())
    return cited


def table_rows() -> list[tuple[str, list[str], list[str]]]:
    """(what, files, functions) of each row of the equation table."""
    lines = METHOD.read_text().splitlines()
    start = lines.index(TABLE_HEADER) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        what, _, files, functions = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((what, re.findall(r"`([^`]+)`", files), re.findall(r"`([^`]+)`", functions)))
    return rows


def resolve(files: list[str]) -> list[Path]:
    """Paths of a row's file cell; a bare name (``propose.py``) lies in the folder of the path before it."""
    paths, folder = [], ROOT
    for name in files:
        path = ROOT / name if "/" in name else folder / name
        folder = path.parent
        paths.append(path)
    return paths


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes, and ``Class.method`` for methods, of one Python file."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{item.name}" for item in node.body
                      if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_every_cited_section_exists():
    cited = cited_sections()
    assert cited, "the code cites METHOD.md sections; none found: the pattern is broken"
    missing = {section: sorted(files) for section, files in cited.items() if section not in sections()}
    assert not missing, f"cited but not in docs/METHOD.md: {missing}"


def test_the_equation_table_names_files_and_functions_that_exist():
    rows = table_rows()
    assert len(rows) >= 15
    problems = []
    for what, files, functions in rows:
        paths = resolve(files)
        absent = [p.relative_to(ROOT).as_posix() for p in paths if not p.is_file()]
        if absent:
            problems.append(f"{what}: no file {absent}")
            continue
        defined = set().union(*(defined_names(p) for p in paths))
        problems += [f"{what}: {fn} not defined in {files}" for fn in functions if fn not in defined]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_moved_function(tmp_path):
    """The table check can fail: a function name that no listed file defines is reported."""
    module = tmp_path / "m.py"
    module.write_text("class A:\n    def f(self):\n        pass\n\ndef g():\n    pass\n")
    assert defined_names(module) == {"A", "A.f", "g"}
    assert "h" not in defined_names(module)
