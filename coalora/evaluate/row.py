"""Score one (method, config) row: the in-memory quantized model with the method's adapter, under ``eval``.

For a row (``plan.Job``) the base model is loaded afresh (so a row never depends on which rows ran before it
in the same process: rows can run in any order, or in parallel), wrapped as the method was trained:

    coa backend   CoAModel(base, θ if the adapter has one); LQ-LoRA (``init: svd``) quantizes the residual
                  W − (α/r)·B₀·A₀ of the same seeded SVD init as in training; the adapter's A, B (and θ) are
                  loaded; ``set_config(config)`` quantizes every layer and evaluates θ once
    bnb backend   peft LoRA on bitsandbytes NF4 layers (the uniform config only)

and scored on (1) perplexity of the C4-schema validation text under protocol ``eval.perplexity`` (its name
is in every row), (2) zero-shot accuracy on ``eval.tasks`` through lm-eval's own task definitions on the local
benchmark files (``harness.run_benchmarks``). Everything runs on one torch thread: the small default model is
faster that way on a shared CPU, and the numbers do not depend on the thread count.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from coalora.artifacts import read_json, read_jsonl
from coalora.errors import ArtifactError
from coalora.evaluate.plan import UNIFORM, Job

if TYPE_CHECKING:  # pragma: no cover
    from coalora.params import EvalParams, LoraParams


@dataclass(frozen=True)
class RowInputs:
    """What scoring a row reads: the upstream stage folders and the params it depends on.

    Attributes:
        folders: stage name → output folder (data, base_model, allocate, train).
        eval: ``EvalParams`` (tasks, limit, batch_size, perplexity protocol).
        lora: ``LoraParams`` the adapters were trained with.
        target_modules: ``quant.target_modules``.
        seed: ``seed`` (lm-eval's seeds; LQ-LoRA's SVD init).
    """

    folders: dict[str, Path]
    eval: "EvalParams"
    lora: "LoraParams"
    target_modules: tuple[str, ...]
    seed: int


_THREADS_LOCK = threading.Lock()
_THREADS: dict = {"depth": 0, "before": None}


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, then restore the previous count. The count is process-wide,
    so it is reference-counted under a lock: rows scored in parallel threads restore it once, after the last."""
    import torch

    with _THREADS_LOCK:
        if _THREADS["depth"] == 0:
            _THREADS["before"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS["depth"] -= 1
            if _THREADS["depth"] == 0:
                torch.set_num_threads(_THREADS["before"])


def load_config(job: Job, inputs: RowInputs, layers):
    """The row's Config, validated against the model's layers; its id must be the planned one."""
    from coalora.space import Config

    if job.config.stage == UNIFORM:
        from coalora.train.bnb import uniform_config

        config = uniform_config(layers)
    else:
        config = Config.load(inputs.folders[job.config.stage] / job.config.path, layers)
    if config.id != job.config.id:
        raise ArtifactError(f"evaluate {job.id}: config {job.config.path} has id {config.id}, planned "
                            f"{job.config.id}; run the upstream stages again")
    return config


def quantized_model(job: Job, inputs: RowInputs):
    """(HF causal LM with the adapter, quantized with the row's config; tokenizer; config; switch seconds).

    ``switch seconds``: quantizing every layer to the config (and evaluating θ): the cost of serving one
    more configuration from a loaded model.
    """
    import torch

    from coalora.model.coa import CoAModel, read_adapter
    from coalora.model.load import load_base
    from coalora.space import quantized_layers

    train_dir = inputs.folders["train"]
    path = train_dir / job.adapter
    try:
        tensors, header = read_adapter(path)
    except ValueError as exc:
        raise ArtifactError(f"evaluate {job.id}: {exc}; run `coalora stage train` again") from None
    record = read_json(train_dir / job.method / "train.json")
    if int(header.get("rank", inputs.lora.rank)) != inputs.lora.rank:
        raise ArtifactError(f"evaluate {job.id}: adapter rank {header.get('rank')} but lora.rank is "
                            f"{inputs.lora.rank}; run `coalora stage train` again")
    torch.manual_seed(inputs.seed)
    base, tokenizer = load_base(inputs.folders["base_model"], header.get("dtype") or record["train"]["dtype"])
    layers = quantized_layers(base, inputs.target_modules)
    config = load_config(job, inputs, layers)
    if header.get("format") == "peft":
        from coalora.train.bnb import BnbLoraModel

        started = time.perf_counter()
        model = BnbLoraModel(base, layers, inputs.lora)  # quantizes to NF4 on construction
        model.set_config(config)
        switch = time.perf_counter() - started
        model.load_adapter_state_dict(tensors)
        return model.peft.get_base_model().eval(), tokenizer, config, switch
    coa = CoAModel(base, layers, inputs.lora, use_confignet=bool(header.get("use_confignet")))
    if record.get("init") == "svd":
        coa.set_residual_base(coa.init_lqlora(inputs.seed))
    try:
        coa.load_adapter_state_dict(tensors)
    except ValueError as exc:
        raise ArtifactError(f"evaluate {job.id}: {path}: {exc}; run `coalora stage train` again") from None
    started = time.perf_counter()
    coa.set_config(config)
    switch = time.perf_counter() - started
    return coa.model.eval(), tokenizer, config, switch


def score_row(job: Job, inputs: RowInputs, work_dir: Path) -> dict:
    """Score one row (module docstring).

    Args:
        job: the planned row.
        inputs: stage folders and params.
        work_dir: scratch folder of this row only (lm-eval's task YAMLs and datasets cache).

    Returns:
        The row: identity (method, config id, seen/unseen, bits, budgets, adapter), ``ppl`` (+ ``nll``,
        ``ppl_protocol``), per-task ``acc`` / ``acc_norm`` / ``n`` / ``chance``, ``acc_mean`` (the unweighted
        mean accuracy over the tasks), and ``switch_seconds`` / ``eval_seconds``.
    """
    from coalora.data import layout
    from coalora.evaluate.harness import run_benchmarks
    from coalora.evaluate.perplexity import perplexity

    e = inputs.eval
    data_dir = inputs.folders["data"]
    with one_torch_thread():
        model, tokenizer, config, switch = quantized_model(job, inputs)
        started = time.perf_counter()
        texts = [row["text"] for row in read_jsonl(layout.data_file(data_dir, "c4_validation"))]
        ppl = perplexity(model, tokenizer, texts, e.perplexity.seq_len, e.perplexity.max_windows, e.batch_size)
        bench = run_benchmarks(model, tokenizer, data_dir, e.tasks, e.limit, e.batch_size, inputs.seed, work_dir)
        seconds = time.perf_counter() - started
    return {
        "job": job.id, "method": job.method, "config_id": config.id, "set": "seen" if job.seen else "unseen",
        "bits": config.bits, "exact_bits": config.exact_bits, "budgets": list(job.budgets),
        "adapter": job.adapter, "adapter_config": job.adapter_config,
        "ppl": ppl["ppl"], "nll": ppl["nll"], "ppl_protocol": ppl["protocol"], "ppl_tokens": ppl["n_tokens"],
        "tasks": bench,
        "acc_mean": sum(b["acc"] for b in bench.values()) / len(bench),
        "limit": e.limit,
        "switch_seconds": round(switch, 4), "eval_seconds": round(seconds, 3),
    }
