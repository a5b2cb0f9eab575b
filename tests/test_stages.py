"""The stage mechanism: keys, atomic outputs, corrupt-artifact detection, dvc.yaml drift."""

from __future__ import annotations

import pytest
import yaml

from coalora.artifacts import MANIFEST, verify_manifest, write_json
from coalora.errors import ArtifactError
from coalora.params import load_params
from coalora.stages.core import Stage, code_paths, fresh_summary, run_stage, stage_key

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
        assert entry["cmd"] == f"sh bin/coalora-stage {name}"
        assert entry["params"] == list(stage.params)
        assert entry["outs"] == [{f"artifacts/{name}": {"persist": True}}]  # a failed command keeps it
        assert entry["deps"] == [f"artifacts/{d}" for d in stage.deps] + list(code_paths(stage))
        assert f"coalora/stages/{name}.py" in entry["deps"]
        for path in code_paths(stage):
            assert (repo_root / path).is_file(), f"stage {name} lists missing code file {path}"


def test_atomic_writes_have_ordinary_permissions(tmp_path):
    import os

    write_json(tmp_path / "x.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_csv_tables_are_written_whole_from_sequences_or_mappings(tmp_path):
    from coalora.artifacts import write_csv

    write_csv(tmp_path / "t.csv", ("step", "run", "loss"), [(0, "joint", "1.500000"), {"step": 1, "loss": 2}])
    assert (tmp_path / "t.csv").read_text() == "step,run,loss\n0,joint,1.500000\n1,,2\n"  # \n line ends
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]  # no temporary file left
    with pytest.raises(ValueError, match="not in fieldnames"):  # a key that is no column is refused, as csv.DictWriter does
        write_csv(tmp_path / "bad.csv", ("a",), [{"a": 1, "b": 2}])
    assert not (tmp_path / "bad.csv").exists()


def _timed_upstream(params, ctx):
    CALLS.append("up")
    write_json(ctx.out / "value.json", {"n": params.world.n_entities, "seconds": len(CALLS) * 1.5})
    (ctx.out / "times.csv").write_text(f"n,wall_seconds\n{params.world.n_entities},{len(CALLS) * 2.5}\n")
    return {"n": params.world.n_entities, "fit_seconds": len(CALLS) * 0.5}


TIMED_UP = Stage("up", _timed_upstream, params=("world",))


def test_identical_rebuild_leaves_downstream_cached(tmp_path, params):
    """Wall-clock fields (``seconds`` in stage.json, ``*_seconds`` keys and columns) are not content: a rebuild
    that changes only them keeps the downstream key, while the manifest still guards every byte."""
    from coalora.artifacts import folder_digest

    run_stage(TIMED_UP, params, tmp_path)
    run_stage(DOWN, params, tmp_path)
    digest = folder_digest(tmp_path / "artifacts/up")
    manifest = (tmp_path / "artifacts/up" / MANIFEST).read_text()
    run_stage(TIMED_UP, params, tmp_path, force=True)
    assert (tmp_path / "artifacts/up" / MANIFEST).read_text() != manifest  # other timings, other bytes
    assert folder_digest(tmp_path / "artifacts/up") == digest
    assert fresh_summary(DOWN, params, tmp_path) is not None
    run_stage(DOWN, params, tmp_path)
    assert CALLS == ["up", "down", "up"]
    # a changed value that is not a timing is content: downstream follows
    (tmp_path / "artifacts/up/times.csv").write_text("n,wall_seconds\n99,1.0\n")
    assert verify_manifest(tmp_path / "artifacts/up") is not None  # and it is corrupt, not trusted


def test_corrupt_input_makes_the_stage_stale_without_raising(tmp_path, params):
    run_stage(UP, params, tmp_path)
    run_stage(DOWN, params, tmp_path)
    (tmp_path / "artifacts/up" / MANIFEST).unlink()
    assert fresh_summary(DOWN, params, tmp_path) is None  # never raises: the flow rebuilds up first
    run_stage(UP, params, tmp_path)
    assert fresh_summary(DOWN, params, tmp_path) is not None  # same content as before: still cached
    assert CALLS == ["up", "down", "up"]


def test_content_digest_of_json_and_csv_ignores_only_wall_clock(tmp_path):
    from coalora.artifacts import content_digest, is_wall_clock, sha256_file

    assert is_wall_clock("seconds") and is_wall_clock("eval_seconds_per_row") and is_wall_clock("qlora.seconds")
    assert not is_wall_clock("secondsish") and not is_wall_clock("steps")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"x": 1, "runs": [{"seconds": 2.0, "loss": 0.5}]}')
    b.write_text('{"runs": [{"loss": 0.5, "seconds": 7.0}], "x": 1}')
    assert content_digest(a, sha256_file(a)) == content_digest(b, sha256_file(b))
    b.write_text('{"runs": [{"loss": 0.6, "seconds": 2.0}], "x": 1}')
    assert content_digest(a, sha256_file(a)) != content_digest(b, sha256_file(b))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert content_digest(bad, "exact") == "exact"


def test_code_change_with_the_same_output_leaves_downstream_cached(tmp_path, params, monkeypatch):
    """An edit to a stage's code (a comment, a refactoring) re-runs that stage; its output has the same
    content, so the stages reading it stay cached (stage.json's key is how the folder was made, not content)."""
    from coalora.stages import core

    run_stage(UP, params, tmp_path)
    run_stage(DOWN, params, tmp_path)
    digest = core.code_digest
    monkeypatch.setattr(core, "code_digest", lambda stage: digest(stage) + ("-edited" if stage is UP else ""))
    assert fresh_summary(UP, params, tmp_path) is None
    run_stage(UP, params, tmp_path)
    assert fresh_summary(DOWN, params, tmp_path) is not None
    assert CALLS == ["up", "down", "up"]
