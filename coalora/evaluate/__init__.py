"""Evaluation: perplexity under a named protocol, and zero-shot benchmarks through lm-eval.

Light to import: lm_eval and transformers are imported inside the functions that use them.
"""

from coalora.evaluate.harness import TASKS, chance_level, run_benchmarks, write_task_configs
from coalora.evaluate.perplexity import PROTOCOL, perplexity, protocol_name

__all__ = ["PROTOCOL", "TASKS", "chance_level", "perplexity", "protocol_name", "run_benchmarks",
           "write_task_configs"]
