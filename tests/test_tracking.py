"""MLflow tracking on small synthetic stage folders: the run tree, curves, figures, tables and adapter files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from coalora.stages.core import Stage

ROUNDS = [
    {"round": 0, "step": 4, "pool": [{"id": "a", "bits": 2.5, "f1": 3.0}, {"id": "b", "bits": 4.0, "f1": 2.0},
                                     {"id": "c", "bits": 4.5, "f1": 2.5}],
     "front": ["a", "b"], "hypervolume": 0.25, "hv_reference": [1.0, 4.0]},
    {"round": 1, "step": 8, "pool": [{"id": "a", "bits": 2.5, "f1": 2.8}, {"id": "d", "bits": 3.2, "f1": 2.2},
                                     {"id": "b", "bits": 4.0, "f1": 1.9}],
     "front": ["a", "d", "b"], "hypervolume": 0.4, "hv_reference": [1.0, 4.0]},
]
LOSSES = [3.5, 3.1, 2.9, 2.7, 2.6, 2.55]


def _record(folder: Path, name: str, summary: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stage.json").write_text(json.dumps({"stage": name, "key": "k" * 64, "summary": summary}))


def _csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def project(repo_root, tmp_path, monkeypatch) -> Path:
    """A project with params.yaml and synthetic outputs of data, base_model, train and an evaluate stage."""
    from safetensors.numpy import save_file

    import coalora.stages as stages

    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    art = root / "artifacts"
    _record(art / "data", "data", {"rows": 10})
    _record(art / "base_model", "base_model", {"ppl": 12.5})
    (art / "base_model" / "model").mkdir()
    save_file({"w": np.ones((4, 4), np.float32)}, str(art / "base_model" / "model" / "model.safetensors"))
    (art / "base_model" / "metrics.json").write_text(json.dumps({"ppl": 12.5, "acc": {"boolq": 0.7}}))
    _record(art / "train", "train", {"pool": 3, "methods": {"coalora": {"final_loss": 2.55}}})
    (art / "train" / "metrics.json").write_text(json.dumps({"coalora.final_loss": 2.55}))
    method = art / "train" / "coalora"
    method.mkdir()
    (method / "train.json").write_text(json.dumps({
        "method": "coalora", "description": "one adapter, θ", "k": 2, "steps": 6, "final_loss": 2.55,
        "eval_loss_after_mean": 2.6, "train": {"lr": 3e-4, "batch_size": 4}, "rounds": ROUNDS}))
    _csv(method / "loss.csv", [{"step": i, "run": "joint", "loss": v} for i, v in enumerate(LOSSES)])
    save_file({"lora_A": np.arange(8, dtype=np.float32).reshape(2, 4)}, str(method / "adapter.safetensors"))
    # The evaluate stage's table.csv columns (coalora.evaluate.table.flat_row), shortened.
    rows = [{"method": m, "config_id": f"{m}{i}", "set": "seen" if i % 2 == 0 else "unseen", "bits": b,
             "budgets": f"{b:g}", "acc_mean": acc, "ppl": ppl, "ppl_protocol": "nonoverlap", "eval_seconds": 1.5}
            for m, shift in (("coalora", 0.05), ("qlora", 0.0))
            for i, (b, acc, ppl) in enumerate([(2.5, 0.55, 20.0), (3.0, 0.6, 16.0), (4.0, 0.66, 13.0)])
            for acc, ppl in [(acc + shift, ppl - 10 * shift)]]
    _record(art / "evaluate", "evaluate", {"configs": 6})
    _csv(art / "evaluate" / "table.csv", rows)
    (art / "evaluate" / "dvc").mkdir()  # a per-method plot series: part of the table, not a table of its own
    _csv(art / "evaluate" / "dvc" / "coalora.csv", [r for r in rows if r["method"] == "coalora"])
    evaluate = Stage(name="evaluate", fn=lambda p, c: {}, params=("eval",), deps=("train",),
                     description="synthetic evaluation")
    real = stages.all_stages
    monkeypatch.setattr(stages, "all_stages", lambda: {**real(), "evaluate": evaluate})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return root


def _runs(client, exp_id: str) -> dict:
    runs = client.search_runs([exp_id], max_results=100)
    return {r.info.run_name: r for r in runs}


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def _non_blank_png(path: str) -> bool:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return image.ndim == 3 and float(image[..., :3].std()) > 0.05


def test_pipeline_run_tree_metrics_figures_tables_adapters(project):
    from mlflow.tracking import MlflowClient

    from coalora.track import log_pipeline

    outcome = {"stages": {n: {"state": "Completed", "summary": {}}
                          for n in ("data", "base_model", "train", "evaluate")}}
    tracked = log_pipeline(project, outcome=outcome, run_name="synthetic")
    assert tracked.tracking_uri == f"sqlite:///{project / '.coalora' / 'mlflow.db'}"
    assert (project / ".coalora" / "mlflow.db").is_file()
    client = MlflowClient(tracked.tracking_uri)
    runs = _runs(client, tracked.experiment_id)
    assert set(runs) == {"synthetic", "data", "base_model", "train", "evaluate", "train/coalora"}
    parent = runs["synthetic"]
    for name in ("data", "base_model", "train", "evaluate"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
    method = runs["train/coalora"]
    assert method.data.tags["mlflow.parentRunId"] == runs["train"].info.run_id

    # Params: a stage gets exactly the sections it reads; the parent gets them all.
    assert set(runs["evaluate"].data.params) == {k for k in parent.data.params if k.startswith("eval.")}
    assert runs["train"].data.params["train.lr"] == parent.data.params["train.lr"]
    assert runs["base_model"].data.metrics["acc.boolq"] == pytest.approx(0.7)
    assert runs["base_model"].data.metrics["summary.ppl"] == pytest.approx(12.5)

    # Curves: the loss curve step by step; the pool hypervolume per search round.
    loss = client.get_metric_history(method.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == \
        [(i, pytest.approx(v)) for i, v in enumerate(LOSSES)]
    hv = client.get_metric_history(method.info.run_id, "search.hypervolume")
    assert sorted((m.step, m.value) for m in hv) == [(0, 0.25), (1, 0.4)]
    assert method.data.params["train.lr"] == "0.0003" and method.data.metrics["final_loss"] == 2.55

    # Figures and tables.
    parent_files = _artifacts(client, parent.info.run_id)
    assert {p for p in parent_files if p.startswith("pareto/")} == \
        {"pareto/evaluate_table_acc_mean.png", "pareto/evaluate_table_ppl.png"}  # metrics only, no seconds
    assert "params.yaml" in parent_files
    assert parent.data.metrics["base_model.acc.boolq"] == pytest.approx(0.7)  # headline metrics, by stage
    evaluate_files = _artifacts(client, runs["evaluate"].info.run_id)
    assert {"tables/table.json", "table.csv", "dvc/coalora.csv"} <= evaluate_files
    assert not any("dvc_coalora" in p or "tables/coalora" in p for p in evaluate_files)
    method_files = _artifacts(client, method.info.run_id)
    assert {"pareto/round_000.png", "pareto/round_001.png", "pareto/rounds.png", "loss.csv",
            "adapter/adapter.safetensors", "train.json"} <= method_files
    local = client.download_artifacts(parent.info.run_id, "pareto/evaluate_table_acc_mean.png")
    assert _non_blank_png(local)
    table = json.loads(Path(client.download_artifacts(runs["evaluate"].info.run_id,
                                                      "tables/table.json")).read_text())
    assert len(table["data"]) == 6 and "bits" in table["columns"]

    # The adapter byte for byte; no other weights anywhere (the base model never leaves the project).
    adapter = client.download_artifacts(method.info.run_id, "adapter/adapter.safetensors")
    assert Path(adapter).read_bytes() == (project / "artifacts/train/coalora/adapter.safetensors").read_bytes()
    logged = list((project / ".coalora" / "mlartifacts").rglob("*.safetensors"))
    assert [p.name for p in logged] == ["adapter.safetensors"]
    assert all(r.info.status == "FINISHED" for r in runs.values())


def test_tracking_uri_env_overrides_and_track_logs_existing_stages(project, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from coalora.track import log_pipeline

    other = tmp_path / "elsewhere" / "store.db"
    other.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    shutil.rmtree(project / "artifacts" / "evaluate")
    tracked = log_pipeline(project)  # no outcome: every stage with an output folder
    assert other.is_file() and not (project / ".coalora" / "mlflow.db").exists()
    runs = _runs(MlflowClient(tracked.tracking_uri), tracked.experiment_id)
    assert {n for n in runs if not n.startswith("pipeline")} == {"data", "base_model", "train", "train/coalora"}


def test_nothing_to_track_is_a_user_error(repo_root, tmp_path):
    from coalora.errors import UserError
    from coalora.track import log_pipeline

    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(UserError, match="track: no stage output"):
        log_pipeline(tmp_path)


def test_front_and_round_points():
    from coalora.figures import front_indices, round_points

    xs, ys = [2.0, 3.0, 4.0, 5.0], [0.5, 0.4, 0.6, 0.7]
    assert front_indices(xs, ys, lower_better=False) == [0, 2, 3]  # accuracy: higher is better
    assert front_indices(xs, ys, lower_better=True) == [0, 1]
    pool, front = round_points(ROUNDS[1])
    assert len(pool) == 3 and front == [(2.5, 2.8), (3.2, 2.2), (4.0, 1.9)]
    assert round_points({"pool": [{"id": "x", "bits": 3, "f1": 1}], "front": ["x"]})[1] == [(3.0, 1.0)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium: apt-get install chromium")
def test_mlflow_ui_shows_the_pareto_figure_in_chromium(repo_root, tmp_path):
    """As a user: `mlflow ui` on loopback, the run's Pareto figure opened in headless Chromium, not blank."""
    import subprocess
    import sys

    shot = tmp_path / "shot.png"
    done = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "mlflow_screenshot.py"), "--out",
                           str(shot)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert shot.is_file() and "plot pixels" in done.stdout


