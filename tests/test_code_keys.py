"""Cache keys that cannot go stale: a stage's code key covers every project module it imports (found from the
source, lazily imported ones included), and editing one changes exactly the keys of the stages using it."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from coalora.stages import PIPELINE, STAGES
from coalora.stages import core
from coalora.stages.code import module_closure


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_closure_follows_lazy_relative_and_submodule_imports(tmp_path):
    _write(tmp_path, "coalora/__init__.py", "")
    _write(tmp_path, "coalora/stages/__init__.py", "")
    _write(tmp_path, "coalora/stages/s.py", "from coalora.pkg import sub\n\ndef fn():\n    from ..lazy import x\n")
    _write(tmp_path, "coalora/pkg/__init__.py", "import os\n")
    _write(tmp_path, "coalora/pkg/sub.py", "from . import helper\nimport numpy\n")
    _write(tmp_path, "coalora/pkg/helper.py", "from .sub import name\n")  # a cycle
    _write(tmp_path, "coalora/lazy.py", "x = 1\n")
    _write(tmp_path, "coalora/unused.py", "import coalora.lazy\n")
    assert module_closure(tmp_path, "coalora.stages.s") == (
        "coalora/__init__.py", "coalora/lazy.py", "coalora/pkg/__init__.py", "coalora/pkg/helper.py",
        "coalora/pkg/sub.py", "coalora/stages/__init__.py", "coalora/stages/s.py")


def _coalora_imports(path: Path) -> set[str]:
    """The ``coalora.*`` modules a file names in any import statement (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("coalora")}
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("coalora"):
            found.add(node.module)
    return found


@pytest.mark.parametrize("name", PIPELINE)
def test_stage_key_covers_what_the_stage_module_imports(repo_root, name):
    stage = STAGES[name]
    paths = set(core.code_paths(stage))
    assert f"coalora/stages/{name}.py" in paths
    for module in _coalora_imports(repo_root / "coalora" / "stages" / f"{name}.py"):
        rel = module.replace(".", "/")
        assert f"{rel}.py" in paths or f"{rel}/__init__.py" in paths, f"{name}: {module} missing from its key"


def test_calibrate_key_covers_the_model_loader(repo_root):
    # the case that went stale when code was listed by hand: calibrate loads the model through load.py
    assert "coalora/model/load.py" in core.code_paths(STAGES["calibrate"])
    assert "coalora/quant/nf.py" in core.code_paths(STAGES["calibrate"])  # through coalora.quant's __init__


def test_no_import_by_name_outside_the_registry(repo_root):
    """Imports spelled as strings are invisible to the closure; only the stage registry may use them."""
    offenders = []
    for path in sorted((repo_root / "coalora").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func
                called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if called in ("import_module", "__import__"):
                    offenders.append(path.relative_to(repo_root).as_posix())
    # the registry, and harness.py importing lm_eval's modules (not project code)
    assert sorted(set(offenders)) == ["coalora/evaluate/harness.py", "coalora/stages/__init__.py"]


def test_editing_a_source_file_changes_exactly_the_keys_of_the_stages_using_it(repo_root, tmp_path, monkeypatch):
    copy = tmp_path / "src"
    shutil.copytree(repo_root / "coalora", copy / "coalora", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(core, "SOURCE_ROOT", copy)
    before = {name: core.code_digest(stage) for name, stage in STAGES.items()}
    for rel in ("coalora/allocate.py", "coalora/model/load.py", "coalora/pareto.py", "coalora/evaluate/render.py"):
        users = {name for name, stage in STAGES.items() if rel in core.code_paths(stage)}
        assert users, rel
        path = copy / rel
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        after = {name: core.code_digest(stage) for name, stage in STAGES.items()}
        assert {name for name in STAGES if after[name] != before[name]} == users, rel
        path.write_text(original)
    assert "calibrate" in {n for n, s in STAGES.items() if "coalora/model/load.py" in core.code_paths(s)}


@pytest.mark.parametrize("name", PIPELINE)
def test_deployment_code_is_not_in_any_stage_key(name):
    """``import coalora`` installs the packed-folder hook; the deployment code it loads later is no stage's
    code, so an edit there must not rebuild the pipeline (the hook module itself stays in the key)."""
    paths = set(core.code_paths(STAGES[name]))
    assert "coalora/deploy/hooks.py" in paths
    assert not any(p.startswith("coalora/deploy/") and p != "coalora/deploy/hooks.py"
                   and p != "coalora/deploy/__init__.py" for p in paths), sorted(paths)


def test_closure_does_not_follow_the_imports_of_not_followed_modules(tmp_path):
    _write(tmp_path, "coalora/__init__.py", "from coalora.deploy.hooks import install\n")
    _write(tmp_path, "coalora/deploy/__init__.py", "")
    _write(tmp_path, "coalora/deploy/hooks.py", "def install():\n    from coalora.deploy.hf import register\n")
    _write(tmp_path, "coalora/deploy/hf.py", "import coalora.heavy\n")
    _write(tmp_path, "coalora/heavy.py", "")
    _write(tmp_path, "coalora/s.py", "import coalora.heavy as h\n")
    assert module_closure(tmp_path, "coalora.deploy.hooks") == (
        "coalora/__init__.py", "coalora/deploy/__init__.py", "coalora/deploy/hooks.py")
    assert "coalora/heavy.py" in module_closure(tmp_path, "coalora.s")  # a real import is still followed
