"""Studies beside the pipeline: the compute study and the seeds study (``coalora study compute|seeds``).

A study runs the train, evaluate and report stages again under changed parameters, over the pipeline's OWN
data, base model, calibration and pool. Each variant is a project folder of its own,

    artifacts/studies/<study>/<variant>/params.yaml          the resolved params with the study's overrides
    artifacts/studies/<study>/<variant>/artifacts/<stage>    data, base_model, calibrate, allocate: links to the
                                                            pipeline's outputs; train, evaluate, report: its own

so its stages are ordinary, cached and resumable stages (``coalora.stages.run_stage``): an interrupted study
resumes, a finished variant is not recomputed. What a study concludes is written beside its variants:
``summary.json`` and ``report.md``.

Compute study (``study.compute``: multipliers m): coalora alone, trained with ``train.joint_compute = m`` and
scored at the target configs; against the pipeline's per-config baseline (``report.baseline``, trained at its
default) on the same items and windows (one bootstrap over both evaluations). Equal quality at m: coalora's
mean accuracy over the targets is not below the baseline's interval, and its perplexity not above it (its
metrics lie within — or beyond, on the better side — the per-config method's confidence interval); the
stricter paired test (the gap's own interval reaches 0) is reported beside it. The cost to serve K =
``report.serve_k`` configurations at equal quality is the smallest such m's config-steps over K per-config
runs (the paper: ≈ 0.48).

Seeds study (``study.seeds``): every method, trained with ``train.seed = s`` for each s, evaluated and
reported; every claim as the mean over seeds with a t interval over seeds (and each seed's own verdict).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from pathlib import Path
from typing import Sequence

from coalora.artifacts import ARTIFACTS, read_json, write_json, write_text_atomic
from coalora.errors import UserError
from coalora.params import Params, deep_merge, dump_params, validate
from coalora.trained import read_record

log = logging.getLogger("coalora.study")

STUDIES = ("compute", "seeds")
SHARED = ("data", "base_model", "calibrate", "allocate")  # the pipeline's outputs every variant reads
OWN = ("train", "evaluate", "report")


def study_dir(root: Path, study: str) -> Path:
    return Path(root) / ARTIFACTS / "studies" / study


def prepare_variant(root: Path, study: str, variant: str, params: Params, overrides: dict) -> tuple[Path, Params]:
    """The variant's folder with its params.yaml and links to the pipeline's shared outputs."""
    folder = study_dir(root, study) / variant
    resolved = validate(deep_merge(params.model_dump(mode="json"), overrides), f"study {study} {variant}")
    (folder / ARTIFACTS).mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "params.yaml", dump_params(resolved))
    for stage in SHARED:
        link, target = folder / ARTIFACTS / stage, (Path(root) / ARTIFACTS / stage).resolve()
        if link.is_symlink() and os.readlink(link) != str(target):
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    return folder, resolved


def run_variant(folder: Path, params: Params, progress: bool) -> None:
    """Train, evaluate and report in the variant folder (each stage cached and resumable)."""
    from coalora.stages import get_stage, run_stage

    for stage in OWN:
        log.info("study %s: stage %s", folder.name, stage)
        run_stage(get_stage(stage), params, folder, progress=progress)


def pipeline_upstream(root: Path, params: Params, stages: Sequence[str], progress: bool) -> None:
    """The pipeline's own stages the study reads, brought up to date first (cached when they are)."""
    from coalora.stages import get_stage, run_stage

    for stage in stages:
        run_stage(get_stage(stage), params, root, progress=progress)


# ---------------------------------------------------------------------------------------------------------
# Compute study
# ---------------------------------------------------------------------------------------------------------

def _merged_stats(folders: dict[str, Path], params: Params):
    """One ``Stats`` over several evaluations of the same items: rows and job ids prefixed by their source."""
    from coalora.evaluate.bootstrap import Resampler
    from coalora.evaluate.items import FILE, read_items
    from coalora.evaluate.statistics import Stats
    from coalora.evaluate.table import read_table

    rows, items, tokens = [], {}, set()
    for prefix, folder in folders.items():
        table = read_table(folder / ARTIFACTS / "evaluate")
        found, meta = read_items(folder / ARTIFACTS / "evaluate" / FILE)
        tokens.add(meta["tokens_per_window"])
        for row in table["rows"]:
            rows.append({**row, "job": f"{prefix}/{row['job']}", "method": f"{prefix}/{row['method']}"})
            items[f"{prefix}/{row['job']}"] = found[row["job"]]
    if len(tokens) != 1:
        raise UserError(f"study: the evaluations were scored with different perplexity windows {sorted(tokens)}")
    b = params.report.bootstrap
    return Stats(rows, Resampler(items, params.eval.tasks, tokens.pop(), b.resamples, b.seed), b.confidence)


