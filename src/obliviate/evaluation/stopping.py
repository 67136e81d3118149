"""Unlearning that stops at "indistinguishable": the calibrated check the training loop runs.

A record is forgotten when the model treats it like a **holdout** record (same kind, never trained
on): not better (under-unlearned), not worse (over-unlearned). :class:`CalibratedCheck` is a
``training.checks`` callback: every ``check_every`` optimizer steps it scores the forget and holdout
rows with log-probs only (no generation: ``evaluation.scores``, one batched forward pass per pair)
and judges them with the verdict's log-prob criteria (``evaluation.verdict.log_prob_calls``):

- membership: ROC AUC of the LOSS, zlib, Min-K% and Min-K%++ scores, forget against holdout, inside
  the band around 0.5 that the sample sizes give at ``alpha`` (the two-sided Mann-Whitney test does
  not reject), or a user band;
- knowledge: two-sample KS tests of the per-sample answer NLL and, where every row of both sets has
  perturbed answers, of the per-sample truth ratio (p-value >= ``alpha``).

Each criterion is judged at ``alpha`` as given, with no multiple-comparison correction: stricter than
the final verdict (which spreads ``alpha`` over all its criteria), so a model this check stops at is
also inside the verdict's wider bands on the same rows.

The decision (``training.checks.CheckDecision``):

- ``stop``: every measured criterion is indistinguishable;
- ``distance``: the largest normalised distance of a criterion from the centre of its band: for an
  AUC with band [lo, hi] around 0.5, (AUC - 0.5) / (hi - 0.5) above the centre and (0.5 - AUC) /
  (0.5 - lo) below it; for a test, log(p) / log(alpha) (0 at p = 1). So distance <= 1 exactly when
  every criterion is inside, and the loop's best checkpoint (the smallest distance) is inside the band
  whenever any check was;
- ``gate`` (per-sample gating, ``gate=True``): quantile matching of the per-sample answer NLL. The
  forget rows, ranked by their NLL, are paired with the holdout NLL's quantiles at the same ranks:
  forget row of rank r (1 = lowest NLL) among n has the target Q_holdout((r - 1/2) / n), and is gated
  (stops contributing to the forget loss) while its NLL is at or above its target. A row the model
  already finds as unlikely as its share of the never-seen rows stops being pushed, so the forget
  NLLs end spread like the holdout's instead of all being pushed past them (which a fixed threshold,
  e.g. the holdout median, would do: every forget row above the median is itself a detectable
  difference). The gate is recomputed at every check (a row whose NLL falls back rejoins).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from obliviate.data.chat import ChatFormat
from obliviate.data.qa import QADataset
from obliviate.errors import UserError
from obliviate.evaluation.mia import DEFAULT_K
from obliviate.evaluation.scores import ModelScores, StepScores
from obliviate.evaluation.verdict import SAME, Criterion, log_prob_calls, log_prob_pairs, log_prob_values, overall_call
from obliviate.options import OptionsError, check_fields, options_from_dict
from obliviate.training.checks import CheckDecision

HOLDOUT_NEEDED = ("calibrated unlearning needs a holdout: records of the same kind as the forget set that the "
                  "model never saw (e.g. the benchmark's holdout split, or customers after the training cut-off)")


@dataclass(frozen=True)
class CalibrationOptions:
    """``alpha``: level of each criterion's band or test; ``auc_band``: a user band (lo, hi) around
    0.5 for every membership AUC instead of the one from the sample sizes; ``gate``: per-sample
    gating; ``batch_size``: scoring batch; ``n_boot``: bootstrap resamples of the AUC intervals that
    are logged (the decision does not use them); ``k``: Min-K%'s fraction."""

    alpha: float = 0.05
    auc_band: tuple[float, float] | None = None
    gate: bool = True
    batch_size: int = 32
    n_boot: int = 200
    k: float = DEFAULT_K

    def __post_init__(self) -> None:
        problems = check_fields(self)
        if not problems:
            if not 0 < self.alpha < 1:
                problems.append(f"alpha must be between 0 and 1, got {self.alpha}")
            if self.auc_band is not None:
                try:
                    lo, hi = (float(x) for x in self.auc_band)
                except (TypeError, ValueError):
                    lo, hi = math.nan, math.nan
                if not 0 <= lo < 0.5 < hi <= 1:
                    problems.append(f"auc_band must be (lo, hi) with 0 <= lo < 0.5 < hi <= 1, got {self.auc_band}")
                else:
                    object.__setattr__(self, "auc_band", (lo, hi))
            if self.batch_size < 1 or self.n_boot < 100:
                problems.append("batch_size must be >= 1 and n_boot >= 100")
            if not 0 < self.k <= 1:
                problems.append(f"k must be in (0, 1], got {self.k}")
        if problems:
            raise OptionsError("invalid calibration options: " + "; ".join(problems))

    @classmethod
    def parse(cls, value: bool | dict[str, Any] | CalibrationOptions | None) -> CalibrationOptions | None:
        """None/False: no calibration; True: the defaults; a mapping: these options."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return options_from_dict(cls, value, "calibration options")
        raise UserError(f"calibrate must be true/false or a mapping of calibration options, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["auc_band"] = None if self.auc_band is None else list(self.auc_band)
        return out


def normalised_distance(c: Criterion) -> float:
    """How far a criterion's statistic is from the centre of its band, in units of the band's
    half-width on that side (see the module doc): <= 1 exactly when its call is indistinguishable."""
    if c.value is None:
        raise ValueError(f"{c.name} was not measured")
    if c.rule == "band":
        assert c.band is not None and c.band[0] is not None and c.band[1] is not None
        lo, hi, centre = float(c.band[0]), float(c.band[1]), 0.5
        above = c.value >= centre
        half = (hi - centre) if above else (centre - lo)
        gap = abs(c.value - centre)
        return gap / half if half > 0 else (0.0 if gap == 0 else math.inf)
    if c.rule == "test":
        assert c.p_value is not None and c.alpha is not None
        return math.log(max(c.p_value, 1e-300)) / math.log(c.alpha)
    raise ValueError(f"{c.name}: no distance for rule {c.rule!r}")


def quantile_targets(holdout_nll: np.ndarray, n: int) -> np.ndarray:
    """The holdout NLL's quantiles at (r - 1/2) / n, r = 1..n: the target of the forget row of rank r."""
    return np.quantile(np.asarray(holdout_nll, dtype=np.float64), (np.arange(n) + 0.5) / n)


