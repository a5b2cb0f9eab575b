"""Score one (method, config) row: the in-memory quantized model with the method's adapter, under ``eval``.

For a row (``plan.Job``) the base model is loaded afresh (so a row never depends on which rows ran before it
in the same process: rows can run in any order, or in parallel), and built as the method was trained
(``coalora.model.rebuild``, from the backend, θ, init and seed its train.json records):

    coa backend   CoAModel(base, θ if the method has one); LQ-LoRA (``init: svd``) quantizes the residual
                  W − (α/r)·B₀·A₀ of the same seeded SVD init as in training (the seed train.json records);
                  the adapter's A, B (and θ) are loaded; ``set_config(config)`` quantizes every layer and
                  evaluates θ once; then every layer is merged to W̃ + (α/r)·B·U·A (``CoAModel.merged``)
    none          the quantized base without an adapter: a CoAModel with B = 0, merged (W' = W̃ exactly)
    full          the base model as loaded (full precision)
    bnb backend   peft LoRA on bitsandbytes NF4 layers (the uniform config only)

and scored on (1) perplexity of the C4-schema validation text under protocol ``eval.perplexity`` (its name
is in every row), (2) zero-shot accuracy on ``eval.tasks`` through lm-eval's own task definitions on the
local benchmark files (``harness.Benchmarks``). Each row keeps its per-item results (each item's
correctness, each window's NLL) for the paired bootstrap of the report. Everything runs on one torch
thread: the numbers do not depend on the thread count, and rows can be scored in parallel processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from coalora.artifacts import read_jsonl
from coalora.errors import ArtifactError
from coalora.evaluate.plan import FULL, NONE, UNIFORM, Job
from coalora.threads import one_torch_thread
from coalora.trained import read_record

if TYPE_CHECKING:  # pragma: no cover
    from coalora.evaluate.harness import Benchmarks
    from coalora.params import EvalParams, LoraParams

DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


@dataclass(frozen=True)
class RowInputs:
    """What scoring a row reads: the upstream stage folders and the params it depends on.

    Attributes:
        folders: stage name → output folder (data, base_model, allocate, train).
        eval: ``EvalParams`` (tasks, limit, batch_size, perplexity protocol).
        lora: ``LoraParams`` the adapters were trained with.
        target_modules: ``quant.target_modules``.
        seed: ``seed`` (lm-eval's seeds).
        dtype: compute dtype of the rows without an adapter (``none``, ``full``): the training dtype.
    """

    folders: dict[str, Path]
    eval: "EvalParams"
    lora: "LoraParams"
    target_modules: tuple[str, ...]
    seed: int
    dtype: str


def load_config(job: Job, inputs: RowInputs, layers):
    """The row's Config, validated against the model's layers; its id must be the planned one."""
    from coalora.space import Config

    if job.config.stage == UNIFORM:
        from coalora.model.bnb_lora import uniform_config

        config = uniform_config(layers)
    else:
        config = Config.load(inputs.folders[job.config.stage] / job.config.path, layers)
    if config.id != job.config.id:
        raise ArtifactError(f"evaluate {job.id}: config {job.config.path} has id {config.id}, planned "
                            f"{job.config.id}; run the upstream stages again")
    return config


def _adapter(job: Job, inputs: RowInputs) -> tuple[dict, dict, dict]:
    """(tensors, header, train.json record) of the row's adapter, checked against ``lora``."""
    from coalora.model.adapter import read_adapter

    path = inputs.folders["train"] / job.adapter
    try:
        tensors, header = read_adapter(path)
    except ValueError as exc:
        raise ArtifactError(f"evaluate {job.id}: {exc}; run `coalora stage train` again") from None
    if int(header.get("rank", inputs.lora.rank)) != inputs.lora.rank:
        raise ArtifactError(f"evaluate {job.id}: adapter rank {header.get('rank')} but lora.rank is "
                            f"{inputs.lora.rank}; run `coalora stage train` again")
    return tensors, header, read_record(inputs.folders["train"], job.method)


def quantized_model(job: Job, inputs: RowInputs):
    """(HF causal LM for the row, tokenizer, config or None (``full``), switch seconds, bits).

    The model is rebuilt as the method was trained (``coalora.model.rebuild``, from what its train.json
    records); ``none`` is the quantized base (``Recipe.quantized_base``). ``switch seconds``: quantizing every
    layer to the config (and evaluating θ, merging the adapter): the cost of serving one more configuration
    from a loaded model.
    """
    import torch

    from coalora import parallel
    from coalora.model import rebuild
    from coalora.model.load import load_base
    from coalora.model.rebuild import Recipe
    from coalora.space import quantized_layers

    torch.manual_seed(inputs.seed)
    if job.method in (NONE, FULL):
        tensors, header, recipe = {}, {}, Recipe.quantized_base(inputs.seed)
        dtype = inputs.dtype
    else:
        tensors, header, record = _adapter(job, inputs)
        recipe = Recipe.from_record(record)
        dtype = header.get("dtype") or record["train"]["dtype"]
    base, tokenizer = load_base(inputs.folders["base_model"], dtype)
    base = parallel.to_device(base)  # the GPU when there is one: quantization and scoring run there
    if job.method == FULL:
        return base.eval(), tokenizer, None, 0.0, float(DTYPE_BITS[dtype])
    layers = quantized_layers(base, inputs.target_modules)
    config = load_config(job, inputs, layers)
    started = time.perf_counter()
    try:
        model = rebuild.rebuild(recipe, base, layers, inputs.lora, tensors)
    except ValueError as exc:
        raise ArtifactError(f"evaluate {job.id}: {job.adapter}: {exc}; run `coalora stage train` "
                            f"again") from None
    served = rebuild.serve(model, recipe, config)
    return served, tokenizer, config, time.perf_counter() - started, config.bits


def score_row(job: Job, inputs: RowInputs, benchmarks: "Benchmarks") -> dict:
    """Score one row (module docstring).

    Returns:
        The row: identity (method, config id, set, bits, budgets, adapter, layers_from_trained), ``ppl`` (+
        ``nll``, ``ppl_protocol``), per-task ``acc`` / ``acc_norm`` / ``n`` / ``chance``, ``acc_mean`` (the
        unweighted mean accuracy over the tasks), ``switch_seconds`` / ``eval_seconds``, and ``items``:
        ``{"<task>": {"acc": [...], "acc_norm": [...] | None}, "ppl": {"window_nll": [...],
        "tokens_per_window": T − 1}}``.
    """
    from coalora.data import layout
    from coalora.evaluate.perplexity import perplexity

    e = inputs.eval
    with one_torch_thread():
        model, tokenizer, config, switch, bits = quantized_model(job, inputs)
        started = time.perf_counter()
        texts = [row["text"] for row in read_jsonl(layout.data_file(inputs.folders["data"], "c4_validation"))]
        ppl = perplexity(model, tokenizer, texts, e.perplexity.seq_len, e.perplexity.max_windows, e.batch_size)
        bench = benchmarks.score(model, tokenizer, e.batch_size, inputs.seed)
        seconds = time.perf_counter() - started
    items = {task: scores.pop("items") for task, scores in bench.items()}
    items["ppl"] = {"window_nll": ppl["window_nll"], "tokens_per_window": e.perplexity.seq_len - 1}
    return {
        "job": job.id, "method": job.method, "config_id": job.config.id, "set": job.set,
        "bits": bits, "exact_bits": config.exact_bits if config is not None else bits,
        "budgets": list(job.budgets), "adapter": job.adapter, "adapter_config": job.adapter_config,
        "layers_from_trained": job.layers_from_trained,
        "source": config.meta.get("source") if config is not None else None,
        "ppl": ppl["ppl"], "nll": ppl["nll"], "ppl_protocol": ppl["protocol"], "ppl_tokens": ppl["n_tokens"],
        "tasks": bench,
        "acc_mean": sum(b["acc"] for b in bench.values()) / len(bench),
        "limit": e.limit,
        "switch_seconds": round(switch, 4), "eval_seconds": round(seconds, 3),
        "items": items,
    }
