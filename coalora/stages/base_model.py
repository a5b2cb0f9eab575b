"""Stage ``base_model``: the full-precision base model every later stage quantizes, and its reference scores.

* ``model.name_or_path: builtin`` — train the byte-level BPE tokenizer and pretrain the small Llama on the
  data stage's pretraining text (``c4_pretrain``: no document of it is fine-tuned on or validated on),
  save an ordinary Hugging Face folder (safetensors) at ``model/``, then reload
  it through ``AutoModelForCausalLM`` / ``AutoTokenizer`` and evaluate the reloaded model (so the scores
  are those of what later stages load).
* a hub id or a local folder — load it (a clear error when it is not available offline), copy no weights,
  and record the reference.

Either way ``base.json`` says where the model is (read by :func:`coalora.model.load_base`), and the summary
holds parameter counts, validation perplexity (with its protocol name), zero-shot accuracy per benchmark
next to chance, and the pretraining statistics. ``metrics.json`` holds the flat numbers for
``dvc metrics show``.
"""

from __future__ import annotations

import re
from pathlib import Path

from coalora.artifacts import read_jsonl, write_json
from coalora.data import layout
from coalora.errors import UserError
from coalora.params import BUILTIN_MODEL, Params
from coalora.stages.core import Stage, StageContext

MODEL_DIR = "model"
METRICS = "metrics.json"
# A linear layer inside a numbered transformer block: model.layers.3.mlp.up_proj, transformer.h.0.attn...
BLOCK_LINEAR = re.compile(r"(^|\.)(layers|h|blocks|block)\.\d+\.")


def count_params(model) -> dict[str, int]:
    """Total parameters (tied weights once) and those in the linear layers of the transformer blocks
    (the layers quantization acts on)."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    linear = sum(module.weight.numel() for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and BLOCK_LINEAR.search(name))
    return {"total": total, "block_linear": linear}


def _texts(data_dir: Path, key: str) -> list[str]:
    return [row["text"] for row in read_jsonl(layout.data_file(data_dir, key))]


def _evaluate(model, tokenizer, params: Params, ctx: StageContext, val_texts: list[str]) -> tuple[dict, dict]:
    from coalora.evaluate import perplexity, run_benchmarks

    e = params.eval
    ppl = perplexity(model, tokenizer, val_texts, e.perplexity.seq_len, e.perplexity.max_windows, e.batch_size)
    bench = run_benchmarks(model, tokenizer, ctx.input("data"), e.tasks, e.limit, e.batch_size, params.seed,
                           ctx.work / "lm_eval")
    # the summary keeps the headline figures; per-item results are the evaluate stage's (its `full` row)
    ppl.pop("window_nll")
    return ppl, {task: {k: v for k, v in scores.items() if k != "items"} for task, scores in bench.items()}


def _builtin(params: Params, ctx: StageContext, data_dir: Path, val_texts: list[str]) -> tuple[dict, dict]:
    """Train tokenizer + model, save, reload. Returns (base reference, builtin-only summary parts)."""
    from coalora.evaluate import perplexity
    from coalora.model import build_model, load_model, pretrain, train_tokenizer

    b, e = params.model.builtin, params.eval
    train_texts = _texts(data_dir, "c4_pretrain")
    if not train_texts:
        raise UserError(f"model.name_or_path: builtin needs pretraining text, and data.source: "
                        f"{params.data.source} has none (text/pretrain.jsonl is empty); use a pretrained model "
                        f"or data.source: embedded|hub")
    tokenizer = train_tokenizer(train_texts, b.vocab_size)
    model = build_model(b, tokenizer, params.seed)
    untrained = perplexity(model, tokenizer, val_texts, e.perplexity.seq_len, e.perplexity.max_windows,
                           e.batch_size)
    untrained.pop("window_nll")
    stats = pretrain(model, tokenizer, train_texts, b, params.seed, progress=ctx.progress)
    folder = ctx.out / MODEL_DIR
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    ref = {"source": "builtin", "path": MODEL_DIR, "revision": None}
    return ref, {"untrained_ppl": untrained, "pretrain": stats, "vocab_size": len(tokenizer)}


def build_base_model(params: Params, ctx: StageContext) -> dict:
    """The stage function (module docstring). Returns the summary."""
    from coalora.model import load_base
    from coalora.model.load import load_model, looks_local

    m = params.model
    data_dir = ctx.input("data")
    val_texts = _texts(data_dir, "c4_validation")
    extra: dict = {}
    if m.name_or_path == BUILTIN_MODEL:
        ref, extra = _builtin(params, ctx, data_dir, val_texts)
        write_json(ctx.out / "base.json", ref)
        model, tokenizer = load_base(ctx.out, m.dtype)     # evaluate what later stages will load
    else:
        model, tokenizer = load_model(m.name_or_path, m.revision, m.dtype)
        local = looks_local(m.name_or_path)
        ref = {"source": "local" if local else "hub",
               "path": str(Path(m.name_or_path).expanduser().resolve()) if local else m.name_or_path,
               "revision": None if local else m.revision}
        write_json(ctx.out / "base.json", ref)
    ppl, bench = _evaluate(model, tokenizer, params, ctx, val_texts)

    summary = {
        "base": ref,
        "dtype": m.dtype,
        "n_params": count_params(model),
        "perplexity": ppl,
        "benchmarks": bench,
        **extra,
    }
    write_json(ctx.out / METRICS, flat_metrics(summary))
    return summary


def flat_metrics(summary: dict) -> dict[str, float | int | str]:
    """The summary's numbers as one flat mapping (``dvc metrics show``)."""
    flat: dict[str, float | int | str] = {
        "n_params": summary["n_params"]["total"],
        "n_params_block_linear": summary["n_params"]["block_linear"],
        "ppl": round(summary["perplexity"]["ppl"], 4),
        "ppl_protocol": summary["perplexity"]["protocol"],
    }
    if "untrained_ppl" in summary:
        flat["ppl_untrained"] = round(summary["untrained_ppl"]["ppl"], 4)
        flat["pretrain_final_loss"] = summary["pretrain"]["final_loss"]
        flat["pretrain_seconds"] = summary["pretrain"]["seconds"]
    for task, scores in summary["benchmarks"].items():
        flat[f"{task}_acc"] = round(scores["acc"], 4)
        if scores["acc_norm"] is not None:
            flat[f"{task}_acc_norm"] = round(scores["acc_norm"], 4)
        flat[f"{task}_chance"] = scores["chance"]
        flat[f"{task}_n"] = scores["n"]
    return flat


STAGE = Stage(
    name="base_model",
    fn=build_base_model,
    params=("seed", "model", "eval"),
    deps=("data",),
    metrics=(METRICS,),
    description="the full-precision base model (built-in: tokenizer + pretrained small Llama), with its "
                "validation perplexity and zero-shot accuracy",
)
