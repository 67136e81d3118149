"""The main job: plant knowledge, build the oracle, unlearn, evaluate all three, and judge.

    benchmark -> finetune target (train split) and oracle (retain split, same recipe)
              -> evaluate oracle, then target (forget quality needs the oracle's truth ratios)
              -> unlearn the forget split from the target -> evaluate the unlearned model
              -> privacy of all three (MIA AUC forget vs holdout, PrivLeak vs the oracle, EM/ES)
              -> table + verdict, written to the run directory

Each stage is its own run directory inside the pipeline's (``target/``, ``oracle/``, ``unlearn/``),
so an interrupted pipeline resumes stage by stage with ``resume=True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from obliviate import api
from obliviate.data.benchmark import Benchmark, load_benchmark
from obliviate.models.loading import DEFAULT_MODEL
from obliviate.runs import RunDir, atomic_write_text


@dataclass
class Thresholds:
    """What "forgotten" and "utility kept" mean in the verdict."""

    min_forget_quality: float = 0.05  # KS p-value vs the oracle: no evidence the two differ
    max_forget_rouge_gap: float = 0.1  # unlearned forget ROUGE at most this far above the oracle's
    min_utility_ratio: float = 0.9  # unlearned model utility >= this x the target's


@dataclass
class PipelineConfig:
    model: str = DEFAULT_MODEL
    method: str = "npo"
    method_options: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    unlearn: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    system_prompt: str | None = api.DEFAULT_SYSTEM_PROMPT
    max_length: int = 512
    eval_batch_size: int = 32
    max_new_tokens: int = 200
    thresholds: Thresholds = field(default_factory=Thresholds)


def verdict(rows: dict[str, dict[str, Any]], t: Thresholds) -> dict[str, Any]:
    u, o, tgt = rows["unlearned"], rows["oracle"], rows["target"]
    fq = u.get("forget_quality")
    rouge_gap = u["forget_rouge"] - o["forget_rouge"]
    forgotten = fq is not None and fq >= t.min_forget_quality and rouge_gap <= t.max_forget_rouge_gap
    mu_t, mu_u = tgt.get("model_utility"), u.get("model_utility")
    ratio = (mu_u / mu_t) if mu_t else None
    kept = ratio is not None and ratio >= t.min_utility_ratio
    return {
        "forgotten": forgotten,
        "utility_kept": kept,
        "forget_quality": fq,
        "forget_rouge_gap_to_oracle": round(rouge_gap, 4),
        "utility_ratio_to_target": None if ratio is None else round(ratio, 4),
        "thresholds": asdict(t),
        "target_memorised": tgt["forget_rouge"] > o["forget_rouge"],
    }


def run_pipeline(bench: Benchmark | str | Path, out: str | Path, cfg: PipelineConfig, *, overwrite: bool = False,
                 resume: bool = False, progress: bool = True, echo=print) -> dict[str, Any]:
    """Run every stage and return ``{"models": {label: summary row}, "verdict": ...}``."""
    from obliviate.evaluation.evaluate import load_eval, summary_row
    from obliviate.evaluation.tofu import forget_quality
    from obliviate.reporting.model_card import model_card_info, write_model_card

    bench = bench if isinstance(bench, Benchmark) else load_benchmark(bench)
    run = RunDir.create(out, overwrite=overwrite, resume=resume and Path(out).exists())
    run.write_config({"command": "pipeline", "benchmark": bench.source, **asdict(cfg)})
    run.set_status("running")
    recorder = api.RunRecorder(run, "pipeline", resume)
    common = dict(dtype=cfg.dtype, system_prompt=cfg.system_prompt, max_length=cfg.max_length, progress=progress)
    eval_common = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, **common)
    sets = _eval_sets(bench)

    def evaluated(label: str, model_dir: Path, oracle=None) -> dict:
        path = run.file(f"eval/{label}.json")
        if resume and path.exists():
            return load_eval(path)
        echo(f"[obliviate] evaluating {label}")
        return api.evaluate(model_dir, sets, run.path, label=label, oracle_eval=oracle, **eval_common)

    try:
        echo("[obliviate] finetuning the target on the train split")
        target = api.finetune(cfg.model, bench.split("train"), run.file("target"), cfg.finetune, resume=resume, **common)
        echo("[obliviate] finetuning the oracle on the retain split (same recipe)")
        oracle = api.finetune(cfg.model, bench.split("retain"), run.file("oracle"), cfg.finetune, resume=resume, **common)
        oracle_eval = evaluated("oracle", oracle)
        target_eval = evaluated("target", target, oracle_eval)
        echo(f"[obliviate] unlearning the forget split with {cfg.method}")
        unlearned = api.unlearn(target, bench.split("forget"), bench.split("retain"), run.file("unlearn"),
                                method=cfg.method, method_options=cfg.method_options, train=cfg.unlearn,
                                resume=resume, **common)
        unlearned_eval = evaluated("unlearned", unlearned, oracle_eval)
        privacy = _privacy(run, bench, {"target": target, "oracle": oracle, "unlearned": unlearned}, cfg, resume,
                           echo)
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        recorder.finish("failed")
        raise
    rows = {"target": summary_row(target_eval), "oracle": summary_row(oracle_eval),
            "unlearned": summary_row(unlearned_eval)}
    # The oracle against itself (p = 1 by construction), so the table has no hole.
    oracle_r = oracle_eval["sets"]["forget"]["per_sample"]["truth_ratio_raw"]
    rows["oracle"]["forget_quality"] = forget_quality(oracle_r, oracle_r)
    if privacy is not None:
        from obliviate.evaluation.privacy import privacy_rows

        for label, extra in privacy_rows(privacy, "oracle").items():
            rows[label].update(extra)
    result = {"models": rows, "verdict": verdict(rows, cfg.thresholds), "benchmark": bench.source}
    run.write_json("metrics.json", result)
    atomic_write_text(run.file("summary.md"), summary_markdown(result))
    # The unlearned checkpoint's card, now with the metrics (fingerprints only, never content).
    write_model_card(unlearned, model_card_info(run.path))
    run.set_status("done")
    recorder.finish("done", children=tuple(run.file(s) for s in ("target", "oracle", "unlearn")))
    return result


def _privacy(run: RunDir, bench: Benchmark, models: dict[str, Path], cfg: PipelineConfig, resume: bool,
             echo) -> dict | None:
    """MIA AUCs (forget vs holdout), EM/ES of each model, with the base model as the reference
    attack's reference; written to ``privacy.json``. None when the benchmark has no holdout split."""
    from obliviate.evaluation.privacy import privacy_of_models

    if not bench.has("holdout"):
        return None
    if resume and run.has("privacy.json"):
        return run.read_json("privacy.json")
    echo("[obliviate] privacy evaluation (membership inference, memorisation)")
    results = privacy_of_models(models, bench.split("forget"), bench.split("holdout"), reference=cfg.model,
                                dtype=cfg.dtype, system_prompt=cfg.system_prompt, max_length=cfg.max_length,
                                batch_size=cfg.eval_batch_size)
    run.write_json("privacy.json", results)
    return results


