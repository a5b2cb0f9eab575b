"""Look at the MLflow UI as a user would: a logged pipeline run, its Pareto figure, in headless Chromium.

    .venv/bin/python benchmarks/mlflow_screenshot.py                    # a small synthetic run
    .venv/bin/python benchmarks/mlflow_screenshot.py --project .        # the project's own runs (after
                                                                        #   `coalora run`), its latest pipeline run

Starts ``mlflow ui`` (the command ``coalora ui`` runs) on a free loopback port over the store, opens the
parent run's Pareto figure in Debian's Chromium (``apt-get install chromium``), saves the screenshot as
``benchmarks/mlflow_screenshot.png`` and checks it is not blank. Exit 0 when it is not, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,1000"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def synthetic_project(folder: Path) -> None:
    """params.yaml plus a train method with three search rounds and an evaluation table, as the stages write."""
    import csv

    import numpy as np
    from safetensors.numpy import save_file

    shutil.copy(REPO / "params.yaml", folder / "params.yaml")
    train = folder / "artifacts" / "train"
    method = train / "coalora"
    method.mkdir(parents=True)
    (train / "stage.json").write_text(json.dumps({"stage": "train", "key": "0" * 64, "summary": {"pool": 4}}))
    rounds = [{"round": r, "step": 40 * (r + 1), "hypervolume": 0.3 + 0.1 * r,
               "pool": [{"id": f"c{i}", "bits": b, "f1": f - 0.1 * r}
                        for i, (b, f) in enumerate([(2.3, 3.1), (3.0, 2.6), (3.7, 2.4), (5.1, 2.3)])],
               "front": ["c0", "c1", "c2", "c3"]} for r in range(3)]
    (method / "train.json").write_text(json.dumps({"method": "coalora", "steps": 120, "final_loss": 2.3,
                                                   "rounds": rounds}))
    (method / "loss.csv").write_text("step,run,loss\n" + "".join(
        f"{s},joint,{3.5 * 0.99 ** s:.4f}\n" for s in range(120)))
    save_file({"lora_A": np.zeros((4, 8), np.float32)}, str(method / "adapter.safetensors"))
    evaluate = folder / "artifacts" / "evaluate"  # the evaluate stage's table.csv, its main columns
    evaluate.mkdir()
    (evaluate / "stage.json").write_text(json.dumps({"stage": "evaluate", "key": "0" * 64, "summary": {"rows": 18}}))
    with (evaluate / "table.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "config_id", "set", "bits", "acc_mean", "ppl"])
        for name, shift in (("coalora", 0.04), ("qlora", 0.0), ("shared", -0.03)):
            for i, bits in enumerate([2.3, 2.8, 3.3, 3.9, 4.6, 5.4]):
                acc = 0.45 + 0.05 * i ** 0.8 + shift
                writer.writerow([name, f"{name}{i}", "seen" if i % 2 == 0 else "unseen", bits, round(acc, 3),
                                 round(30 - 30 * acc, 2)])


def latest_pipeline_run(project: Path) -> tuple[str, str, str]:
    """(tracking uri, experiment id, run id) of the newest parent run in the project's store."""
    from mlflow.tracking import MlflowClient

    from coalora.track import EXPERIMENT, tracking_uri

    uri = tracking_uri(project)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        sys.exit(f"no MLflow experiment {EXPERIMENT!r} in {uri}; run `coalora run` or `coalora track` first")
    runs = client.search_runs([experiment.experiment_id], "tags.`coalora.kind` = 'pipeline'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        sys.exit(f"no pipeline run in {uri}")
    return uri, experiment.experiment_id, runs[0].info.run_id


def pareto_artifact(uri: str, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    files = [f.path for f in MlflowClient(uri).list_artifacts(run_id, "pareto")]
    if not files:
        sys.exit(f"run {run_id} has no Pareto figure (pareto/*.png)")
    # The headline: mean accuracy vs bits when the evaluation logged it, else the first figure.
    return next((f for f in sorted(files) if f.endswith("acc_mean.png")), sorted(files)[0])


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit("mlflow ui exited early")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"mlflow ui did not answer at {url} within {timeout:.0f} s")


def screenshot(page: str, out: Path, budget_ms: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", page],
                       check=True, capture_output=True, timeout=120)


# matplotlib's default colours 2-6 (the methods after the first); the MLflow page around the figure uses
# none of them (its own blue is close to colour 1, its assistant icon to colour 7), so a page without the
# figure counts none: checked on a screenshot with the figure painted over.
PLOT_COLOURS = {"orange": (1.0, 0.498, 0.055), "green": (0.173, 0.627, 0.173), "red": (0.839, 0.153, 0.157),
                "purple": (0.58, 0.404, 0.741), "brown": (0.549, 0.337, 0.294)}


def plot_pixels(png: Path) -> dict[str, int]:
    """How many pixels of the screenshot have each of ``PLOT_COLOURS``."""
    import matplotlib.image
    import numpy as np

    rgb = matplotlib.image.imread(png)[..., :3]
    return {name: int((np.abs(rgb - np.array(colour)).max(-1) < 0.08).sum())
            for name, colour in PLOT_COLOURS.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=None, help="a project with logged runs (default: synthetic)")
    parser.add_argument("--out", type=Path, default=HERE / "mlflow_screenshot.png")
    parser.add_argument("--budget-ms", type=int, default=20000, help="Chromium's virtual time for the page")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from coalora.env import configure

    with tempfile.TemporaryDirectory() as tmp:
        project = args.project.resolve() if args.project else Path(tmp)
        configure(project)
        if args.project is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
            synthetic_project(project)
            from coalora.track import log_pipeline

            log_pipeline(project, run_name="synthetic pipeline run")
        uri, experiment_id, run_id = latest_pipeline_run(project)
        figure = pareto_artifact(uri, run_id)

        from coalora.track import ui_command

        port = free_port()
        command = ui_command(project, "127.0.0.1", port)
        base = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        ui = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        try:
            wait_healthy(base, ui)
            healthy = time.perf_counter() - started
            page = f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{figure}"
            screenshot(page, args.out, args.budget_ms)
        finally:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(20)
    counts = plot_pixels(args.out)
    print(f"mlflow ui healthy after {healthy:.1f} s; page {page}")
    print(f"screenshot {args.out} ({args.out.stat().st_size} bytes); plot pixels {counts}")
    return 0 if sum(counts.values()) >= 100 else 1


if __name__ == "__main__":
    sys.exit(main())
