"""Sacrifice rate: retain-side loss per unit of forget-side drop, both measured from the target model.

GUARD (Niu et al. 2025, "GUARD: Guided Unlearning and Retention via Data Attribution for Large
Language Models", arXiv 2506.10946) reports how much retain-set utility a method gives up for what
it forgets. Its exact formula is not public; this project defines, for each metric m:

    sacrifice_m = (m_retain(target) - m_retain(unlearned)) / (m_forget(target) - m_forget(unlearned))

i.e. the retain drop divided by the forget drop, both relative to the target (pre-unlearning) model.
Lower is better; 0 means nothing lost on retain; a negative value means retain improved. When the
forget drop is at most ``eps`` (default 1e-6) the method did not lower m on the forget set, there
is no trade-off to measure, and the rate is None ("undefined"), whatever the retain side did.

Every m is a per-sample mean from ``eval.json`` in which higher means "the model knows the answer",
the same quantity on both sets so that each drop means the same thing:

- ``probability``: mean P~(answer | question) (length-normalised, ``per_sample.probability``).
- ``rouge``: mean ROUGE-L recall of the greedy answer (``per_sample.rouge``).
- ``truth_ratio``: mean over samples of max(0, 1 - R), R = P~pert / P~base (``per_sample.truth_ratio_raw``).
  This is TOFU's retain aggregate. TOFU's forget aggregate, mean(min(R, 1/R)), is not used: it
  rises towards 1 as the model stops preferring the true answer and falls again if the model comes
  to prefer wrong answers, so its change is not a drop in knowledge. max(0, 1 - R) falls
  monotonically as the true answer loses its lead over the perturbed ones, on both sets.

The retain side is the ``retain`` set by default (``retain_set=`` picks another evaluated set; on
real_authors / world_facts the probability is TOFU's normalised one, as stored in eval.json).
"""

from __future__ import annotations

import math
from typing import Any

METRICS = ("probability", "rouge", "truth_ratio")


def _mean(values: list[float], where: str) -> float:
    if not values:
        raise ValueError(f"{where}: no per-sample values")
    out = math.fsum(float(v) for v in values) / len(values)
    if not math.isfinite(out):
        raise ValueError(f"{where}: the per-sample values are not finite")
    return out


def knowledge(eval_result: dict[str, Any], set_name: str, metric: str, label: str = "eval") -> float | None:
    """The per-sample mean of ``metric`` on ``set_name`` as defined above; None if the set has no
    truth ratios (truth_ratio only)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    try:
        per_sample = eval_result["sets"][set_name]["per_sample"]
    except (KeyError, TypeError):
        raise ValueError(f"{label}: no per-sample results for the '{set_name}' set") from None
    where = f"{label}, set '{set_name}', {metric}"
    if metric != "truth_ratio":
        if metric not in per_sample:
            raise ValueError(f"{where}: missing from per_sample")
        return _mean(per_sample[metric], where)
    ratios = per_sample.get("truth_ratio_raw")
    if ratios is None:
        return None
    if any(r is None or math.isnan(float(r)) for r in ratios):
        raise ValueError(f"{where}: truth_ratio_raw holds a missing or NaN value")
    return _mean([max(0.0, 1.0 - float(r)) for r in ratios], where)


def metric_drops(target_eval: dict[str, Any], unlearned_eval: dict[str, Any], retain_set: str = "retain",
                 forget_set: str = "forget") -> dict[str, dict[str, float] | None]:
    """``{metric: {"retain": drop, "forget": drop}}``, each drop = target value - unlearned value;
    None for a metric one of the evaluations lacks (truth ratio on a set without perturbed answers)."""
    for name in (retain_set, forget_set):
        n_t = _n(target_eval, name, "target")
        n_u = _n(unlearned_eval, name, "unlearned")
        if n_t != n_u:
            raise ValueError(f"the '{name}' set has {n_t} samples in the target evaluation but {n_u} in the "
                             "unlearned one: evaluate both models on the same sets")
    out: dict[str, dict[str, float] | None] = {}
    for metric in METRICS:
        values = {(model, side): knowledge(result, set_name, metric, model)
                  for model, result in (("target", target_eval), ("unlearned", unlearned_eval))
                  for side, set_name in (("retain", retain_set), ("forget", forget_set))}
        known = {key: v for key, v in values.items() if v is not None}
        if len(known) < len(values):
            out[metric] = None
            continue
        out[metric] = {side: known[("target", side)] - known[("unlearned", side)] for side in ("retain", "forget")}
    return out


def _n(result: dict[str, Any], name: str, label: str) -> int:
    try:
        return len(result["sets"][name]["per_sample"]["probability"])
    except (KeyError, TypeError):
        raise ValueError(f"{label}: no per-sample results for the '{name}' set") from None


def sacrifice_rates(target_eval: dict[str, Any], unlearned_eval: dict[str, Any], retain_set: str = "retain",
                    forget_set: str = "forget", eps: float = 1e-6) -> dict[str, float | None]:
    """``{"probability": rate, "rouge": rate, "truth_ratio": rate}``: retain drop / forget drop, None
    where the forget drop is <= ``eps`` or the metric is missing. See the module docstring."""
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    rates: dict[str, float | None] = {}
    for metric, drop in metric_drops(target_eval, unlearned_eval, retain_set, forget_set).items():
        rates[metric] = None if drop is None or drop["forget"] <= eps else drop["retain"] / drop["forget"]
    return rates
