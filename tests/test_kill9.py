"""A sample of benchmarks/kill9's trials: `coalora run` killed with SIGKILL (its whole process group) while
Prefect's server migrates its database, inside training at a checkpoint, and while MLflow creates its store;
each re-run ends with the results of an uninterrupted run, and no process, lock, temporary folder or
half-made store outlives the runs. The full set (~27 trials) is `.venv/bin/python -m benchmarks.kill9`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import kill9  # noqa: E402

SAMPLE = ("server-migrate", "train-ckpt", "mlflow-store")


def test_kill9_sample_resumes_to_the_uninterrupted_results(tmp_path):
    out = tmp_path / "kill9.md"
    rc = kill9.main(["--trials", ",".join(SAMPLE), "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 0, out.read_text()
    table = out.read_text()
    assert f"| **all** | **{len(SAMPLE)}** | **{len(SAMPLE)}** | **0** |" in table, table
