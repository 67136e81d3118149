"""The verdict on an unlearned model: one set of criteria, measured one way, judged one way.

Both the pipeline (``metrics.json``'s ``verdict``, the demo's "forgotten / utility kept" line) and
``certify`` (audit records) judge here. Every criterion reads a model's flat summary rows
(``metrics.json``'s ``models``: target / oracle / unlearned) and, for relearning, the attack's
summary; :class:`Thresholds` says which criteria are asked and where their limits are (``None``:
not asked), and :func:`judge` gives pass / fail / not measured for each.

Criteria (:func:`measure`):

- ``forget_quality``: TOFU forget quality of the unlearned model, the KS-test p-value of its forget
  truth ratios against the oracle's (Maini et al. 2024, arXiv 2401.06121); at least the limit.
- ``forget_rouge_gap``: unlearned forget ROUGE-L minus the oracle's; at most the limit.
- ``utility_ratio``: unlearned model utility / the target's; at least the limit.
- ``utility_drop``: (target utility - unlearned utility) / target utility; at most the limit.
- ``mia_auc``: the membership-inference AUC, forget vs holdout, under ``mia_key`` (default Min-K%
  40); within the range.
- ``privleak``: MUSE PrivLeak against the oracle (Shi et al. 2024, arXiv 2407.06460); |value| at most.
- ``relearn_recovery``: what the relearning attack brings back; at most the limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

PASS, FAIL, NOT_MEASURED = "pass", "fail", "not measured"

# Criterion -> (Thresholds field holding its limit, operator).
CRITERIA: dict[str, tuple[str, str]] = {
    "forget_quality": ("min_forget_quality", ">="),
    "forget_rouge_gap": ("max_forget_rouge_gap", "<="),
    "utility_ratio": ("min_utility_ratio", ">="),
    "mia_auc": ("mia_auc_range", "within"),
    "privleak": ("max_abs_privleak", "abs<="),
    "relearn_recovery": ("max_relearn_recovery", "<="),
    "utility_drop": ("max_utility_drop", "<="),
}
FORGET_CRITERIA = ("forget_quality", "forget_rouge_gap")  # the pipeline's "forgotten"
UTILITY_CRITERIA = ("utility_ratio",)  # the pipeline's "utility kept"


@dataclass(frozen=True)
class Thresholds:
    """What a deletion must achieve; ``None`` leaves a criterion out (see the module docstring).

    ``label`` is the summary row of the unlearned model, ``mia_key`` the row key of the AUC that
    ``mia_auc_range`` judges (default ``mia_auc_mink``, the pipeline's Min-K% 40 AUC).
    """

    min_forget_quality: float | None = None
    max_forget_rouge_gap: float | None = None
    min_utility_ratio: float | None = None
    mia_auc_range: tuple[float, float] | None = None
    max_abs_privleak: float | None = None
    max_relearn_recovery: float | None = None
    max_utility_drop: float | None = None
    label: str = "unlearned"
    mia_key: str = "mia_auc_mink"

    def checks(self) -> list[tuple[str, str, Any]]:
        """(criterion, operator, limit) for every criterion that is asked, in :data:`CRITERIA` order."""
        out = []
        for name, (attr, op) in CRITERIA.items():
            limit = getattr(self, attr)
            if limit is not None:
                out.append((name, op, list(limit) if op == "within" else limit))
        return out

    def limits(self) -> dict[str, Any]:
        """The limits that are set, by field name (what a verdict records as its thresholds)."""
        names = {attr for attr, _ in CRITERIA.values()}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in names and getattr(self, f.name) is not None}


# The pipeline's verdict: forget quality >= 0.05 (no evidence at 5% that the unlearned model's
# truth ratios differ from the oracle's), forget ROUGE at most 0.1 above the oracle's, and at
# least 90% of the target's model utility.
PIPELINE_THRESHOLDS = Thresholds(min_forget_quality=0.05, max_forget_rouge_gap=0.1, min_utility_ratio=0.9)


def judge(op: str, value: Any, threshold: Any) -> str:
    """pass / fail / not measured for one criterion."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_MEASURED
    if op == "==":
        ok = value == threshold
    elif op == ">=":
        ok = value >= threshold
    elif op == "<=":
        ok = value <= threshold
    elif op == "abs<=":
        ok = abs(value) <= threshold
    elif op == "within":
        ok = threshold[0] <= value <= threshold[1]
    else:
        raise ValueError(f"unknown operator '{op}'")
    return PASS if ok else FAIL


def overall_verdict(checks: Sequence[Mapping[str, Any]], gaps: Sequence[str]) -> str:
    """fail if any check fails; incomplete if a check is unmeasured or evidence is missing (``gaps``,
    which include "no thresholds given"); pass otherwise."""
    verdicts = [c["verdict"] for c in checks]
    if FAIL in verdicts:
        return FAIL
    if NOT_MEASURED in verdicts or gaps:
        return "incomplete"
    return PASS


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def measure(models: Mapping[str, Mapping[str, Any]], relearn: Mapping[str, Any] | None = None,
            label: str = "unlearned", mia_key: str = "mia_auc_mink") -> dict[str, Any]:
    """Every criterion's value (None where the rows lack what it needs), and ``target_memorised``:
    whether the target's forget ROUGE-L is above the oracle's (None without both).

    ``models``: label -> flat summary row; ``relearn``: ``attacks/relearn.json`` (its ``summary``).
    """
    row, target, oracle = models.get(label) or {}, models.get("target") or {}, models.get("oracle") or {}
    mu, mu0 = _num(row.get("model_utility")), _num(target.get("model_utility"))
    rouge, rouge_oracle, rouge_target = (_num(r.get("forget_rouge")) for r in (row, oracle, target))
    return {
        "forget_quality": _num(row.get("forget_quality")),
        "forget_rouge_gap": rouge - rouge_oracle if rouge is not None and rouge_oracle is not None else None,
        "utility_ratio": mu / mu0 if mu is not None and mu0 else None,
        "mia_auc": _num(row.get(mia_key)),
        "privleak": _num(row.get("privleak")),
        "relearn_recovery": _num(((relearn or {}).get("summary") or {}).get("recovery")),
        "utility_drop": (mu0 - mu) / mu0 if mu is not None and mu0 else None,
        "target_memorised": rouge_target > rouge_oracle if rouge_target is not None and rouge_oracle is not None
        else None,
    }


def run_checks(thresholds: Thresholds, measured: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One ``{"name", "op", "threshold", "value", "verdict"}`` per asked criterion."""
    return [{"name": name, "op": op, "threshold": limit, "value": measured[name],
             "verdict": judge(op, measured[name], limit)} for name, op, limit in thresholds.checks()]


def _all_pass(checks: list[dict[str, Any]], names: tuple[str, ...]) -> bool:
    asked = [c for c in checks if c["name"] in names]
    return bool(asked) and all(c["verdict"] == PASS for c in asked)


def pipeline_verdict(rows: Mapping[str, Mapping[str, Any]],
                     thresholds: Thresholds = PIPELINE_THRESHOLDS) -> dict[str, Any]:
    """``metrics.json``'s verdict from the target, oracle and unlearned summary rows: "forgotten"
    when every asked forget criterion passes (forget quality, ROUGE gap to the oracle), "utility
    kept" when the utility ratio to the target passes, the values they were judged on, the limits,
    and whether the target memorised the forget set at all (else unlearning is not meaningful)."""
    measured = measure(rows, label=thresholds.label, mia_key=thresholds.mia_key)
    checks = run_checks(thresholds, measured)
    gap, ratio = measured["forget_rouge_gap"], measured["utility_ratio"]
    return {
        "forgotten": _all_pass(checks, FORGET_CRITERIA),
        "utility_kept": _all_pass(checks, UTILITY_CRITERIA),
        "forget_quality": rows[thresholds.label].get("forget_quality"),
        "forget_rouge_gap_to_oracle": None if gap is None else round(gap, 4),
        "utility_ratio_to_target": None if ratio is None else round(ratio, 4),
        "thresholds": thresholds.limits(),
        "target_memorised": bool(measured["target_memorised"]),
    }
