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
