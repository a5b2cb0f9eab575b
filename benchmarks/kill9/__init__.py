"""kill -9 anywhere, any number of times: SIGKILL ``coalora run`` (its whole process group) at points spread
over every stage, Prefect's server start, MLflow's store creation and logging and the search, run it again,
and check that the re-run ends with the results of an uninterrupted run and that nothing outlives the runs.

    .venv/bin/python -m benchmarks.kill9                     # every trial (~27; hours on a loaded machine)
    .venv/bin/python -m benchmarks.kill9 --trials train-ckpt,mlflow-store   # some of them
    .venv/bin/python -m benchmarks.kill9 --list              # the trials and where each kills

Each trial is a fresh smoke-profile project (``tests/test_pipeline.make_project``). Trials aimed at a late
stage start from a copy of the reference run's finished upstream stages, so they reach their kill point
sooner; everything else (Prefect's state, the MLflow store, the work folders) starts empty. A kill point is
an event of the run (a stage's temporary output folder appears, a training checkpoint or an evaluation row is
written, a log line, MLflow's temporary store appears, ...) plus a fraction of the time to a later event,
both as measured in the uninterrupted reference run. A trial kills at each of its points in turn (a new
``coalora run`` each time), then runs ``coalora run`` to its end and checks that:

- it exits 0 and every stage finished before a kill is reported Cached (kept, not rebuilt);
- every result file equals the reference's: adapters, pools, checkpoints' products, tables, the report
  (byte for byte, after leaving out wall-clock fields: ``WALL_CLOCK``);
- no process started by any of the trial's runs is alive (Prefect's server included; found by an
  environment mark every child inherits), after each kill and at the end;
- the project lock is free, no ``.tmp-*``/``.old-*`` folder or temporary MLflow store is left, the MLflow
  store is at the installed schema revision and none of its runs of this project is still RUNNING.

The modules: ``events`` (what a running project shows, and when), ``trials`` (the table of trials and
their kill points), ``running`` (a run killed at an event; a trial; the reference run), ``results`` (the
files compared), ``after_run`` (what must not outlive a run), ``markdown`` (kill9.md) and ``command`` (the
command line).

Writes ``benchmarks/kill9.md`` (a table per category: tried, held, failed) and ``kill9.json`` in the work
folder (every trial's kills, timings and problems).
"""

from .command import main
from .trials import TRIALS

__all__ = ["TRIALS", "main"]