def gated_rows(forget_nll: np.ndarray, holdout_nll: np.ndarray) -> frozenset[int]:
    """Forget rows whose NLL is at or above the holdout quantile their rank is paired with (module doc)."""
    f = np.asarray(forget_nll, dtype=np.float64)
    order = np.argsort(f, kind="stable")  # rank r -> row
    targets = quantile_targets(holdout_nll, f.size)
    return frozenset(int(row) for row, target in zip(order, targets) if f[row] >= target)


class CalibratedCheck:
    """The ``training.checks`` callback of calibrated unlearning (module doc): forget vs holdout,
    scored with ``fmt`` (the layout training uses)."""

    def __init__(self, fmt: ChatFormat, forget: QADataset, holdout: QADataset,
                 options: CalibrationOptions | None = None, step_scores: StepScores | None = None):
        if len(holdout) == 0:
            raise UserError(f"{HOLDOUT_NEEDED}; {holdout.source} has no rows")
        if len(forget) < 2 or len(holdout) < 2:
            raise UserError(f"calibrated unlearning compares sets: the forget set has {len(forget)} rows and the "
                            f"holdout {len(holdout)}; give each at least 2 (more give a narrower band)")
        self.fmt, self.forget, self.holdout = fmt, forget, holdout
        self.options = options or CalibrationOptions()
        # shared with whatever else scores the model at the same step (the pipeline's trajectory points)
        self.step_scores = step_scores if step_scores is not None else StepScores()
        self.pairs = list(dict.fromkeys(log_prob_pairs(forget) + log_prob_pairs(holdout)))

    def criteria(self, model, step: int | None = None) -> tuple[list[Criterion], dict[str, Any], dict[str, Any]]:
        """The log-prob criteria of ``model`` and the per-sample values of each set; with ``step`` (the
        training step the model is at) the pairs already scored at that step are read, not scored again."""
        scores = ModelScores.empty(self.fmt) if step is None else self.step_scores.at(step, self.fmt)
        scores.ensure(model, self.fmt, self.pairs, batch_size=self.options.batch_size)
        forget = log_prob_values(scores, self.forget, self.options.k)
        holdout = log_prob_values(scores, self.holdout, self.options.k)
        calls = log_prob_calls(forget, holdout, band=self.options.auc_band, alpha=self.options.alpha,
                               n_boot=self.options.n_boot)
        return calls, forget, holdout

    def __call__(self, model, step: int) -> CheckDecision:
        calls, forget, holdout = self.criteria(model, step)
        measured = [c for c in calls if c.measured]
        distances = {c.name: normalised_distance(c) for c in measured}
        gate = gated_rows(np.asarray(forget["nll"]), np.asarray(holdout["nll"])) if self.options.gate else frozenset()
        record = {"call": overall_call([c.call for c in calls]),
                  "criteria": {c.name: {"value": c.value, "call": c.call, "distance": distances.get(c.name)}
                               for c in calls},
                  "nll": {"forget": float(np.mean(forget["nll"])), "holdout": float(np.mean(holdout["nll"]))}}
        return CheckDecision(stop=bool(measured) and all(c.call == SAME for c in measured),
                             distance=max(distances.values()) if distances else math.inf, gate=gate,
                             criteria=record)