def compute_study(root: Path, params: Params, progress: bool = True) -> dict:
    """Run the compute study (module docstring); writes ``summary.json`` and ``report.md``; returns the summary."""
    from coalora.evaluate.statistics import interval_of

    base, p = params.report.baseline, params.train
    if base not in p.methods:
        raise UserError(f"report.baseline: {base} is not in train.methods {p.methods}; the compute study "
                        f"compares coalora against it")
    pipeline_upstream(root, params, (*SHARED, "train", "evaluate"), progress)
    folders = {"pipeline": Path(root)}
    for m in params.study.compute:
        folder, resolved = prepare_variant(root, "compute", f"x{m:g}", params, {
            "train": {"methods": ["coalora"], "joint_compute": m}, "evaluate": {"sets": ["target"]}})
        run_variant(folder, resolved, progress)
        folders[f"x{m:g}"] = folder
    stats = _merged_stats(folders, params)
    targets = stats.configs(f"pipeline/{base}", ("target",))
    k, per_run = params.report.serve_k, p.steps_per_config
    baseline = {metric: stats.interval(mean_over(stats, f"pipeline/{base}", targets, metric))
                for metric in ("acc_mean", "nll")}
    rows = []
    for m in params.study.compute:
        name = f"x{m:g}/coalora"
        record = read_record(folders[f"x{m:g}"] / ARTIFACTS / "train", "coalora")
        acc = interval_of(stats, stats.gap(name, f"pipeline/{base}"))
        ppl = interval_of(stats, stats.ppl_ratio(name, f"pipeline/{base}"), 1.0)
        ours = {metric: float(mean_over(stats, name, targets, metric)[0]) for metric in ("acc_mean", "nll")}
        within = ours["acc_mean"] >= baseline["acc_mean"].low and ours["nll"] <= baseline["nll"].high
        rows.append({"multiplier": m, "config_steps": record["config_steps"], "seconds": record["seconds"],
                     "acc_mean": ours["acc_mean"], "ppl": math.exp(ours["nll"]), "acc_gap_points": acc,
                     "ppl_ratio": ppl, "equal_quality": within,
                     "not_significantly_worse": acc["ci_high"] >= 0 and ppl["ci_low"] <= 1,
                     "serve_cost_ratio": record["config_steps"] / (k * per_run)})
    qualified = [r for r in rows if r["equal_quality"]]
    summary = {"baseline": base, "targets": len(targets), "serve_k": k, "steps_per_config": per_run,
               "baseline_interval": {"acc_mean": baseline["acc_mean"].to_dict(),
                                     "ppl": {key: math.exp(v) for key, v in baseline["nll"].to_dict().items()}},
               "baseline_config_steps_per_run": per_run, "rows": rows,
               "equal_quality_cost_ratio": min((r["serve_cost_ratio"] for r in qualified), default=None),
               "confidence": params.report.bootstrap.confidence, "resamples": params.report.bootstrap.resamples}
    write_json(study_dir(root, "compute") / "summary.json", summary)
    write_text_atomic(study_dir(root, "compute") / "report.md", compute_markdown(summary))
    return summary


def mean_over(stats, method: str, configs: Sequence[str], metric: str):
    """(B + 1,) the method's ``metric`` averaged over ``configs`` (nll: the mean per-token NLL)."""
    import numpy as np

    return np.mean([stats.stat(method, c, metric) for c in configs], axis=0)


