"""Process environment for a coalora run: offline hubs, no telemetry, state under the project.

Must run before prefect, mlflow, datasets or transformers are imported, because they read these variables
at import time. Values already set by the user win (``setdefault``).
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR = ".coalora"

# Every line was needed on our machines (ECOSYSTEM.md): without the HF switches `datasets` makes a HEAD
# request even for local files; without the analytics switches Prefect and DVC try to phone home.
QUIET = {
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    # a fresh server migrates its database first: over 60 s on a loaded 2-core machine (measured)
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
    "TOKENIZERS_PARALLELISM": "false",
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def state_dir(root: Path | str) -> Path:
    """The project's state folder (Prefect home and results, MLflow store, DVC local remote)."""
    return Path(root).resolve() / STATE_DIR


def configure(root: Path | str = ".", create: bool = True) -> Path:
    """Set the defaults above, plus Prefect's home and result storage under the project's state folder.

    The hubs stay offline unless ``COALORA_ONLINE=1``: a run never reaches the network by surprise, and a
    missing model or dataset fails fast with a message saying how to pre-fetch it. ``create=False``: set
    the variables only (checks that may still reject the run write nothing); call again before Prefect.
    """
    state = state_dir(root)
    defaults = dict(QUIET)
    if os.environ.get("COALORA_ONLINE") != "1":
        defaults.update(OFFLINE)
    defaults["PREFECT_HOME"] = str(state / "prefect")
    defaults["PREFECT_LOCAL_STORAGE_PATH"] = str(state / "prefect" / "storage")
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # Prefect creates its home without parents and warns when it cannot: make the state folder first.
    if create:
        Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    return state
