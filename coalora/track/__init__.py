"""MLflow tracking of a pipeline run: one parent run, a child run per stage and per training method.

    store         the project's MLflow store (tracking URI, a SQLite store a kill never leaves half-made, the
                  experiment), params/metrics/curves in MLflow's batches, what was logged last, ``mlflow ui``
    child_runs    what a stage's run and a training method's run hold, read from the stage folders
    pipeline_run  the parent run over the stages, its headline, closing runs a killed run left RUNNING

mlflow and matplotlib are imported inside functions, so the library stays importable where they are not
installed. The figures are ``coalora.figures`` (shared with the report). The names below are the ones the
CLI, the Prefect tasks and the benchmarks use.
"""

from coalora.track.pipeline_run import close_abandoned, log_pipeline
from coalora.track.store import (EXPERIMENT, TrackedRun, already_tracked, ensure_store, head_revision,
                                 schema_revision, tracking_uri, ui_command)

__all__ = ["EXPERIMENT", "TrackedRun", "already_tracked", "close_abandoned", "ensure_store", "head_revision",
           "log_pipeline", "schema_revision", "tracking_uri", "ui_command"]
