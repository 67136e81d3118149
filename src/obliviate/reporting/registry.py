"""The registry's leaderboard: finished runs ranked with the one ranking (``reporting.ranking``).

The registry itself (the SQLite store runs record themselves in) is ``obliviate.runs.registry``.
"""

from __future__ import annotations

from dataclasses import dataclass

from obliviate.reporting.ranking import number_or_none, rank
from obliviate.runs.registry import Registry, RunRecord


@dataclass
class LeaderboardRow:
    rank: int | None
    front: int | None
    method: str | None
    run_id: str
    forget_quality: float | None
    model_utility: float | None
    oracle_model_utility: float | None
    path: str



def leaderboard(registry: Registry, benchmark: str | None = None, label: str = "unlearned",
                best_per_method: bool = True) -> list[LeaderboardRow]:
    """Finished runs with a method, ranked by forget quality and model utility of ``label``.

    The rank: first the Pareto front (front 1 = no other run has forget quality AND model
    utility at least as high with one of them higher; front 2 = undominated once front 1 is
    removed; ...), then forget quality, then model utility, both descending. Runs without a
    forget quality come last. A run whose parent (a demo) is also listed is left out, and with
    ``best_per_method`` each method keeps only its best-ranked run.
    """
    runs = [r for r in registry.list_runs(status="done", benchmark=benchmark) if r.method and r.summary(label)]
    ids = {r.id for r in runs}
    runs = [r for r in runs if r.parent_id not in ids]
    rows = [_leader_row(r, label) for r in runs]
    if best_per_method:
        best: dict[str | None, LeaderboardRow] = {}
        for method in {row.method for row in rows}:
            best[method] = rank_rows([row for row in rows if row.method == method])[0]
        rows = list(best.values())
    return rank_rows(rows)


def _leader_row(rec: RunRecord, label: str) -> LeaderboardRow:
    row = rec.summary(label)
    return LeaderboardRow(rank=None, front=None, method=rec.method, run_id=rec.id,
                          forget_quality=number_or_none(row.get("forget_quality")),
                          model_utility=number_or_none(row.get("model_utility")),
                          oracle_model_utility=number_or_none(rec.summary("oracle").get("model_utility")),
                          path=rec.path)


def rank_rows(rows: list[LeaderboardRow]) -> list[LeaderboardRow]:
    """Rows in the one leaderboard order (``reporting.ranking``: Pareto front, then forget quality,
    then model utility; ties by run id), with ``rank`` and ``front`` set."""
    ranked = rank(rows, lambda r: r.forget_quality, lambda r: r.model_utility, tiebreak=lambda r: r.run_id)
    for r in ranked:
        r.item.rank, r.item.front = r.rank, r.front
    return [r.item for r in ranked]
