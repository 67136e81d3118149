"""The one ranking of unlearning results, used by ``obliviate bench``'s leaderboard and the registry's.

Rule (kept from the registry): Pareto fronts on forget quality and model utility first, then forget
quality, then model utility, both descending; results missing either number come last, by utility.
Front 1 holds the results no other result beats on one number without losing on the other; front 2
those left undominated once front 1 is removed; and so on.

Why Pareto first rather than forget quality alone (the bench's former rule): forget quality says
how well the forget set is gone, utility what the model can still do, and neither is worth having
without the other. By forget quality alone, (forget quality, utility) A = (0.5, 0.1), B = (0.4, 0.9)
and C = (0.45, 0.05) rank A, C, B: C, which A beats on both numbers, above B, which nothing beats.
Pareto fronts rank A, B (front 1), then C. Within a front every result trades one number for the
other and forget quality decides, so rank 1 is the same under both rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Ranked(Generic[T]):
    rank: int
    front: int | None  # None: the item lacks forget quality or model utility
    item: T


def number_or_none(value: Any) -> float | None:
    """A metric as a number to rank by, or None (missing) for anything else, booleans and NaN included."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def rank(items: Sequence[T], forget_quality: Callable[[T], float | None], model_utility: Callable[[T], float | None],
         tiebreak: Callable[[T], Any] | None = None) -> list[Ranked[T]]:
    """``items`` in rank order (see the module docstring), numbered 1..n, with their Pareto front.

    ``tiebreak`` orders items equal on front and both numbers (default: their order in ``items``).
    """
    def key(i: int) -> Any:
        return tiebreak(items[i]) if tiebreak is not None else i

    raw = [(forget_quality(x), model_utility(x)) for x in items]
    points = {i: (fq, mu) for i, (fq, mu) in enumerate(raw) if fq is not None and mu is not None}
    scored, unscored = list(points), [i for i in range(len(items)) if i not in points]
    front: dict[int, int] = {}
    remaining, layer_no = list(scored), 0
    while remaining:
        layer_no += 1
        layer = [i for i in remaining if not any(_dominates(points[o], points[i]) for o in remaining)]
        front.update((i, layer_no) for i in layer)
        remaining = [i for i in remaining if i not in front]
    scored.sort(key=lambda i: (front[i], -points[i][0], -points[i][1], key(i)))

    def utility(i: int) -> float:
        mu = raw[i][1]
        return mu if mu is not None else -math.inf

    unscored.sort(key=lambda i: (-utility(i), key(i)))
    return [Ranked(n, front.get(i), items[i]) for n, i in enumerate(scored + unscored, 1)]
