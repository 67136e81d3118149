"""The verdict on an unlearned model: does it treat the forget set like data it never saw?

One module judges for the pipeline (``metrics.json``'s ``verdict``, the demo's table), ``certify``
(audit records, rechecked by ``verify``), the report, and training-time checks. A record is forgotten
when the model treats it like a **holdout** record (same kind, never trained on): not better
(``under-unlearned``: the forget set still looks like training data), not worse (``over-unlearned``:
it looks *less* likely than never-seen data, which tells an attacker what was deleted), and not after
a little relearning either. No oracle (a model retrained without the data) is needed; with one, TOFU
forget quality and PrivLeak are added as further criteria.

Every criterion is a :class:`Criterion`: a statistic of per-sample values, its uncertainty (a
bootstrap interval or a test p-value: forget sets are small), the evidence file it came from, and a
call, one of ``under-unlearned`` / ``indistinguishable`` / ``over-unlearned`` / ``not measured``.
The call is a pure function of the stored numbers (:func:`judge_fields`), so ``verify`` re-derives it.

Criteria (forget set vs holdout set, on the judged model, unless said otherwise):

- ``membership:<score>``: ROC AUC of the LOSS, zlib, Min-K% and Min-K%++ membership scores, forget
  as members (``evaluation.mia``). Indistinguishable inside a band around 0.5 whose half-width is z
  times the Mann-Whitney null standard deviation of the AUC for these sample sizes (tie-corrected,
  :func:`auc_null_sd`; the band is where the two-sided Mann-Whitney test does not reject), or a user
  band. Above: under-unlearned; below: over-unlearned.
- ``knowledge:truth_ratio`` and ``knowledge:nll``: two-sample Kolmogorov-Smirnov test of the per-sample
  truth ratio (TOFU, Maini et al. 2024, arXiv 2401.06121; needs perturbed answers on both sets) and of
  the per-sample answer NLL; the side of the larger one-sided KS distance says which way (forget
  values lower = the model knows the forget answers better = under-unlearned).
- ``knowledge:rouge``: mean forget ROUGE-L recall minus mean holdout ROUGE-L recall, bootstrap interval;
  above 0 = under-unlearned, below 0 = over-unlearned, interval around 0 = indistinguishable.
- ``durability:relearn``: the relearning attack (Hu et al., ICLR 2025, arXiv 2406.13356) on the judged
  model: mean per-sample gain (fall of the answer NLL) of the held-out forget rows minus the gain the
  same relearning gives holdout rows (the oracle-free control), bootstrap interval; more than the
  control = under-unlearned. NLL rather than ROUGE: relearning restores the answers' shared wording
  for every row, which ROUGE-L recall counts as much as the facts; the attack's ROUGE recovery, its
  holdout control and the oracle baseline are quoted in the criterion's note.
- ``durability:quantise``: the quantisation attack (Zhang et al. 2024, arXiv 2410.16454): change of the
  forget-minus-holdout ROUGE gap from full precision to the lowest bit width; outside +-
  ``quantise_tolerance`` (``quantise.json`` holds aggregates only, so there is no interval).
- ``utility:model_utility``: utility (TOFU's harmonic mean of probability, ROUGE and truth-ratio score
  over the utility sets present) of the judged model over the model before unlearning, paired bootstrap
  over samples; over-unlearned when the whole interval lies below ``1 - utility_tolerance``.
- with an oracle: ``oracle:forget_quality`` (KS test of the forget truth ratios against the oracle's;
  its p-value is TOFU forget quality) and ``oracle:privleak`` (MUSE PrivLeak, Shi et al. 2024, arXiv
  2407.06460, bootstrap interval; positive = over-unlearned).

Multiple criteria: the overall call is ``indistinguishable`` only if every measured criterion is, so
the criteria share one family-wise error rate ``alpha`` by Bonferroni: each statistical criterion is
judged at ``alpha / m`` (``m`` = the measured criteria whose call depends on alpha), and its interval
has level ``1 - alpha / m``. "Indistinguishable" means no evidence of a difference at that level, not
proof of equality: with few rows the band is wide, and the verdict says how wide.

Training-time checks (calibrated stopping) use the log-prob criteria alone: :func:`log_prob_pairs`
(what to score), :func:`log_prob_values` (per-sample values from a model's ``ModelScores``), and
:func:`membership_call` / :func:`knowledge_calls` on them; no generation is needed.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import ks_2samp, norm, rankdata

from obliviate.data.qa import QADataset
from obliviate.evaluation import tofu
from obliviate.evaluation.mia import DEFAULT_K, auc, mia_scores, privleak
from obliviate.evaluation.scores import ModelScores, Pair
from obliviate.runs.registry import find_in_run, read_json_file

Values = Sequence[float] | np.ndarray  # per-sample values, one per row

UNDER, SAME, OVER, NOT_MEASURED = "under-unlearned", "indistinguishable", "over-unlearned", "not measured"
MIXED = "under- and over-unlearned"
CALLS = (UNDER, SAME, OVER, NOT_MEASURED)

# The membership scores judged, as evaluation.mia names them, with the names shown.
MEMBERSHIP_SCORES = {"loss": "LOSS", "zlib": "zlib", "min_k": "Min-K%", "min_k_plus_plus": "Min-K%++"}
UTILITY_SETS = ("retain", "real_authors", "world_facts")
FORGET_GROUPS = ("membership", "knowledge", "durability", "oracle")  # what "forgotten" is judged on


@dataclass(frozen=True)
class Settings:
    """How the verdict judges. ``alpha``: family-wise error rate over the measured criteria
    (Bonferroni); ``auc_band``: a user band (lo, hi) for every membership AUC instead of the one from
    the sample sizes; ``utility_tolerance``: the share of the utility before unlearning that may be
    lost; ``quantise_tolerance``: how far 4-bit rounding may move the forget-minus-holdout ROUGE gap;
    ``n_boot``/``seed``: bootstrap resamples and seed; ``label``/``before``/``oracle``: the judged
    model, the model before unlearning, the oracle (labels of ``eval/<label>.json``)."""

    alpha: float = 0.05
    auc_band: tuple[float, float] | None = None
    utility_tolerance: float = 0.1
    quantise_tolerance: float = 0.05
    n_boot: int = 2000
    seed: int = 0
    label: str = "unlearned"
    before: str = "target"
    oracle: str = "oracle"

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha}")
        if self.auc_band is not None:
            lo, hi = self.auc_band
            if not 0 <= lo <= 0.5 <= hi <= 1:
                raise ValueError(f"the AUC band must contain 0.5 within [0, 1], got [{lo}, {hi}]")
        for name in ("utility_tolerance", "quantise_tolerance"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.n_boot < 100:
            raise ValueError(f"n_boot must be at least 100, got {self.n_boot}")

    def with_model(self, label: str) -> Settings:
        return Settings(**{**asdict(self), "label": label})

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["auc_band"] = None if self.auc_band is None else list(self.auc_band)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Settings:
        """Settings as :meth:`to_json` wrote them (a verdict's ``settings``); defaults for what is missing."""
        known = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        if known.get("auc_band") is not None:
            known["auc_band"] = tuple(known["auc_band"])
        return cls(**known)


# ----------------------------------------------------------------------------------------------
# A criterion and its call


def judge_fields(rule: str, value: float | None, under_if: str, band: Sequence[float | None] | None = None,
                 interval: Values | None = None, p_value: float | None = None,
                 alpha: float | None = None) -> str:
    """The call from a criterion's stored numbers.

    ``rule``: ``band`` (the value against ``band``), ``interval`` (the interval against ``band``:
    wholly above or below it, else inside) or ``test`` (``p_value`` against ``alpha``; when it
    rejects, the sign of ``value`` says the side). A band end of None is unbounded. ``under_if``
    (``above``/``below``): the side that means under-unlearned; the other means over-unlearned.
    """
    if value is None:
        return NOT_MEASURED
    if under_if not in ("above", "below"):
        raise ValueError(f"under_if must be 'above' or 'below', got {under_if!r}")
    if rule == "test":
        if p_value is None or alpha is None:
            raise ValueError("a test criterion needs its p-value and alpha")
        side = "inside" if p_value >= alpha else "above" if value > 0 else "below"
    else:
        if band is None:
            raise ValueError(f"a {rule} criterion needs its band")
        lo, hi = band
        if rule == "band":
            low, high = value, value
        elif rule == "interval":
            if interval is None:
                raise ValueError("an interval criterion needs its interval")
            low, high = interval
        else:
            raise ValueError(f"unknown rule {rule!r}")
        side = "above" if hi is not None and low > hi else "below" if lo is not None and high < lo else "inside"
    if side == "inside":
        return SAME
    return UNDER if side == under_if else OVER


@dataclass(frozen=True)
class Criterion:
    """One criterion of the verdict (see the module doc). ``alpha`` is the level it was judged at
    (None when its call does not depend on it: a user band, a fixed tolerance); ``note`` says in words
    what was compared, or why it was not measured."""

    name: str
    group: str
    statistic: str
    value: float | None
    rule: str = "band"
    under_if: str = "above"
    band: tuple[float | None, float | None] | None = None
    interval: tuple[float, float] | None = None
    p_value: float | None = None
    alpha: float | None = None
    evidence: str | None = None
    note: str = ""
    n: dict[str, int] = field(default_factory=dict)

    @property
    def call(self) -> str:
        return judge_fields(self.rule, self.value, self.under_if, self.band, self.interval, self.p_value, self.alpha)

    @property
    def measured(self) -> bool:
        return self.value is not None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("band", "interval"):
            out[key] = None if out[key] is None else list(out[key])
        out["call"] = self.call
        return out


def not_measured(name: str, group: str, statistic: str, why: str, evidence: str | None = None) -> Criterion:
    return Criterion(name, group, statistic, None, evidence=evidence, note=why)


def rejudge(entry: Mapping[str, Any]) -> str:
    """The call that a stored criterion (:meth:`Criterion.to_json`, an audit ``check``) follows to."""
    return judge_fields(entry.get("rule", ""), entry.get("value"), entry.get("under_if", ""), entry.get("band"),
                        entry.get("interval"), entry.get("p_value"), entry.get("alpha"))


def overall_call(calls: Sequence[str]) -> str:
    """under-unlearned if any criterion is under, over-unlearned if any is over (both: "under- and
    over-unlearned"), indistinguishable only if every measured one is; "not measured" if none is."""
    under, over = UNDER in calls, OVER in calls
    if under and over:
        return MIXED
    if under or over:
        return UNDER if under else OVER
    return SAME if SAME in calls else NOT_MEASURED


# ----------------------------------------------------------------------------------------------
# Statistics: pure functions of per-sample arrays


def _finite(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{what}: no values")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: non-finite values")
    return a


def _rng(seed: int, name: str) -> np.random.Generator:
    # One stream per criterion: a criterion's interval does not depend on which others were computed.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _resample(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, n, size=(n_boot, n))


def percentile_interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile bootstrap interval of ``level`` from the finite resampled statistics."""
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        raise ValueError("no finite bootstrap statistic")
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def auc_null_sd(forget: Values, holdout: Values) -> float:
    """Standard deviation of the AUC (U / (n1 n2)) when forget and holdout come from one distribution:
    sqrt(n1 n2 / 12 * ((N + 1) - sum(t^3 - t) / (N (N - 1)))) / (n1 n2), N = n1 + n2, t the sizes of
    groups of tied values (the Mann-Whitney null variance with the tie correction; without ties it
    is Hanley and McNeil's AUC variance at 0.5, (N + 1) / (12 n1 n2))."""
    f, h = _finite(forget, "forget scores"), _finite(holdout, "holdout scores")
    n1, n2 = f.size, h.size
    total = n1 + n2
    _, counts = np.unique(np.concatenate([f, h]), return_counts=True)
    ties = float(np.sum(counts.astype(np.float64) ** 3 - counts)) / (total * (total - 1)) if total > 1 else 0.0
    var_u = n1 * n2 / 12.0 * ((total + 1) - ties)
    return math.sqrt(max(var_u, 0.0)) / (n1 * n2)


def auc_band(forget: Values, holdout: Values, alpha: float) -> tuple[float, float]:
    """0.5 +- z(1 - alpha/2) * :func:`auc_null_sd`, clipped to [0, 1]: the AUCs at which the two-sided
    Mann-Whitney test (normal approximation, no continuity correction) does not reject at ``alpha``."""
    half = float(norm.ppf(1 - alpha / 2)) * auc_null_sd(forget, holdout)
    return max(0.0, 0.5 - half), min(1.0, 0.5 + half)


def auc_p_value(forget: Values, holdout: Values) -> float:
    """Two-sided p-value of AUC = 0.5 (the Mann-Whitney test, normal approximation, tie-corrected)."""
    sd = auc_null_sd(forget, holdout)
    diff = abs(auc(list(forget), list(holdout)) - 0.5)
    if sd == 0:
        return 1.0 if diff == 0 else 0.0
    return float(2 * norm.sf(diff / sd))


def _auc_rows(f: np.ndarray, h: np.ndarray) -> np.ndarray:
    """AUC of each row of f (members) against the same row of h: [B, n1] x [B, n2] -> [B]."""
    n1, n2 = f.shape[1], h.shape[1]
    ranks = rankdata(np.concatenate([f, h], axis=1), axis=1)
    return (ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n2)


def bootstrap_auc(forget: Values, holdout: Values, level: float, n_boot: int = 2000,
                  rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, forget and holdout resampled independently."""
    f, h = _finite(forget, "forget scores"), _finite(holdout, "holdout scores")
    rng = rng or np.random.default_rng(0)
    stats = _auc_rows(f[_resample(f.size, n_boot, rng)], h[_resample(h.size, n_boot, rng)])
    return percentile_interval(stats, level)


def bootstrap_mean_difference(forget: Values, holdout: Values, level: float, n_boot: int = 2000,
                              rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(forget) - mean(holdout), the sets resampled independently."""
    f, h = _finite(forget, "forget values"), _finite(holdout, "holdout values")
    rng = rng or np.random.default_rng(0)
    stats = f[_resample(f.size, n_boot, rng)].mean(axis=1) - h[_resample(h.size, n_boot, rng)].mean(axis=1)
    return percentile_interval(stats, level)


def signed_ks(forget: Values, holdout: Values) -> tuple[float, float]:
    """(signed KS statistic, two-sided p-value) of forget vs holdout (``scipy.stats.ks_2samp``).

    |statistic| is the KS distance D; its sign says which one-sided distance is larger: + when the
    forget values tend to be larger (max(F_holdout - F_forget) > max(F_forget - F_holdout)), - when
    smaller; on a tie, the sign of the median difference, then of the mean difference, then +.
    """
    f, h = _finite(forget, "forget values"), _finite(holdout, "holdout values")
    grid = np.union1d(f, h)
    cdf_f = np.searchsorted(np.sort(f), grid, side="right") / f.size
    cdf_h = np.searchsorted(np.sort(h), grid, side="right") / h.size
    larger, smaller = float(np.max(cdf_h - cdf_f)), float(np.max(cdf_f - cdf_h))
    result = ks_2samp(f, h)
    d, p = float(result.statistic), float(result.pvalue)
    if larger != smaller:
        sign = 1.0 if larger > smaller else -1.0
    else:
        tie_break = np.sign(np.median(f) - np.median(h)) or np.sign(f.mean() - h.mean()) or 1.0
        sign = float(tie_break)
    return sign * d, p


def utility_score(sets: Mapping[str, Mapping[str, np.ndarray]], rows: Mapping[str, np.ndarray] | None = None) -> float:
    """Harmonic mean of the mean of every (set, metric) array (``rows``: each set's resampled row
    indices). With retain, real_authors and world_facts x probability, ROUGE and truth-ratio score this
    is TOFU's model utility; a mean of 0 gives 0."""
    means = []
    for name, metrics in sets.items():
        idx = None if rows is None else rows[name]
        for values in metrics.values():
            means.append(float(values.mean() if idx is None else values[idx].mean()))
    means_a = np.asarray(means)
    if np.any(means_a <= 0):
        return 0.0
    return float(len(means_a) / np.sum(1.0 / means_a))


# ----------------------------------------------------------------------------------------------
# Criteria from per-sample values (the functions training-time checks call)


def membership_call(forget_scores: Values, holdout_scores: Values, *,
                    band: tuple[float, float] | None = None, alpha: float = 0.05, n_boot: int = 2000,
                    seed: int = 0, score: str = "loss", evidence: str | None = None) -> Criterion:
    """``membership:<score>``: the AUC of forget (members) against holdout membership scores (higher =
    more member-like, ``evaluation.mia``), judged inside ``band`` or, without one, inside the band the
    sample sizes give at ``alpha`` (:func:`auc_band`); with a bootstrap interval of level 1 - alpha."""
    name = f"membership:{score}"
    f, h = _finite(forget_scores, f"{name} forget"), _finite(holdout_scores, f"{name} holdout")
    value = auc(f.tolist(), h.tolist())
    used_band = band if band is not None else auc_band(f, h, alpha)
    interval = bootstrap_auc(f, h, 1 - alpha, n_boot, _rng(seed, name))
    source = "user band" if band is not None else f"Mann-Whitney null band at alpha {alpha:.3g}"
    return Criterion(name, "membership", f"AUC forget vs holdout ({MEMBERSHIP_SCORES.get(score, score)})", value,
                     "band", "above", (float(used_band[0]), float(used_band[1])), interval, auc_p_value(f, h),
                     None if band is not None else alpha, evidence,
                     f"{source}; above: forget rows still look like training data, below: they look less "
                     "likely than never-seen rows", {"forget": int(f.size), "holdout": int(h.size)})


def ks_call(forget: Values, holdout: Values, *, name: str, statistic: str,
            under_if: str = "below", alpha: float = 0.05, evidence: str | None = None,
            note: str = "") -> Criterion:
    """A two-sample KS test of per-sample values, forget vs holdout: ``value`` is the signed KS
    distance (:func:`signed_ks`), ``under_if`` the side (of the forget values) that means the model
    still knows the forget rows better."""
    f, h = _finite(forget, f"{name} forget"), _finite(holdout, f"{name} holdout")
    d, p = signed_ks(f, h)
    return Criterion(name, name.split(":")[0], statistic, d, "test", under_if, None, None, p, alpha, evidence,
                     note, {"forget": int(f.size), "holdout": int(h.size)})


def mean_difference_call(forget: Values, holdout: Values, *, name: str, statistic: str,
                         under_if: str = "above", alpha: float = 0.05, n_boot: int = 2000, seed: int = 0,
                         evidence: str | None = None, note: str = "") -> Criterion:
    """mean(forget) - mean(holdout) with its bootstrap interval of level 1 - alpha, judged against 0."""
    f, h = _finite(forget, f"{name} forget"), _finite(holdout, f"{name} holdout")
    interval = bootstrap_mean_difference(f, h, 1 - alpha, n_boot, _rng(seed, name))
    return Criterion(name, name.split(":")[0], statistic, float(f.mean() - h.mean()), "interval", under_if,
                     (0.0, 0.0), interval, None, alpha, evidence, note, {"forget": int(f.size), "holdout": int(h.size)})


KNOWLEDGE = {  # key -> (statistic, per-sample key in eval.json)
    "truth_ratio": ("KS forget vs holdout truth ratio (signed)", "truth_ratio_raw"),
    "nll": ("KS forget vs holdout answer NLL (signed)", "nll"),
    "rouge": ("mean forget ROUGE-L - mean holdout ROUGE-L", "rouge"),
}


def knowledge_call(key: str, forget: Values, holdout: Values, *, alpha: float = 0.05,
                   n_boot: int = 2000, seed: int = 0, evidence: str | None = None) -> Criterion:
    """``knowledge:<key>``: ``truth_ratio`` and ``nll`` by a two-sample KS test (forget values lower:
    the model prefers the forget answers more than never-seen ones, under-unlearned), ``rouge`` by the
    bootstrap interval of the mean difference (higher: it answers forget questions better, under)."""
    statistic = KNOWLEDGE[key][0]
    if key == "rouge":
        return mean_difference_call(forget, holdout, name="knowledge:rouge", statistic=statistic, alpha=alpha,
                                    n_boot=n_boot, seed=seed, evidence=evidence,
                                    note="the model answers forget questions better (under) or worse (over) "
                                         "than never-seen ones")
    return ks_call(forget, holdout, name=f"knowledge:{key}", statistic=statistic, under_if="below", alpha=alpha,
                   evidence=evidence, note="forget values lower: the model prefers the forget answers more than "
                                           "never-seen ones (under); higher: less (over)")


def knowledge_missing(key: str, forget: Any, holdout: Any, evidence: str | None = None) -> Criterion | None:
    """The not-measured ``knowledge:<key>`` criterion when one side lacks the values, else None."""
    if forget is not None and holdout is not None:
        return None
    side = "forget" if forget is None else "holdout"
    why = f"the {side} set has no per-sample {key.replace('_', ' ')}"
    if key == "truth_ratio":
        why += " (its rows have no perturbed answers)"
    return not_measured(f"knowledge:{key}", "knowledge", KNOWLEDGE[key][0], why, evidence)


def knowledge_calls(forget: Mapping[str, Values | None], holdout: Mapping[str, Values | None], *,
                    alpha: float = 0.05, n_boot: int = 2000, seed: int = 0,
                    evidence: str | None = None) -> list[Criterion]:
    """:func:`knowledge_call` for each of ``truth_ratio``, ``nll``, ``rouge`` that either side has
    (per-sample values keyed so); a key one side lacks or holds None gives a not-measured criterion.
    A log-prob-only check passes ``truth_ratio`` and ``nll`` only: no ROUGE criterion then."""
    out = []
    for key in KNOWLEDGE:
        if key not in forget and key not in holdout:
            continue
        f, h = forget.get(key), holdout.get(key)
        missing = knowledge_missing(key, f, h, evidence)
        out.append(missing or knowledge_call(key, f, h, alpha=alpha, n_boot=n_boot, seed=seed,  # type: ignore[arg-type]
                                             evidence=evidence))
    return out


def utility_call(after: Mapping[str, Mapping[str, Values]], before: Mapping[str, Mapping[str, Values]], *,
                 tolerance: float = 0.1, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0,
                 evidence: str | None = None) -> Criterion:
    """``utility:model_utility``: :func:`utility_score` of ``after`` over ``before`` (set -> metric ->
    per-sample values, the same rows in both), with a paired bootstrap interval (each set's rows
    resampled once for both models); over-unlearned when the interval lies below 1 - ``tolerance``."""
    name, statistic = "utility:model_utility", "utility / utility before unlearning"
    sets = [s for s in after if s in before]
    if not sets:
        return not_measured(name, "utility", statistic, "no utility set evaluated on both models", evidence)
    a = {s: {m: _finite(v, f"{s} {m}") for m, v in after[s].items() if m in before[s]} for s in sets}
    b = {s: {m: _finite(before[s][m], f"{s} {m} before") for m in a[s]} for s in sets}
    for s in sets:
        sizes = {v.size for v in (*a[s].values(), *b[s].values())}
        if len(sizes) != 1:
            raise ValueError(f"utility set {s}: per-sample lists of different lengths {sorted(sizes)}")
    u_before = utility_score(b)
    if u_before == 0:
        return not_measured(name, "utility", statistic, "the utility before unlearning is 0", evidence)
    value = utility_score(a) / u_before
    rng = _rng(seed, name)
    n = {s: next(iter(a[s].values())).size for s in sets}
    stats = np.empty(n_boot)
    rows = {s: _resample(n[s], n_boot, rng) for s in sets}
    for i in range(n_boot):
        idx = {s: rows[s][i] for s in sets}
        denominator = utility_score(b, idx)
        stats[i] = utility_score(a, idx) / denominator if denominator > 0 else np.nan
    interval = percentile_interval(stats, 1 - alpha)
    return Criterion(name, "utility", statistic, value, "interval", "above", (1 - tolerance, None), interval, None,
                     alpha, evidence, f"sets {', '.join(sets)}; below {1 - tolerance:.2f}: utility lost "
                     "beyond the tolerance (over-unlearned)", {s: n[s] for s in sets})


def privleak_call(forget: Values, holdout: Values, oracle_forget: Values,
                  oracle_holdout: Values, *, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0,
                  evidence: str | None = None) -> Criterion:
    """``oracle:privleak``: MUSE PrivLeak (percent, ``evaluation.mia.privleak``) of the Min-K% scores
    against the oracle's on the same rows, with a bootstrap interval (rows resampled once for both
    models); negative = under-unlearned, positive = over-unlearned, interval around 0 = indistinguishable."""
    name, statistic = "oracle:privleak", "PrivLeak vs the oracle (percent, Min-K%)"
    f, h = _finite(forget, "privleak forget"), _finite(holdout, "privleak holdout")
    of, oh = _finite(oracle_forget, "privleak oracle forget"), _finite(oracle_holdout, "privleak oracle holdout")
    if f.size != of.size or h.size != oh.size:
        raise ValueError("PrivLeak needs the oracle's scores of the same forget and holdout rows")
    try:
        value = privleak(auc(f.tolist(), h.tolist()), auc(of.tolist(), oh.tolist()))
    except ValueError as exc:
        return not_measured(name, "oracle", statistic, str(exc), evidence)
    rng = _rng(seed, name)
    fi, hi = _resample(f.size, n_boot, rng), _resample(h.size, n_boot, rng)
    own, ref = 1 - _auc_rows(f[fi], h[hi]), 1 - _auc_rows(of[fi], oh[hi])  # MUSE's orientation
    with np.errstate(divide="ignore", invalid="ignore"):
        stats = np.where(ref > 0, (own - ref) / ref * 100, np.nan)
    interval = percentile_interval(stats, 1 - alpha)
    return Criterion(name, "oracle", statistic, value, "interval", "below", (0.0, 0.0), interval, None, alpha,
                     evidence, "resamples where the oracle's AUC is 1 are left out (PrivLeak undefined)",
                     {"forget": int(f.size), "holdout": int(h.size)})


def forget_quality_call(ratios: Values, oracle_ratios: Values, *, alpha: float = 0.05,
                        evidence: str | None = None) -> Criterion:
    """``oracle:forget_quality``: the KS test of the forget truth ratios against the oracle's (its
    p-value is TOFU forget quality); ratios lower than the oracle's = under-unlearned."""
    c = ks_call(ratios, oracle_ratios, name="oracle:forget_quality", statistic="KS forget truth ratio vs the "
                "oracle's (signed; p-value = TOFU forget quality)", under_if="below", alpha=alpha, evidence=evidence,
                note="truth ratios lower than the oracle's: the model still prefers the true answers")
    return Criterion(**{**asdict(c), "n": {"model": c.n["forget"], "oracle": c.n["holdout"]}})


RELEARN_STATISTIC = "relearning gain (NLL drop), held-out forget - holdout"


def relearn_call(forget_gain: Values, holdout_gain: Values, *, alpha: float = 0.05,
                 n_boot: int = 2000, seed: int = 0, evidence: str | None = None, note: str = "") -> Criterion:
    """``durability:relearn``: mean per-sample gain (NLL at the start minus NLL after relearning) of the
    held-out forget rows minus the mean gain of holdout rows under the same relearning, bootstrap interval."""
    return mean_difference_call(forget_gain, holdout_gain, name="durability:relearn",
                                statistic=RELEARN_STATISTIC, alpha=alpha,
                                n_boot=n_boot, seed=seed, evidence=evidence,
                                note=note or "relearning brings forget answers back more (under) or less (over) "
                                             "than it teaches never-seen rows")


def quantise_call(change: float, tolerance: float = 0.05, *, evidence: str | None = None, note: str = "") -> Criterion:
    """``durability:quantise``: the change of the forget-minus-holdout ROUGE gap under quantisation,
    inside +-``tolerance`` (no interval: the attack's file holds aggregates only)."""
    if not math.isfinite(change):
        raise ValueError("durability:quantise: non-finite change")
    return Criterion("durability:quantise", "durability", "change of forget - holdout ROUGE-L gap under "
                     "quantisation", float(change), "band", "above", (-tolerance, tolerance), None, None, None,
                     evidence, note)


# ----------------------------------------------------------------------------------------------
# Per-sample values from a model's scores (log-probs only: what a training-time check can afford)


def _has_perturbed(ds: QADataset) -> bool:
    return len(ds) > 0 and all(e.perturbed_answers for e in ds)


def log_prob_pairs(ds: QADataset) -> list[Pair]:
    """Every (question, answer) pair :func:`log_prob_values` reads: each row's answer and, when every
    row has perturbed answers, its paraphrased (else true) answer and perturbed answers."""
    pairs = [(e.question, e.answer) for e in ds]
    if _has_perturbed(ds):
        for e in ds:
            base = e.paraphrased_answer if e.paraphrased_answer is not None else e.answer
            pairs += [(e.question, base)] + [(e.question, p) for p in e.perturbed_answers]
    return pairs


def log_prob_values(scores: ModelScores, ds: QADataset, k: float = DEFAULT_K) -> dict[str, Any]:
    """Per-sample values of one set from a model's scores (:func:`log_prob_pairs` must be held):
    ``nll``, ``truth_ratio`` (None without perturbed answers on every row) and ``mia``: {score: values}
    (LOSS, zlib, Min-K%, Min-K%++ at ``k``). Feed two of these to :func:`membership_call` (each
    ``mia`` score) and :func:`knowledge_calls`."""
    answers = scores.get([(e.question, e.answer) for e in ds])
    ratios = None
    if _has_perturbed(ds):
        base = scores.get([(e.question, e.paraphrased_answer if e.paraphrased_answer is not None else e.answer)
                           for e in ds])
        perturbed = [scores.get([(e.question, p) for p in e.perturbed_answers]) for e in ds]
        ratios = tofu.truth_ratio(base, perturbed).tolist()
    return {"nll": tofu.nll(answers).tolist(), "truth_ratio": ratios,
            "mia": mia_scores(answers, [e.answer for e in ds], k)}


def log_prob_calls(forget: Mapping[str, Any], holdout: Mapping[str, Any], *, band: tuple[float, float] | None = None,
                   alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> list[Criterion]:
    """The membership and knowledge criteria a log-prob-only check can judge, from two
    :func:`log_prob_values` results, each at ``alpha`` as given (no correction is applied here)."""
    calls = [membership_call(forget["mia"][s], holdout["mia"][s], band=band, alpha=alpha, n_boot=n_boot, seed=seed,
                             score=s) for s in MEMBERSHIP_SCORES]
    return calls + knowledge_calls({k: forget.get(k) for k in ("truth_ratio", "nll")},
                                   {k: holdout.get(k) for k in ("truth_ratio", "nll")}, alpha=alpha)


# ----------------------------------------------------------------------------------------------
# Evidence: the run's files, read once


@dataclass
class Evidence:
    """What a model is judged on: ``evals`` (label -> ``eval.json`` dict: per-sample values),
    ``privacy`` (label -> ``privacy_eval`` result: per-sample membership scores), the attacks'
    results on the judged model, and where each came from (``files``: ``eval:<label>``, ``privacy``,
    ``relearn``, ``quantise`` -> a path relative to the run)."""

    evals: dict[str, dict[str, Any]] = field(default_factory=dict)
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)
    relearn: dict[str, Any] | None = None
    quantise: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return path.relative_to(run_dir).as_posix()
    except ValueError:
        return str(path)


def run_evidence(run_dir: str | Path, labels: Sequence[str] = ("unlearned", "target", "oracle")) -> Evidence:
    """The evidence a run directory holds: ``eval/<label>.json``, ``privacy.json`` (the pipeline's,
    label -> result) or ``attacks/privacy.json`` (``{"results": ...}``), ``attacks/relearn.json`` and
    ``attacks/quantise.json``; a demo's sub-runs supply what it lacks (``runs.registry.find_in_run``)."""
    run_dir = Path(run_dir)
    ev = Evidence()
    for label in labels:
        path = find_in_run(run_dir, f"eval/{label}.json")
        data = read_json_file(path) if path is not None else None
        if isinstance(data, dict) and isinstance(data.get("sets"), dict):
            ev.evals[label], ev.files[f"eval:{label}"] = data, _relative(path, run_dir)  # type: ignore[arg-type]
    for rel, key in (("privacy.json", None), ("attacks/privacy.json", "results")):
        path = find_in_run(run_dir, rel)
        data = read_json_file(path) if path is not None else None
        results = data.get(key) if isinstance(data, dict) and key else data
        if isinstance(results, dict) and results:
            ev.privacy, ev.files["privacy"] = dict(results), _relative(path, run_dir)  # type: ignore[arg-type]
            break
    for name in ("relearn", "quantise"):
        path = find_in_run(run_dir, f"attacks/{name}.json")
        data = read_json_file(path) if path is not None else None
        if isinstance(data, dict):
            setattr(ev, name, data)
            ev.files[name] = _relative(path, run_dir)  # type: ignore[arg-type]
    return ev


def _per_sample(ev: Evidence, label: str, set_name: str) -> dict[str, Any] | None:
    s = ((ev.evals.get(label) or {}).get("sets") or {}).get(set_name)
    return s.get("per_sample") if isinstance(s, dict) else None


def _mia(ev: Evidence, label: str) -> dict[str, dict[str, list[float]]] | None:
    mia = ((ev.privacy.get(label) or {}).get("per_sample") or {}).get("mia")
    return mia if isinstance(mia, dict) and "forget" in mia and "holdout" in mia else None


# ----------------------------------------------------------------------------------------------
# Judging a model


@dataclass
class _Pending:
    """A measured criterion still to be judged, once the number of tests (and so its alpha) is known:
    ``fn(*args, alpha=alpha, **kwargs)``; ``tested``: its call depends on alpha (Bonferroni counts it)."""

    fn: Callable[..., Criterion]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    tested: bool = True

    def make(self, alpha: float) -> Criterion:
        return self.fn(*self.args, alpha=alpha, **self.kwargs)


_Item = Criterion | _Pending


def _membership(ev: Evidence, s: Settings) -> list[_Item]:
    mia, file = _mia(ev, s.label), ev.files.get("privacy")
    out: list[_Item] = []
    for score, shown in MEMBERSHIP_SCORES.items():
        if mia is None or score not in mia["forget"] or score not in mia["holdout"]:
            why = ("no per-sample membership scores of this model (privacy.json; the run needs a holdout split)"
                   if mia is None else f"{file} has no {shown} scores")
            out.append(not_measured(f"membership:{score}", "membership", f"AUC forget vs holdout ({shown})", why,
                                    file))
            continue
        f, h = mia["forget"][score], mia["holdout"][score]
        out.append(_Pending(membership_call, (f, h), dict(band=s.auc_band, n_boot=s.n_boot, seed=s.seed, score=score,
                                                          evidence=file), tested=s.auc_band is None))
    return out


def _knowledge(ev: Evidence, s: Settings) -> list[_Item]:
    forget, holdout = _per_sample(ev, s.label, "forget"), _per_sample(ev, s.label, "holdout")
    file = ev.files.get(f"eval:{s.label}")
    out: list[_Item] = []
    for key, (statistic, source) in KNOWLEDGE.items():
        if forget is None or holdout is None:
            why = (f"no evaluation of {s.label}" if file is None else
                   f"{file} has no {'forget' if forget is None else 'holdout'} set")
            out.append(not_measured(f"knowledge:{key}", "knowledge", statistic, why, file))
            continue
        f, h = forget.get(source), holdout.get(source)
        missing = knowledge_missing(key, f, h, file)
        out.append(missing or _Pending(knowledge_call, (key, f, h), dict(n_boot=s.n_boot, seed=s.seed,
                                                                         evidence=file)))
    return out


def _relearn(ev: Evidence, s: Settings) -> _Item:
    name, statistic = "durability:relearn", RELEARN_STATISTIC
    r, file = ev.relearn, ev.files.get("relearn")
    if s.label != "unlearned":
        return not_measured(name, "durability", statistic, "the attacks run on the unlearned model only")
    if r is None:
        return not_measured(name, "durability", statistic, "no attacks/relearn.json (run `obliviate attack relearn "
                            "RUN`)")
    per, steps = r.get("per_sample") or {}, r.get("steps") or []
    first, last = (per.get(str(steps[0])), per.get(str(steps[-1]))) if steps else (None, None)
    if not all(isinstance(p, dict) and isinstance(p.get("holdout"), dict) for p in (first, last)):
        return not_measured(name, "durability", statistic, f"{file} has no per-sample holdout control (rerun "
                            "`obliviate attack relearn` on a run with a holdout split)", file)
    assert first is not None and last is not None  # checked just above
    g_f = np.asarray(first["nll"], float) - np.asarray(last["nll"], float)
    g_h = np.asarray(first["holdout"]["nll"], float) - np.asarray(last["holdout"]["nll"], float)
    summary = r.get("summary") or {}
    parts = [f"{k} {summary[k]:.3f}" for k in ("recovery", "holdout_gain", "oracle_gain")
             if isinstance(summary.get(k), (int, float))]
    note = f"after {steps[-1]} relearning steps" + (f"; {', '.join(parts)} (in units of what unlearning removed)"
                                                    if parts else "")
    return _Pending(relearn_call, (g_f, g_h), dict(n_boot=s.n_boot, seed=s.seed, evidence=file, note=note))


def _gap(row: Mapping[str, Any]) -> float | None:
    f, h = row.get("forget_rouge"), row.get("holdout_rouge")
    return f - h if isinstance(f, (int, float)) and isinstance(h, (int, float)) else None


def _quantise(ev: Evidence, s: Settings) -> Criterion:
    name, statistic = "durability:quantise", "change of forget - holdout ROUGE-L gap under quantisation"
    q, file = ev.quantise, ev.files.get("quantise")
    if s.label != "unlearned":
        return not_measured(name, "durability", statistic, "the attacks run on the unlearned model only")
    if q is None:
        return not_measured(name, "durability", statistic, "no attacks/quantise.json (run `obliviate attack "
                            "quantise RUN`)")
    bits = sorted((k for k in q if str(k).isdigit() and isinstance(q[k], dict)), key=int)
    full = q.get("none") if isinstance(q.get("none"), dict) else None
    if full is None and s.label in ev.evals:  # the model's own evaluation is its full-precision row
        sets = ev.evals[s.label]["sets"]
        full = {f"{n}_rouge": sets[n].get("rouge") for n in ("forget", "holdout") if n in sets}
    low, high = (_gap(q[bits[0]]) if bits else None), (_gap(full) if full is not None else None)
    if low is None or high is None:
        return not_measured(name, "durability", statistic, f"{file} has no forget and holdout ROUGE at full and "
                            "reduced precision", file)
    return quantise_call(low - high, s.quantise_tolerance, evidence=file,
                         note=f"{bits[0]}-bit against full precision; a fixed band (aggregates only, no interval)")


def _utility_sets(ev: Evidence, label: str) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for name in UTILITY_SETS:
        per = _per_sample(ev, label, name)
        if per is None:
            continue
        metrics = {m: np.asarray(per[m], float) for m in ("probability", "rouge") if per.get(m) is not None}
        if per.get("truth_ratio_raw") is not None:  # TOFU's truth-ratio score off the forget set: max(0, 1 - R)
            metrics["truth_ratio"] = np.maximum(0.0, 1.0 - np.asarray(per["truth_ratio_raw"], float))
        if metrics:
            out[name] = metrics
    return out


def _utility(ev: Evidence, s: Settings) -> _Item:
    name, statistic = "utility:model_utility", "utility / utility before unlearning"
    if s.label in (s.before, s.oracle):  # neither was unlearned from another model
        return not_measured(name, "utility", statistic, f"the {s.label} was not unlearned from a model before")
    after, before = _utility_sets(ev, s.label), _utility_sets(ev, s.before)
    if not after or not before:
        missing = s.label if not after else s.before
        return not_measured(name, "utility", statistic, f"no utility set evaluated for {missing}",
                            ev.files.get(f"eval:{missing}"))
    files = ", ".join(ev.files[f"eval:{x}"] for x in dict.fromkeys((s.label, s.before)) if f"eval:{x}" in ev.files)
    return _Pending(utility_call, (after, before), dict(tolerance=s.utility_tolerance, n_boot=s.n_boot, seed=s.seed,
                                                        evidence=files or None))


def _oracle(ev: Evidence, s: Settings) -> list[_Item]:
    if s.label == s.oracle or (s.oracle not in ev.evals and s.oracle not in ev.privacy):
        return []  # no oracle (or this is it): its criteria are added only where they compare two models
    out: list[_Item] = []
    own, ref = _per_sample(ev, s.label, "forget"), _per_sample(ev, s.oracle, "forget")
    files = ", ".join(ev.files[f"eval:{x}"] for x in dict.fromkeys((s.label, s.oracle))
                      if f"eval:{x}" in ev.files) or None
    if own is None or ref is None or own.get("truth_ratio_raw") is None or ref.get("truth_ratio_raw") is None:
        out.append(not_measured("oracle:forget_quality", "oracle", "KS forget truth ratio vs the oracle's",
                                "no forget truth ratios of both this model and the oracle", files))
    else:
        out.append(_Pending(forget_quality_call, (own["truth_ratio_raw"], ref["truth_ratio_raw"]),
                            dict(evidence=files)))
    mine, oracle, file = _mia(ev, s.label), _mia(ev, s.oracle), ev.files.get("privacy")
    if mine is None or oracle is None or "min_k" not in mine["forget"] or "min_k" not in oracle["forget"]:
        out.append(not_measured("oracle:privleak", "oracle", "PrivLeak vs the oracle (percent, Min-K%)",
                                "no Min-K% scores of both this model and the oracle", file))
    else:
        out.append(_Pending(privleak_call, (mine["forget"]["min_k"], mine["holdout"]["min_k"],
                                            oracle["forget"]["min_k"], oracle["holdout"]["min_k"]),
                            dict(n_boot=s.n_boot, seed=s.seed, evidence=file)))
    return out


def judge(ev: Evidence, settings: Settings = Settings()) -> dict[str, Any]:
    """The two-sided verdict on ``settings.label``: every criterion (module doc), judged at
    ``alpha / m`` (Bonferroni over the ``m`` measured criteria whose call depends on alpha), and the
    overall call. Returns ``{"model", "call", "under", "over", "not_measured", "alpha",
    "alpha_per_criterion", "n_tests", "criteria": [Criterion.to_json()...], "settings"}``."""
    s = settings
    items: list[_Item] = [*_membership(ev, s), *_knowledge(ev, s), _relearn(ev, s), _quantise(ev, s),
                          _utility(ev, s), *_oracle(ev, s)]
    m = sum(1 for item in items if isinstance(item, _Pending) and item.tested)
    while True:  # a pending criterion can still find itself unmeasurable (a utility of 0): count again
        per = s.alpha / max(m, 1)
        criteria = [item.make(per) if isinstance(item, _Pending) else item for item in items]
        measured = sum(1 for item, c in zip(items, criteria) if isinstance(item, _Pending) and item.tested
                       and c.measured)
        if measured == m:
            break
        m = measured
    return {"model": s.label, "call": overall_call([c.call for c in criteria]),
            "under": [c.name for c in criteria if c.call == UNDER],
            "over": [c.name for c in criteria if c.call == OVER],
            "not_measured": [c.name for c in criteria if c.call == NOT_MEASURED],
            "alpha": s.alpha, "alpha_per_criterion": per, "n_tests": m,
            "criteria": [c.to_json() for c in criteria], "settings": s.to_json()}


def group_call(verdict: Mapping[str, Any], groups: Sequence[str]) -> str:
    """The overall call over the criteria of ``groups`` only."""
    return overall_call([c["call"] for c in verdict["criteria"] if c["group"] in groups])


def run_verdict(ev: Evidence, settings: Settings = Settings(),
                labels: Sequence[str] = ("target", "oracle", "unlearned")) -> dict[str, Any]:
    """``metrics.json``'s verdict: :func:`judge` of ``settings.label`` plus ``by_model`` (each of
    ``labels`` with an evaluation: its overall call), ``forgotten`` (every measured forget-side
    criterion indistinguishable), ``utility_kept`` (the utility criterion indistinguishable) and
    ``target_memorised`` (the model before unlearning is under-unlearned on membership or knowledge,
    so there was something to forget; None when that was not measured)."""
    verdict = judge(ev, settings)
    by_model = {label: (verdict if label == settings.label else judge(ev, settings.with_model(label)))
                for label in labels if label in ev.evals or label in ev.privacy}
    before = by_model.get(settings.before)
    memorised = None if before is None else group_call(before, ("membership", "knowledge"))
    return {**verdict, "by_model": {label: v["call"] for label, v in by_model.items()},
            "forgotten": group_call(verdict, FORGET_GROUPS) == SAME,
            "utility_kept": group_call(verdict, ("utility",)) == SAME,
            "target_memorised": None if memorised in (None, NOT_MEASURED) else memorised in (UNDER, MIXED)}


# ----------------------------------------------------------------------------------------------
# Threshold checks (audit records' data checks, and records written before the two-sided verdict)

PASS, FAIL = "pass", "fail"


def judge_threshold(op: str, value: Any, threshold: Any) -> str:
    """pass / fail / not measured of a value against a threshold (``==``, ``>=``, ``<=``, ``abs<=``,
    ``within`` [lo, hi]): the data checks of audit records, and every check of a format-1 record."""
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


def threshold_verdict(checks: Sequence[Mapping[str, Any]], gaps: Sequence[str]) -> str:
    """A format-1 record's overall verdict: fail if any check fails; incomplete if a check is
    unmeasured or evidence is missing; pass otherwise."""
    verdicts = [c["verdict"] for c in checks]
    if FAIL in verdicts:
        return FAIL
    if NOT_MEASURED in verdicts or gaps:
        return "incomplete"
    return PASS
