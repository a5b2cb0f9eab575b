"""Shared fixtures. Tests run on CPU, offline: any non-loopback connection fails the test, also in the
subprocesses tests start (dvc, `coalora run`, Prefect's server)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Offline and quiet before any HF/Prefect/MLflow import (they read these at import time).
for _key, _value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[_key] = _value


# The offline guard (tests/offline/sitecustomize.py) here and in every Python subprocess a test starts: they
# inherit this PYTHONPATH and switch, and import the guard at start-up as ``sitecustomize``.
GUARD_DIR = REPO_ROOT / "tests" / "offline"
os.environ["PYTHONPATH"] = os.pathsep.join([str(GUARD_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ["COALORA_TEST_OFFLINE"] = "1"
# Loaded from its file under its own name: this process may already hold another ``sitecustomize``.
_spec = importlib.util.spec_from_file_location("coalora_offline_guard", GUARD_DIR / "sitecustomize.py")
_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_guard)
NetworkAccessError = _guard.NetworkAccessError
_guard.install()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Prefect's own test harness (a temporary server and database), started once per session."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-storage")
    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
            yield storage


@pytest.fixture(scope="session")
def default_world():
    """The default-size embedded world (params.yaml) in memory, built once per session for the world's tests
    (test_world.py, test_world_items.py): world, rows per file, benchmark items."""
    from coalora.data.benchmarks import benchmark_items
    from coalora.data.embedded import build_embedded
    from coalora.params import load_params

    params = load_params(REPO_ROOT)
    world, rows = build_embedded(params.seed, **params.world.model_dump())
    items = benchmark_items(world, params.world.n_items, params.seed)
    return world, rows, items