def compute_markdown(s: dict) -> str:
    from coalora.evaluate.render import _ci, _table

    lines = [[f"{r['multiplier']:g}×", r["config_steps"], round(r["seconds"], 1), f"{r['acc_mean']:.4f}",
              f"{r['ppl']:.4f}", _ci(r["acc_gap_points"], 2), _ci(r["ppl_ratio"]),
              "yes" if r["equal_quality"] else "no", "yes" if r["not_significantly_worse"] else "no",
              f"{r['serve_cost_ratio']:.3f}"] for r in s["rows"]]
    b = s["baseline_interval"]
    result = s["equal_quality_cost_ratio"]
    verdict = (f"**{result:.3f}**: coalora's smallest compute at equal quality, over {s['serve_k']} per-config runs "
               f"(the paper: ≈ 0.48; our goal: ≤ 0.25)" if result is not None else
               "**not reached**: at no multiplier was coalora within the interval of the per-config method")
    return "\n".join([
        "# Compute study: coalora at fractions of the equal-compute budget", "",
        f"coalora trained with `train.joint_compute` = m × (the {s['steps_per_config']} × {s['targets']} config-steps "
        f"one per-config method spends over the {s['targets']} targets), scored at the targets against "
        f"`{s['baseline']}` (trained at its default): mean accuracy {b['acc_mean']['value']:.4f} "
        f"[{b['acc_mean']['ci_low']:.4f}, {b['acc_mean']['ci_high']:.4f}], perplexity {b['ppl']['value']:.4f} "
        f"[{b['ppl']['ci_low']:.4f}, {b['ppl']['ci_high']:.4f}] ({s['confidence']:.0%} bootstrap intervals, "
        f"{s['resamples']} resamples). Equal quality: coalora's accuracy not below, and perplexity not above, "
        f"that interval; the paired test (the gap's interval reaches 0) beside it.", "",
        _table(["m", "config-steps", "train s", "acc_mean", "ppl", f"acc gap vs {s['baseline']} (pts)",
                f"ppl ratio vs {s['baseline']}", "equal quality", "not significantly worse (paired)",
                f"cost to serve K={s['serve_k']} / K per-config runs"], lines), "",
        f"Cost to serve K = {s['serve_k']} configurations at equal quality: {verdict}.", ""])


# ---------------------------------------------------------------------------------------------------------
# Seeds study
# ---------------------------------------------------------------------------------------------------------

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def over_seeds(values: Sequence[float]) -> dict:
    """Mean and 95% t interval over seeds (Student's t with n − 1 degrees of freedom)."""
    n, mean = len(values), statistics.fmean(values)
    half = T_975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n) if n > 1 else math.inf
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def seeds_study(root: Path, params: Params, progress: bool = True) -> dict:
    """Run the seeds study (module docstring); writes ``summary.json`` and ``report.md``; returns the summary."""
    pipeline_upstream(root, params, SHARED, progress)
    per_seed = {}
    for seed in params.study.seeds:
        folder, resolved = prepare_variant(root, "seeds", f"seed-{seed}", params, {"train": {"seed": seed}})
        run_variant(folder, resolved, progress)
        per_seed[seed] = read_json(folder / ARTIFACTS / "report" / "claims.json")
    claims = []
    for i, first in enumerate(per_seed[params.study.seeds[0]]):
        entries = [per_seed[s][i] for s in params.study.seeds]
        claims.append({"claim": first["claim"], "metric": first["metric"], "paper": first["paper"],
                       "over_seeds": over_seeds([e["ours"] for e in entries]),
                       "per_seed": {str(s): {k: e[k] for k in ("ours", "ci_low", "ci_high", "verdict")}
                                    for s, e in zip(params.study.seeds, entries)}})
    summary = {"seeds": list(params.study.seeds), "claims": claims}
    write_json(study_dir(root, "seeds") / "summary.json", summary)
    write_text_atomic(study_dir(root, "seeds") / "report.md", seeds_markdown(summary))
    return summary


def seeds_markdown(s: dict) -> str:
    from coalora.evaluate.render import _table

    lines = []
    for c in s["claims"]:
        o = c["over_seeds"]
        verdicts = ", ".join(f"{seed}: {v['verdict']}" for seed, v in c["per_seed"].items())
        lines.append([c["claim"], c["metric"], f"{o['mean']:.4g} [{o['ci_low']:.4g}, {o['ci_high']:.4g}]",
                      " / ".join(f"{v['ours']:.4g}" for v in c["per_seed"].values()), verdicts])
    return "\n".join([
        f"# Seeds study: every claim over training seeds {s['seeds']}", "",
        "The same data, base model and pool; every method trained, evaluated and reported once per training seed "
        "(`train.seed`). Mean over seeds with a 95% t interval over seeds; each seed's own value and verdict "
        "(from its paired bootstrap interval).", "",
        _table(["claim", "metric", "mean over seeds [95% t CI]", "per seed", "verdict per seed"], lines), ""])


def run_study(root: Path, params: Params, study: str, progress: bool = True) -> dict:
    """Dispatch ``coalora study NAME``."""
    if study not in STUDIES:
        raise UserError(f"study: unknown study {study!r}; allowed: {', '.join(STUDIES)}")
    return (compute_study if study == "compute" else seeds_study)(Path(root), params, progress)
