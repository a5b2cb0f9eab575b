"""coalora: one configuration-aware LoRA adapter for every quantization configuration of an LLM.

The library holds all ML logic and imports no orchestration package (prefect, dvc, mlflow) at module
level, so it runs wherever torch runs.
"""

__version__ = "0.1.0"

# A packed model folder (`coalora adapt`) loads with plain `AutoModelForCausalLM.from_pretrained` once coalora is
# imported: the "coalora" quantization method registers itself when transformers' quantizer registry is imported.
from coalora.deploy.hooks import install as _install_hooks

_install_hooks()
