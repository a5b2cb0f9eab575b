"""Evaluation: perplexity under a named protocol, and zero-shot benchmarks through lm-eval.

    perplexity  the ``nonoverlap`` protocol          harness  lm-eval's own tasks on local files
    plan        which (method, config) rows: seen / unseen at each budget
    row         one row: the method's adapter on the in-memory quantized model, scored
    table       rows as flat records, per-method means
    summary     hypervolume (params' normalisation and reference), gaps, training / serving time
    report      report.md, PNG plots, the CSV files DVC plots

Light to import: lm_eval and transformers are imported inside the functions that use them.
"""

from coalora.evaluate.harness import TASKS, chance_level, run_benchmarks, write_task_configs
from coalora.evaluate.perplexity import PROTOCOL, perplexity, protocol_name

__all__ = ["PROTOCOL", "TASKS", "chance_level", "perplexity", "protocol_name", "run_benchmarks",
           "write_task_configs"]
