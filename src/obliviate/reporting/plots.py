"""Report figures, drawn on Matplotlib's Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` + ``FigureCanvasAgg`` rather than pyplot, so
nothing here changes the caller's Matplotlib backend or global state, and no display is needed.
Each ``*_figure`` function returns a Figure (tests inspect its axes); ``png_bytes`` renders one.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from obliviate.evaluation.evaluate import logprob_utility
from obliviate.reporting.tables import SUMMARY, format_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Forget quality is a p-value and can underflow to 0; plot such points at this floor.
FQ_FLOOR = 1e-300
# Colours per model label, so the same model looks the same in every figure.
COLOURS = {"target": "#d62728", "oracle": "#7f7f7f", "unlearned": "#1f77b4"}
_CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def new_figure(width: float, height: float) -> Figure:
    # Matplotlib takes about a second to import; only commands that draw figures pay for it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, metadata={"Software": None})
    return buf.getvalue()


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def utility_key(curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The utility a trade-off figure plots: ``logprob_utility`` (model utility without ROUGE) when
    every trajectory point has it, as the pipeline writes them (its points between the first and the
    last are evaluated without generation); ``model_utility`` for trajectories written before."""
    rows = [r for rs in curves.values() for r in rs]
    return "logprob_utility" if rows and all(_finite(r.get("logprob_utility")) is not None for r in rows) \
        else "model_utility"


def _anchor(value: tuple[float | None, float | None] | Mapping[str, Any], key: str) -> tuple[Any, Any]:
    if not isinstance(value, Mapping):
        return value
    utility = logprob_utility(value) if key == "logprob_utility" else value.get("model_utility")
    return value.get("forget_quality"), utility


def tradeoff_figure(curves: Mapping[str, Sequence[Mapping[str, Any]]],
                    anchors: Mapping[str, tuple[float | None, float | None] | Mapping[str, Any]] | None = None
                    ) -> Figure:
    """Forget quality (log x) vs utility (y) along each unlearning trajectory.

    ``curves``: name -> trajectory rows with ``step``, ``forget_quality`` and the utility
    (:func:`utility_key`: ``logprob_utility``, else ``model_utility``).
    ``anchors``: label (target, oracle, ...) -> a summary row (its forget quality and the same
    utility as the curves, computed from the row), or a (forget quality, utility) pair drawn as given;
    drawn as markers.
    """
    key = utility_key(curves)
    fig = new_figure(7.5, 4.8)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    for i, (name, rows) in enumerate(curves.items()):
        pts = [(_finite(r.get("forget_quality")), _finite(r.get(key)), r.get("step")) for r in rows]
        pts = [(max(fq, FQ_FLOOR), mu, step) for fq, mu, step in pts if fq is not None and mu is not None]
        if not pts:
            continue
        xs, ys, steps = zip(*pts)
        colour = _CYCLE[i % len(_CYCLE)]
        ax.plot(xs, ys, "-o", color=colour, markersize=4, label=name)
        if len(curves) > 1:
            continue  # step labels of several curves would overlap
        ax.annotate(f"step {steps[0]}", (xs[0], ys[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.annotate(f"step {steps[-1]}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, -12),
                    fontsize=8, color=colour)
    for label, value in (anchors or {}).items():
        fq, mu = (_finite(v) for v in _anchor(value, key))
        if fq is not None and mu is not None:
            ax.scatter([max(fq, FQ_FLOOR)], [mu], marker="*" if label == "oracle" else "s", s=120, zorder=5,
                       color=COLOURS.get(label, "black"), edgecolor="black", label=label)
    ax.axvline(0.05, color="#999", linestyle="--", linewidth=1)
    ax.text(0.05, 1.0, " p = 0.05", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="#666")
    ax.set_xlabel("forget quality (KS-test p-value vs the oracle, log scale; higher is better)")
    ax.set_ylabel("model utility without ROUGE (probability, truth ratio; higher is better)"
                  if key == "logprob_utility" else "model utility (higher is better)")
    ax.set_title("Forgetting vs utility during unlearning")
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    return fig


def relearn_figure(relearn: Mapping[str, Any]) -> Figure:
    """Forget-set ROUGE and probability while finetuning on part of the forget set (relearning
    attack, Hu et al. 2024, arXiv 2406.13356), for the unlearned model and the oracle."""
    keys = [k for k in ("forget_rouge", "forget_probability") if k in relearn]
    fig = new_figure(7.5, 3.6)
    axes = fig.subplots(1, max(1, len(keys)), squeeze=False)[0]
    oracle = relearn.get("oracle") or {}
    for ax, key in zip(axes, keys):
        ax.plot(relearn["steps"], relearn[key], "-o", color=COLOURS["unlearned"], markersize=4, label="unlearned")
        if key in oracle:
            ax.plot(oracle.get("steps", relearn["steps"]), oracle[key], "--s", color=COLOURS["oracle"],
                    markersize=4, label="oracle")
        ax.set_xlabel("relearning steps")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    recovery = _finite((relearn.get("summary") or {}).get("recovery"))
    fig.suptitle("Relearning attack"
                 + (f" (recovery {format_number(recovery, SUMMARY)})" if recovery is not None else ""))
    return fig


def truth_ratio_figure(values: Mapping[str, Sequence[float]]) -> Figure:
    """Histograms of per-sample forget-set truth ratios R (TOFU, Maini et al. 2024, arXiv 2401.06121)
    on a log10 axis: forget quality is the KS test between the oracle's and a model's R."""
    logs = {}
    dropped = 0
    for label, vals in values.items():
        arr = np.asarray([v for v in vals if _finite(v) is not None], dtype=float)
        dropped += int((arr <= 0).sum())
        logs[label] = np.log10(arr[arr > 0])
    fig = new_figure(7.5, 3.8)
    ax = fig.add_subplot()
    every = np.concatenate([v for v in logs.values() if v.size]) if any(v.size for v in logs.values()) else np.zeros(1)
    bins = np.linspace(every.min(), every.max() + 1e-9, 25).tolist()  # the same edges, as the floats hist's types ask
    for i, (label, arr) in enumerate(logs.items()):
        colour = COLOURS.get(label, _CYCLE[i % len(_CYCLE)])
        if label == "oracle":
            ax.hist(arr, bins=bins, color=colour, alpha=0.35, label=f"oracle (n={arr.size})")
        else:
            ax.hist(arr, bins=bins, histtype="step", linewidth=2, color=colour, label=f"{label} (n={arr.size})")
    ax.set_xlabel("log10 truth ratio R = P(perturbed) / P(paraphrased)   (forget set)")
    ax.set_ylabel("questions")
    ax.set_title("Truth ratios vs the oracle" + (f" ({dropped} non-positive values left out)" if dropped else ""))
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return fig


def loss_figure(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """Training loss per step, with per-part losses (any numeric key containing "loss")."""
    keys = ["loss"] + sorted({k for r in rows for k in r if "loss" in k and k != "loss"})
    fig = new_figure(7.5, 3.4)
    ax = fig.add_subplot()
    for i, key in enumerate(keys):
        pts = [(r.get("step"), _finite(r.get(key))) for r in rows]
        pts = [(s, v) for s, v in pts if s is not None and v is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=_CYCLE[i % len(_CYCLE)], linewidth=2 if key == "loss" else 1, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig
