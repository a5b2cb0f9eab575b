"""params.yaml validation: every error names the key path and what is allowed; nothing is written."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from coalora.errors import ParamsError
from coalora.params import dump_params, load_params, validate


@pytest.fixture
def raw(repo_root):
    return yaml.safe_load((repo_root / "params.yaml").read_text())


def test_default_and_smoke_profile_load(repo_root):
    default = load_params(repo_root)
    smoke = load_params(repo_root, "smoke")
    assert default.model.name_or_path == "builtin"
    assert smoke.world.n_entities < default.world.n_entities
    # an overlay changes only what it names
    assert smoke.allocate.budget_min == default.allocate.budget_min


def test_dump_round_trips(repo_root):
    params = load_params(repo_root, "smoke")
    assert validate(yaml.safe_load(dump_params(params))) == params


@pytest.mark.parametrize("path, value, expected", [
    (("model", "builtin", "lr"), -1.0, "model.builtin.lr: Input should be greater than 0"),
    (("world", "n_items"), "many", "world.n_items: Input should be a valid integer"),
    (("world", "n_entities"), 2, "world.n_entities: Input should be greater than or equal to 12"),
    (("world", "n_practice"), 4999, "world: Value error, n_practice 4999 must leave at least 8 of n_entities 144"),
    (("data", "source"), "s3", "data.source: Input should be 'embedded', 'hub' or 'packaged'"),
    (("eval", "tasks"), ["boolq", "mmlu"], "eval.tasks.1: Input should be 'boolq', 'arc_easy'"),
    (("calibrate", "n_sequences"), True, "calibrate.n_sequences: Input should be a valid integer"),
])
def test_bad_value_names_key_and_allowed(raw, path, value, expected):
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ParamsError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        validate(raw)


def test_unknown_key_lists_allowed_keys(raw):
    raw["model"]["builtin"]["hidden"] = 64
    with pytest.raises(ParamsError) as info:
        validate(raw)
    message = str(info.value)
    assert "model.builtin.hidden: unknown key in model.builtin" in message
    assert "hidden_size" in message


def test_missing_key_is_an_error(raw):
    del raw["allocate"]["grid_size"]
    with pytest.raises(ParamsError, match=r"allocate\.grid_size: Field required"):
        validate(raw)


def test_cross_field_rules(raw):
    raw["allocate"]["budget_min"], raw["allocate"]["budget_max"] = 5.0, 3.0
    raw["model"]["builtin"]["num_heads"] = 3
    with pytest.raises(ParamsError) as info:
        validate(raw)
    assert "allocate: Value error, budget_min (5.0) must be below budget_max (3.0)" in str(info.value)
    assert "model.builtin: Value error, hidden_size (128) must be divisible by num_heads (3)" in str(info.value)


def test_unknown_profile(repo_root):
    with pytest.raises(ParamsError, match="profile: unknown profile 'huge'; available: (.*, )?smoke"):
        load_params(repo_root, "huge")


def test_cli_bad_params_exit_2_and_write_nothing(tmp_path, repo_root):
    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["world"]["n_train_docs"] = -5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = subprocess.run([sys.executable, "-m", "coalora.cli", "--root", str(tmp_path), "stage", "data"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "world.n_train_docs: Input should be greater than or equal to 10 (got -5)" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
