"""The claims table (``report/claims.json``): the paper's claims, tested on this run, with a verdict each.

Each claim is an object ``{claim, metric, ours, ci_low, ci_high, paper, verdict, rule}`` (plus ``configs``
where useful); ``verdict`` ∈ {holds, does not hold, inconclusive} follows from the interval and the margins
of ``report.claims`` by one of three rules, on a difference d where larger means "A better" (δ the margin):

    equivalence  "A ≈ B":  holds if the interval ⊂ [−δ, δ] or lies above 0 (A at least as good); does not
                 hold if it lies entirely below −δ; else inconclusive
    superiority  "A > B":  holds if the interval lies above 0; does not hold if it lies entirely below δ (any
                 gain is smaller than the margin); else inconclusive
    at most      "d ≤ δ":  holds if the interval's top ≤ δ; does not hold if its bottom > δ; else inconclusive

A perplexity ratio A/B is judged on d = −ln(ratio) (so "A better" is again d > 0) with margin ln(δ).

The claims (METHOD.md §7): (i) coalora ≈ the per-config methods at the targets; (ii) coalora > shared;
(iii) unseen within 1% accuracy / 2% perplexity of seen; (iv) the search beats the frozen and the random
pools; (v) serving K = 6 configurations costs coalora a fraction of the per-config methods.
"""

from __future__ import annotations

import math
from typing import Sequence

VERDICTS = ("holds", "does not hold", "inconclusive")
KEYS = ("claim", "metric", "ours", "ci_low", "ci_high", "paper", "verdict")
PAPER = {
    "qlora": "+4.34 pts vs QLoRA (RoBERTa-large, QNLI, Table 2)",
    "lqlora": "+1.45 pts vs LQ-LoRA (Qwen2.5-3B, 8 zero-shot tasks)",
    "shared": "HV 0.62 vs 0.60 (QNLI), 0.67 vs 0.61 (SST-2), Table 2",
    "ablation": "about +2 pts (QNLI, SST-2)",
    "cost": "≈ 0.48 (2.6–3.2× one run vs 6 runs, Table 2)",
}


def equivalence(low: float, high: float, margin: float) -> str:
    if (-margin <= low and high <= margin) or low > 0:
        return "holds"
    return "does not hold" if high < -margin else "inconclusive"


def superiority(low: float, high: float, margin: float) -> str:
    if low > 0:
        return "holds"
    return "does not hold" if high < margin else "inconclusive"


def at_most(low: float, high: float, margin: float) -> str:
    if high <= margin:
        return "holds"
    return "does not hold" if low > margin else "inconclusive"


RULES = {"equivalence": equivalence, "superiority": superiority, "at most": at_most}


def claim(text: str, metric: str, iv: dict, paper: str, rule: str, margin: float, **extra) -> dict:
    """One entry from an interval (``value``, ``ci_low``, ``ci_high``) of a difference (larger = A better)."""
    return {"claim": text, "metric": metric, "ours": iv["value"], "ci_low": iv["ci_low"], "ci_high": iv["ci_high"],
            "paper": paper, "verdict": RULES[rule](iv["ci_low"], iv["ci_high"], margin),
            "rule": f"{rule}, margin {margin:g}", **extra}


def ratio_claim(text: str, metric: str, iv: dict, paper: str, rule: str, margin: float, **extra) -> dict:
    """One entry from an interval of a perplexity ratio A/B, judged on −ln(ratio) against ln(margin)
    (``at most`` judges the ratio itself against the margin)."""
    if rule == "at most":
        verdict = at_most(iv["ci_low"], iv["ci_high"], margin)
    else:
        verdict = RULES[rule](-math.log(iv["ci_high"]), -math.log(iv["ci_low"]), math.log(margin))
    return {"claim": text, "metric": metric, "ours": iv["value"], "ci_low": iv["ci_low"], "ci_high": iv["ci_high"],
            "paper": paper, "verdict": verdict, "rule": f"{rule}, ratio margin {margin:g}", **extra}


