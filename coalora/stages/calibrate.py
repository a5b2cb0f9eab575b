"""Stage ``calibrate``: Fisher diagonals and the (layer, spec) cost tables of the base model.

Reads the base model (``base_model``) and the fine-tuning text (``data``); writes

    costs.safetensors   cost_fisher (L, C) when weighting is fisher, cost_squared (L, C), numel (L,),
                        bits_per_param (C,)
    costs.json          the index: layer names and shapes in row order, spec keys in column order, the
                        weighting the allocation uses (``selected``), n_sequences
    fisher.safetensors  layer name → (out, in) Fisher diagonal (weighting fisher only)
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from coalora import parallel
from coalora.artifacts import read_jsonl
from coalora.calibrate.costs import cost_tables
from coalora.calibrate.fisher import calibration_sequences, fisher_diagonals
from coalora.calibrate.cost_table import FISHER_FILE, CostTable
from coalora.data import layout
from coalora.params import Params
from coalora.quant import all_specs
from coalora.space import quantized_layers
from coalora.stages.core import Stage, StageContext

log = logging.getLogger("coalora.stages.calibrate")



def timed(fn: Callable, *args, **kwargs):
    """(result, seconds) of one call."""
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def calibrate_costs(params: Params, ctx: StageContext) -> dict:
    """Calibrate: sequences → Fisher (weighting fisher) → both cost tables → files; returns a summary."""
    from safetensors.torch import save_file

    from coalora.model.load import load_base

    p = params.calibrate
    model, tokenizer = load_base(ctx.input("base_model"))  # float32: the costs are computed in float32
    model = parallel.to_device(model)  # the GPU when there is one: the cost table quantizes every layer 432 times
    layers = quantized_layers(model, params.quant.target_modules)
    specs = all_specs()
    fisher, fisher_seconds = None, 0.0
    if p.weighting == "fisher":
        texts = [row["text"] for row in read_jsonl(layout.data_file(ctx.input("data"), "c4_train"))]
        sequences = calibration_sequences(tokenizer, texts, p.n_sequences, p.seq_len, params.seed)
        fisher, fisher_seconds = timed(fisher_diagonals, model, sequences, layers, ctx.progress, p.batch_size)
        save_file({name: f.contiguous() for name, f in fisher.items()}, str(ctx.out / FISHER_FILE))
    tables, cost_seconds = timed(cost_tables, model, layers, fisher, specs, ctx.progress, p.sample_weights,
                                 params.seed)
    table = CostTable(layers, specs, {f"cost_{k}": v for k, v in tables.items()}, p.weighting,
                      p.n_sequences if fisher is not None else 0)
    table.save(ctx.out)
    log.info("calibrate: %d layers × %d specs, fisher %.1f s, cost tables %.1f s",
             len(layers), len(specs), fisher_seconds, cost_seconds)
    return {
        "layers": len(layers),
        "specs": len(specs),
        "params_quantized": int(table.numel.sum()),
        "weighting": p.weighting,
        "n_sequences": table.n_sequences,
        "fisher_seconds": round(fisher_seconds, 2),
        "cost_table_seconds": round(cost_seconds, 2),
        "sample_weights": p.sample_weights,
    }


STAGE = Stage(
    name="calibrate",
    fn=calibrate_costs,
    params=("seed", "quant", "calibrate"),
    deps=("data", "base_model"),
    description="Fisher diagonals and the per-(layer, spec) quantization cost tables",
)
