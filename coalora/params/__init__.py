"""params.yaml: the single source of parameters, validated when loaded.

One section per stage plus shared sections. A *profile* (``profiles/<name>.yaml``) is a partial overlay
in the same schema, merged over params.yaml before validation; ``smoke`` is the small-size profile for
tests and quick tries. Every error names the key path (``train.lr``) and what is allowed, and nothing is
written before params validate.

    base        Section (no unknown keys, no silent coercion) and the bits range of any budget
    inputs      world, data, model, eval protocol, quant, calibrate, allocate
    experiment  lora, train, search, evaluate, report, study
    schema      Params, the whole file
    files       reading params.yaml and profiles, validation messages
"""

from coalora.params.base import MAX_BITS, MIN_BITS, Section
from coalora.params.files import deep_merge, dump_params, load_params, profile_path, validate
from coalora.params.inputs import (BENCHMARKS, BUILTIN_MODEL, AllocateParams, BuiltinModelParams,
                                   CalibrateParams, DataParams, EvalParams, HubDataset, ModelParams,
                                   PackagedParams, PerplexityParams, QuantParams, UnseenParams, WorldParams)
from coalora.params.experiment import (TRAIN_METHODS, BootstrapParams, ClaimsParams, ConfigNetParams,
                                    EvaluateParams, HvAccuracy, HvParams, HvPerplexity, LoraParams,
                                    ReportParams, SearchParams, StudyParams, TrainParams)
from coalora.params.schema import Params

__all__ = [
    "MAX_BITS", "MIN_BITS", "Section", "deep_merge", "dump_params", "load_params", "profile_path", "validate",
    "BENCHMARKS", "BUILTIN_MODEL", "AllocateParams", "BuiltinModelParams", "CalibrateParams", "DataParams",
    "EvalParams", "HubDataset", "ModelParams", "PackagedParams", "PerplexityParams", "QuantParams",
    "UnseenParams", "WorldParams", "TRAIN_METHODS", "BootstrapParams", "ClaimsParams", "ConfigNetParams",
    "EvaluateParams", "HvAccuracy", "HvParams", "HvPerplexity", "LoraParams", "ReportParams", "SearchParams",
    "StudyParams", "TrainParams", "Params",
]