def _eval_sets(bench: Benchmark):
    from obliviate.evaluation.evaluate import eval_sets_from_benchmark

    return eval_sets_from_benchmark(bench)


COLUMNS = [("forget_quality", "forget quality"), ("model_utility", "model utility"), ("forget_rouge", "forget ROUGE-L"),
           ("forget_probability", "forget prob."), ("forget_truth_ratio", "forget truth ratio"),
           ("retain_rouge", "retain ROUGE-L")]


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2e}" if isinstance(x, float) and 0 < abs(x) < 1e-3 else f"{x:.3f}"


def summary_markdown(result: dict[str, Any]) -> str:
    lines = ["| model | " + " | ".join(c for _, c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, row in result["models"].items():
        lines.append(f"| {label} | " + " | ".join(_fmt(row.get(k)) for k, _ in COLUMNS) + " |")
    v = result["verdict"]
    lines += ["", f"Forgotten: **{'yes' if v['forgotten'] else 'no'}** (forget quality {_fmt(v['forget_quality'])}, "
              f"forget ROUGE {v['forget_rouge_gap_to_oracle']:+.3f} vs the oracle).",
              f"Utility kept: **{'yes' if v['utility_kept'] else 'no'}** (unlearned / target model utility = "
              f"{_fmt(v['utility_ratio_to_target'])}).",
              f"Target memorised the forget set: {'yes' if v['target_memorised'] else 'NO: unlearning is not meaningful'}."]
    return "\n".join(lines) + "\n"
