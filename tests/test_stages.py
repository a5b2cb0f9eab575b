"""The stage mechanism: keys, atomic outputs, corrupt-artifact detection, dvc.yaml drift."""

from __future__ import annotations

import pytest
import yaml

from coalora.artifacts import MANIFEST, verify_manifest, write_json
from coalora.errors import ArtifactError
from coalora.params import load_params
from coalora.stages.core import Stage, fresh_summary, run_stage, stage_key

CALLS: list[str] = []


def _upstream(params, ctx):
    CALLS.append("up")
    write_json(ctx.out / "value.json", {"n": params.world.n_entities})
    return {"n": params.world.n_entities}


def _downstream(params, ctx):
    CALLS.append("down")
    value = (ctx.input("up") / "value.json").read_text()
    (ctx.out / "copy.json").write_text(value)
    return {"read": value}


def _broken(params, ctx):
    (ctx.out / "half.json").write_text("{")
    raise RuntimeError("killed mid-stage")


UP = Stage("up", _upstream, params=("world",), code=("coalora/artifacts.py",))
DOWN = Stage("down", _downstream, params=("calibrate",), deps=("up",))


@pytest.fixture
def params(repo_root):
    CALLS.clear()
    return load_params(repo_root, "smoke")


def test_second_run_is_skipped_and_params_change_reruns(tmp_path, params):
    run_stage(UP, params, tmp_path)
    run_stage(DOWN, params, tmp_path)
    run_stage(UP, params, tmp_path)
    run_stage(DOWN, params, tmp_path)
    assert CALLS == ["up", "down"]
    # a section DOWN does not read: only UP re-runs... and DOWN follows through UP's new digest
    changed = params.model_copy(update={"world": params.world.model_copy(update={"n_entities": 9})})
    assert stage_key(UP, changed, tmp_path) != stage_key(UP, params, tmp_path)
    run_stage(UP, changed, tmp_path)
    assert fresh_summary(DOWN, changed, tmp_path) is None
    run_stage(DOWN, changed, tmp_path)
    assert CALLS == ["up", "down", "up", "down"]
    # a section only DOWN reads leaves UP's key alone
    other = changed.model_copy(update={"calibrate": changed.calibrate.model_copy(update={"n_sequences": 99})})
    assert stage_key(UP, other, tmp_path) == stage_key(UP, changed, tmp_path)
    assert stage_key(DOWN, other, tmp_path) != stage_key(DOWN, changed, tmp_path)


def test_failed_stage_leaves_previous_output_untouched(tmp_path, params):
    run_stage(UP, params, tmp_path)
    before = (tmp_path / "artifacts/up/value.json").read_text()
    broken = Stage("up", _broken, params=("world",))
    with pytest.raises(RuntimeError, match="killed mid-stage"):
        run_stage(broken, params, tmp_path, force=True)
    assert (tmp_path / "artifacts/up/value.json").read_text() == before
    assert not (tmp_path / "artifacts/up/half.json").exists()
    assert [p.name for p in (tmp_path / "artifacts").iterdir() if p.name.startswith(".tmp")] == []


def test_corrupt_output_is_detected_and_rebuilt(tmp_path, params):
    run_stage(UP, params, tmp_path)
    (tmp_path / "artifacts/up/value.json").write_text('{"n": 12345}')
    assert "value.json" in verify_manifest(tmp_path / "artifacts/up")
    with pytest.raises(ArtifactError, match="stage down needs the output of stage up: .*value.json"):
        run_stage(DOWN, params, tmp_path)
    summary = run_stage(UP, params, tmp_path)
    assert CALLS == ["up", "up"] and summary["n"] == params.world.n_entities
    assert verify_manifest(tmp_path / "artifacts/up") is None


def test_foreign_folder_is_not_used(tmp_path, params):
    (tmp_path / "artifacts/up").mkdir(parents=True)
    (tmp_path / "artifacts/up/value.json").write_text('{"n": 1}')
    assert MANIFEST in verify_manifest(tmp_path / "artifacts/up")
    run_stage(UP, params, tmp_path)
    assert CALLS == ["up"]


def test_dvc_yaml_matches_stage_declarations(repo_root):
    from coalora.stages import STAGES
    from coalora.stages.dvcfile import render_dvc_yaml

    text = (repo_root / "dvc.yaml").read_text()
    assert text == render_dvc_yaml(), "dvc.yaml drifted from the stage declarations: run `coalora dvc-yaml`"
    declared = yaml.safe_load(text)["stages"]
    assert list(declared) == list(STAGES)
    for name, stage in STAGES.items():
        entry = declared[name]
        assert entry["cmd"] == f"coalora stage {name}"
        assert entry["params"] == list(stage.params)
        assert entry["outs"] == [f"artifacts/{name}"]
        assert entry["deps"] == [f"artifacts/{d}" for d in stage.deps] + list(stage.code)
        for path in stage.code:
            assert (repo_root / path).exists(), f"stage {name} declares missing code path {path}"


def test_atomic_writes_have_ordinary_permissions(tmp_path):
    import os

    write_json(tmp_path / "x.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask
