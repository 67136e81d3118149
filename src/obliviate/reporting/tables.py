"""How numbers and tables are printed: the CLI table, summary.md, leaderboards, reports, records.

One formatter, :func:`format_number`, in two styles: :data:`SUMMARY` for the short tables a run
prints (the demo table, summary.md, the bench leaderboard: 3 decimals, "-" for a missing value) and
:data:`DETAIL` for reports, audit records and the registry (4 decimals, empty for a missing value).
Both print magnitudes below 1e-3 (forget quality is a p-value and can be 1e-20) in scientific
notation, so a tiny value never shows as 0.000.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NumberStyle:
    decimals: int  # fixed-point digits after the point
    sci_decimals: int  # digits after the point in scientific notation (0 < |x| < 1e-3)
    missing: str  # what None prints as


SUMMARY = NumberStyle(decimals=3, sci_decimals=2, missing="-")
DETAIL = NumberStyle(decimals=4, sci_decimals=3, missing="")


def format_number(value: Any, style: NumberStyle = DETAIL) -> str:
    """A table cell: floats per ``style``, None as ``style.missing``; integers, booleans, NaN,
    infinities and text as ``str`` gives them."""
    if value is None:
        return style.missing
    if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
        return str(value)
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.{style.sci_decimals}e}"
    return f"{value:.{style.decimals}f}"


def markdown_cell(value: Any) -> str:
    """Text that stays inside one Markdown table cell (pipes and backslashes escaped, one line)."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(markdown_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The two-sided verdict (evaluation.verdict): a table of its criteria and the summary in words

VERDICT_HEADER = ["criterion", "statistic", "value", "interval", "band", "p-value", "call", "evidence"]
_CALL_WORDS = {
    "under-unlearned": "the forget rows still look like training data: they are better known than never-seen "
                       "holdout rows",
    "over-unlearned": "the forget rows now look *less* likely than never-seen holdout rows, which marks them as "
                      "deleted",
    "under- and over-unlearned": "some criteria find the forget rows better known than never-seen rows, others "
                                 "worse",
    "indistinguishable": "the forget rows look like never-seen holdout rows on every measured criterion",
    "not measured": "nothing could be measured (no holdout set, no evaluation)",
}


def _pair(values: Any, style: NumberStyle) -> str:
    if not values:
        return style.missing
    return "[" + ", ".join("-inf" if v is None and i == 0 else "inf" if v is None else format_number(v, style)
                           for i, v in enumerate(values)) + "]"


def verdict_rows(verdict: dict[str, Any], style: NumberStyle = DETAIL) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a verdict's criteria: name, statistic, value, interval, the band the call
    judges against, p-value, call, evidence file (or why it was not measured)."""
    rows = []
    for c in verdict.get("criteria") or []:
        evidence = c.get("evidence") or ""
        if c.get("call") == "not measured" and c.get("note"):
            evidence = f"{evidence}: {c['note']}" if evidence else c["note"]
        rows.append([c["name"], c.get("statistic", ""), format_number(c.get("value"), style),
                     _pair(c.get("interval"), style), _pair(c.get("band"), style),
                     format_number(c.get("p_value"), style), c.get("call", ""), evidence])
    return VERDICT_HEADER, rows


def _names(verdict: dict[str, Any], key: str) -> str:
    return ", ".join(verdict.get(key) or [])


def verdict_summary(verdict: dict[str, Any]) -> list[str]:
    """The verdict in words, one paragraph per line: the call and what it means, what was measured
    (sizes, the AUC band, the error rate), what was not (and why), and the other models' calls."""
    criteria = verdict.get("criteria") or []
    call, model = verdict.get("call", "not measured"), verdict.get("model", "unlearned")
    words = _CALL_WORDS.get(call, call)
    if call == "over-unlearned" and all(name.startswith("utility:") for name in verdict.get("over") or []):
        words = "it lost utility beyond the tolerance, against the model before unlearning"
    lines = [f"Verdict on the {model} model: **{call}**: {words}."]
    if verdict.get("under"):
        lines.append(f"Under-unlearned on: {_names(verdict, 'under')}.")
    if verdict.get("over"):
        lines.append(f"Over-unlearned on: {_names(verdict, 'over')}.")
    measured = [c for c in criteria if c.get("call") != "not measured"]
    if measured:
        parts = []
        membership = [c for c in measured if c["group"] == "membership"]
        if membership:
            n = membership[0].get("n") or {}
            band = _pair(membership[0].get("band"), SUMMARY)
            aucs = ", ".join(f"{c['statistic'].split('(')[-1].rstrip(')')} {format_number(c['value'], SUMMARY)}"
                             for c in membership)
            parts.append(f"membership-inference AUCs of {n.get('forget', '?')} forget rows against "
                         f"{n.get('holdout', '?')} never-seen holdout rows ({aucs}; 0.5 = cannot tell them apart, "
                         f"indistinguishable inside {band})")
        groups = {"knowledge": "knowledge (forget vs holdout: {})", "durability": "durability ({})",
                  "utility": "utility against the model before unlearning ({})", "oracle": "against the oracle ({})"}
        for group, text in groups.items():
            names = [c["name"].split(":", 1)[1].replace("_", " ") for c in measured if c["group"] == group]
            if names:
                parts.append(text.format(", ".join(names)))
        lines.append("Measured: " + "; ".join(parts) + ".")
        lines.append(f"{verdict.get('n_tests', 0)} statistical criteria share a family-wise error rate of "
                     f"{format_number(verdict.get('alpha'), SUMMARY)} (each judged at "
                     f"{format_number(verdict.get('alpha_per_criterion'))}): indistinguishable means no "
                     "evidence of a difference at that level, not proof of equality.")
    missing = [c for c in criteria if c.get("call") == "not measured"]
    if missing:
        lines.append("Not measured: " + "; ".join(f"{c['name']}: {c.get('note') or 'no evidence'}"
                                                  for c in missing) + ".")
    others = {label: c for label, c in (verdict.get("by_model") or {}).items() if label != model}
    if others:
        lines.append("Other models on the same criteria: "
                     + ", ".join(f"{label} {c}" for label, c in others.items()) + ".")
    memorised = verdict.get("target_memorised")
    if memorised is False:
        lines.append("The target itself treats the forget rows like never-seen ones on membership and knowledge: "
                     "there was little measurable to unlearn (train the target longer, or check the data).")
    return lines