def build_claims(summary: dict, c, serve_k: int, steps_per_config: int) -> list[dict]:
    """Every claim (module docstring) from the report's summary.

    Args:
        summary: ``summary.summarise`` output (``coalora_vs``, ``seen_unseen``, ``compute``).
        c: ``ClaimsParams``.
        serve_k: K.
        steps_per_config: config-steps of one per-config run.
    """
    vs = summary.get("coalora_vs", {})
    out = []
    for base in ("qlora", "lqlora"):
        if (t := vs.get(base, {}).get("target")) is not None:
            out.append(claim(f"(i) coalora ≈ {base} at the target configurations", f"mean accuracy gap coalora − "
                             f"{base} at the targets (points)", t["acc_points"], PAPER[base], "equivalence",
                             c.equivalence_points, configs=t["configs"]))
            out.append(ratio_claim(f"(i) coalora ≈ {base} at the target configurations (perplexity)",
                                   f"perplexity ratio coalora / {base} at the targets", t["ppl_ratio"],
                                   "not reported", "equivalence", c.equivalence_ppl_ratio, configs=t["configs"]))
    quality = [x["verdict"] for x in out]
    if (a := vs.get("shared", {}).get("all")) is not None:
        out.append(claim("(ii) coalora > shared", "mean accuracy gap coalora − shared over the target and unseen "
                         "configs (points)", a["acc_points"], PAPER["shared"], "superiority", c.superiority_points,
                         configs=a["configs"]))
    if (su := summary["seen_unseen"].get("coalora")) is not None:
        out.append(claim("(iii) unseen within 1% accuracy of seen", "coalora's gain over the quantized base at "
                         "its drawn targets minus at the unseen configs (points)", su["acc_points"],
                         "not measured (the referee's question)", "at most", c.unseen_points))
        out.append(ratio_claim("(iii) unseen within 2% perplexity of seen", "coalora's perplexity ratio to the "
                               "quantized base, unseen configs / drawn targets", su["ppl_ratio"],
                               "not measured (the referee's question)", "at most", c.unseen_ppl_ratio))
    for ablation in ("coalora-frozen", "coalora-random"):
        if (a := vs.get(ablation, {}).get("all")) is not None:
            out.append(claim(f"(iv) the search beats the {ablation.split('-')[1]} pool", f"mean accuracy gap "
                             f"coalora − {ablation} over the target and unseen configs (points)", a["acc_points"],
                             PAPER["ablation"], "superiority", c.superiority_points, configs=a["configs"]))
    if (compute := summary["compute"].get("coalora")) is not None:
        out.append(cost_claim(compute["config_steps"], serve_k, steps_per_config, quality))
    return out


def cost_claim(config_steps: int, serve_k: int, steps_per_config: int, quality: Sequence[str]) -> dict:
    """(v): coalora's config-steps over K per-config runs' (an exact count: the interval is the value). It
    holds when the ratio is below 1 AND coalora matches the per-config methods at this compute (claim (i))."""
    ratio = config_steps / (serve_k * steps_per_config)
    if ratio >= 1 or "does not hold" in quality:
        verdict = "does not hold"
    elif quality and all(v == "holds" for v in quality):
        verdict = "holds"
    else:
        verdict = "inconclusive"
    return {"claim": f"(v) serving K = {serve_k} configurations costs coalora a fraction of the per-config methods",
            "metric": f"config-steps of coalora / ({serve_k} × one per-config run) at this run's compute",
            "ours": round(ratio, 6), "ci_low": round(ratio, 6), "ci_high": round(ratio, 6), "paper": PAPER["cost"],
            "verdict": verdict, "rule": "holds if < 1 and claim (i) holds at this compute; the compute study "
                                        "(`coalora study compute`) finds the smallest compute where it does"}


def check_claims(claims: Sequence[dict]) -> None:
    """Raise ValueError unless every claim has the schema's keys, numbers and a known verdict."""
    for i, c in enumerate(claims):
        missing = [k for k in KEYS if k not in c]
        if missing:
            raise ValueError(f"claim {i}: missing keys {missing}")
        if c["verdict"] not in VERDICTS:
            raise ValueError(f"claim {i}: verdict {c['verdict']!r} not in {VERDICTS}")
        if not all(isinstance(c[k], (int, float)) and math.isfinite(c[k]) for k in ("ours", "ci_low", "ci_high")):
            raise ValueError(f"claim {i}: ours, ci_low, ci_high must be finite numbers")
        if not isinstance(c["claim"], str) or not isinstance(c["metric"], str) or not isinstance(c["paper"], str):
            raise ValueError(f"claim {i}: claim, metric and paper must be text")
