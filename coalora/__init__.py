"""coalora: one configuration-aware LoRA adapter for every quantization configuration of an LLM.

The library holds all ML logic and imports no orchestration package (prefect, dvc, mlflow) at module
level, so it runs wherever torch runs.
"""

__version__ = "0.1.0"