def test_ui_command_serves_the_project_store_on_loopback(tmp_path, monkeypatch):
    from coalora.track import ui_command

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    command = ui_command(tmp_path, port=5123)
    assert Path(command[0]).name == "mlflow" and command[1] == "ui"
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / '.coalora' / 'mlflow.db'}"
    assert command[command.index("--host") + 1] == "127.0.0.1" and command[-1] == "5123"


def test_the_same_results_are_logged_once(project):
    """A fully cached `coalora run` finds the run that already holds its results (no new MLflow run); a
    changed stage key means new results, which are logged again."""
    from coalora.track import already_tracked, log_pipeline

    names = ["data", "base_model", "train", "evaluate"]
    assert already_tracked(project, names) is None
    tracked = log_pipeline(project, outcome={"stages": {n: {"state": "Completed", "summary": {}} for n in names}})
    found = already_tracked(project, names)
    assert found is not None and (found.run_id, found.tracking_uri) == (tracked.run_id, tracked.tracking_uri)
    record = project / "artifacts" / "train" / "stage.json"
    record.write_text(record.read_text().replace("k" * 64, "j" * 64))  # the train stage was rebuilt
    assert already_tracked(project, names) is None


def test_the_library_imports_without_mlflow_or_matplotlib():
    """mlflow and matplotlib are imported inside the functions that use them: a machine without them (a GPU
    box running only the stages) imports the tracking package, the report and the CLI."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['mlflow'] = sys.modules['matplotlib'] = None\n"
            "import coalora.track, coalora.figures, coalora.evaluate.render, coalora.cli\n"
            "print('imported')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr
