"""A stage's code: the project source files it can execute, found by reading the imports.

The code part of a stage's cache key (and its dvc.yaml ``deps``) is every ``coalora`` module the stage's
module imports, transitively: ``import`` and ``from … import`` statements at module level AND inside
functions (stages import heavy modules lazily), plus the ``__init__.py`` of every package on the way
(importing ``coalora.model.load`` runs ``coalora/model/__init__.py`` first). Reading the source, not
``sys.modules``, gives the same set whatever happened to be imported already in this process.

Not seen: imports spelled as strings (``importlib.import_module``). The project has one, the stage registry
in ``coalora/stages/__init__.py``, which no stage uses; a test fails if another appears.

Not followed: the imports inside the modules of :data:`NOT_FOLLOWED` (each with the reason no stage runs
what they import). The module itself is in the closure; only what it imports is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "coalora"

# Module → why its imports are not a stage's code. ``import coalora`` installs an import hook that loads the
# transformers quantization method for packed folders (coalora/deploy/hf.py and the packed kernels under it)
# when transformers' quantizer registry is imported; no stage reads or writes a packed folder, so editing the
# deployment code must not invalidate every stage's cache.
NOT_FOLLOWED = {
    "coalora.deploy.hooks": "registers the packed-folder loader (coalora adapt's output), which no stage reads",
}


def module_file(source_root: Path, name: str) -> Path | None:
    """The source file of module ``name`` (``a.b`` → ``a/b.py`` or ``a/b/__init__.py``), None if absent."""
    base = Path(source_root, *name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


# (path, size, mtime) → imported modules: parsing is the slow part, and keys are computed several times a run
_PARSED: dict[tuple[str, int, int], frozenset[str]] = {}


def imported_modules(path: Path, name: str) -> frozenset[str]:
    """Every module an ``import`` statement anywhere in the file names, relative imports resolved.

    ``from pkg import x`` yields ``pkg`` and ``pkg.x`` (``x`` may be a submodule; names that are not
    modules are dropped by the caller, which finds no file for them). Memoised per file version (size and
    modification time), so an edited file is read again.
    """
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _PARSED:
        _PARSED[memo] = frozenset(_parse_imports(path, name))
    return _PARSED[memo]


def _parse_imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` → ``[a, a.b, a.b.c]``: importing a module runs every package ``__init__`` above it."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def module_closure(source_root: Path, start: str) -> tuple[str, ...]:
    """The repository-relative POSIX paths of every project module ``start`` imports, itself included."""
    source_root = Path(source_root)
    seen: dict[str, Path] = {}
    todo = _with_parents(start)
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] != PACKAGE:
            continue
        path = module_file(source_root, name)
        if path is None:
            continue  # an attribute imported with ``from pkg import name``, not a module
        seen[name] = path
        if name in NOT_FOLLOWED:
            continue
        for imported in imported_modules(path, name):
            todo.extend(_with_parents(imported))
    return tuple(sorted(path.relative_to(source_root).as_posix() for path in seen.values()))


def expand(source_root: Path, paths: tuple[str, ...]) -> tuple[str, ...]:
    """Declared code paths as files: a folder stands for every ``.py`` file below it."""
    files = []
    for rel in paths:
        base = Path(source_root) / rel
        found = [base] if base.is_file() else sorted(base.rglob("*.py"))
        files += [p.relative_to(source_root).as_posix() for p in found]
    return tuple(files)
