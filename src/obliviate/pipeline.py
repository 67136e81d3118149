"""The main job: plant knowledge, build the oracle, unlearn, evaluate all three, and judge.

    benchmark -> finetune target (train split) and oracle (retain split, same recipe)
              -> evaluate oracle, then target (forget quality needs the oracle's truth ratios)
              -> unlearn the forget split from the target -> evaluate the unlearned model
              -> privacy of all three (MIA AUC forget vs holdout, PrivLeak vs the oracle, EM/ES)
              -> the two-sided verdict of each model (``evaluation.verdict``: forget vs holdout,
                 under-unlearned / indistinguishable / over-unlearned), table + summary in words

Each stage is its own run directory inside the pipeline's (``target/``, ``oracle/``, ``unlearn/``),
so an interrupted pipeline resumes stage by stage with ``resume=True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from obliviate import api
from obliviate.data.benchmark import Benchmark, load_benchmark
from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat
from obliviate.data.qa import QADataset
from obliviate.evaluation import tofu
from obliviate.evaluation.evaluate import (
    eval_sets_from_benchmark,
    evaluate_likelihoods,
    load_eval,
    logprob_utility,
    save_eval,
    summary_row,
)
from obliviate.evaluation.privacy import privacy_of_models, privacy_pairs, privacy_rows
from obliviate.evaluation.sacrifice import sacrifice_rates
from obliviate.evaluation.scores import ModelScores, StepScores
from obliviate.evaluation.verdict import Evidence, Settings, log_prob_pairs, run_verdict
from obliviate.methods import Procedure, build_method
from obliviate.models.loading import DEFAULT_MODEL, load_tokenizer
from obliviate.reporting.model_card import model_card_info, write_model_card
from obliviate.reporting.tables import SUMMARY, format_number, markdown_table, verdict_summary
from obliviate.runs import RunDir, atomic_write_json, atomic_write_text, read_json
from obliviate.runs.fingerprint import dataset_fingerprint
from obliviate.training import presets
from obliviate.training.loop import planned_steps


@dataclass
class PipelineConfig:
    model: str = DEFAULT_MODEL
    method: str = "npo"
    method_options: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    unlearn: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_length: int = 512
    eval_batch_size: int = 32
    max_new_tokens: int = 200
    verdict: Settings = Settings()  # how the two-sided verdict judges (alpha, bands, tolerances)
    wagle: dict[str, Any] | str | None = None  # WAGLE options or a mask file (obliviate.attribution)
    guard: dict[str, Any] | str | None = None  # GUARD options or a weights file
    # Calibrated unlearning against the holdout split (True, or evaluation.stopping.CalibrationOptions
    # fields): stop where the forget rows look like never-seen rows; gradient methods only.
    calibrate: dict[str, Any] | bool = False


def verdict(evals: dict[str, dict], privacy: dict | None, settings: Settings | None = None) -> dict[str, Any]:
    """The run's verdict (``evaluation.verdict.run_verdict``) from the evaluations and privacy results
    this pipeline wrote, as ``certify`` and the report judge them from the same files."""
    files = {f"eval:{label}": f"eval/{label}.json" for label in evals}
    if privacy is not None:
        files["privacy"] = "privacy.json"
    return run_verdict(Evidence(evals=dict(evals), privacy=dict(privacy or {}), files=files), settings or Settings())


def run_pipeline(bench: Benchmark | str | Path, out: str | Path, cfg: PipelineConfig, *, overwrite: bool = False,
                 resume: bool = False, progress: bool = True, echo=print,
                 shared: dict[str, Path] | None = None) -> dict[str, Any]:
    """Run every stage and return ``{"models": {label: summary row}, "verdict": ...}``.

    ``shared`` lets several runs (``obliviate bench`` cells) reuse one target and one oracle: it
    maps ``target``/``oracle`` to their finetuning run directories and ``target_eval``/
    ``oracle_eval``/``privacy`` to result files, each made by the first run that needs it."""
    bench = bench if isinstance(bench, Benchmark) else load_benchmark(bench)
    config = {"command": "pipeline", "benchmark": bench.source, **asdict(cfg)}
    data = {role: dataset_fingerprint(bench.split(role)) for role in sorted(bench.roles)}
    run = RunDir.open(out, kind="pipeline", fingerprint={"config": config, "data": data}, overwrite=overwrite,
                      resume=resume, inputs=(bench.source, cfg.model))
    run.write_config(config)
    common: dict[str, Any] = dict(dtype=cfg.dtype, system_prompt=cfg.system_prompt, max_length=cfg.max_length,
                                  progress=progress)
    eval_common: dict[str, Any] = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, **common)
    sets = _eval_sets(bench)
    shared = shared or {}

    scores: dict[str, ModelScores] = {}
    holdout = bench.split("holdout") if bench.has("holdout") else None
    # The holdout's perturbed answers too, so its truth ratios come from the same scores.
    privacy_needs = privacy_pairs(bench.split("forget"), holdout) + log_prob_pairs(holdout) \
        if holdout is not None else []

    def evaluated(label: str, model_dir: Path, oracle=None) -> dict:
        # A cell keeps its own copy of every result so it is a complete run directory.
        path, cache = run.file(f"eval/{label}.json"), shared.get(f"{label}_eval")
        for source in (path, cache):
            if source is not None and Path(source).exists() and (resume or source == cache):
                result = load_eval(source)
                if source == cache:
                    save_eval(result, path)
                return result
        echo(f"[obliviate] evaluating {label}")
        evaluation = api.evaluate_scored(model_dir, sets, run.path, label=label, oracle_eval=oracle,
                                         extra_pairs=privacy_needs, **eval_common)
        scores[label] = evaluation.scores  # privacy reads these instead of running the model again
        if cache is not None:
            save_eval(evaluation.result, cache)
        return evaluation.result

    with run.running("pipeline", resume=resume) as life:
        echo("[obliviate] finetuning the target on the train split")
        target = api.finetune(cfg.model, bench.split("train"), shared.get("target", run.file("target")), cfg.finetune,
                              resume=resume or "target" in shared, **common)
        echo("[obliviate] finetuning the oracle on the retain split (same recipe)")
        oracle = api.finetune(cfg.model, bench.split("retain"), shared.get("oracle", run.file("oracle")), cfg.finetune,
                              resume=resume or "oracle" in shared, **common)
        oracle_eval = evaluated("oracle", oracle)
        target_eval = evaluated("target", target, oracle_eval)
        echo(f"[obliviate] unlearning the forget split with {cfg.method}")
        # The calibrated checks and the trajectory points score the model at the same steps: each pair
        # once per step. Step 0 is the target, whose evaluation (when run here) scored the same pairs.
        step_scores = StepScores()
        if "target" in scores:
            step_scores.seed(0, scores["target"])
        trajectory = _Trajectory(run, target, sets, oracle_eval, target_eval, cfg, len(bench.split("forget")), resume,
                                 step_scores)
        unlearned = _unlearn(target, bench, run.file("unlearn"), cfg, resume, common, trajectory.on_eval, step_scores)
        unlearned_eval = evaluated("unlearned", unlearned, oracle_eval)
        trajectory.finish(unlearned_eval, run.file("unlearn"))
        privacy = _privacy(run, bench, {"target": target, "oracle": oracle, "unlearned": unlearned}, cfg, resume,
                           echo, shared.get("privacy"), scores=scores)
        rows = {"target": summary_row(target_eval), "oracle": summary_row(oracle_eval),
                "unlearned": summary_row(unlearned_eval)}
        # The oracle against itself (p = 1 by construction), so the table has no hole.
        oracle_r = oracle_eval["sets"]["forget"]["per_sample"]["truth_ratio_raw"]
        rows["oracle"]["forget_quality"] = tofu.forget_quality(oracle_r, oracle_r)
        for label, ev in (("oracle", oracle_eval), ("unlearned", unlearned_eval)):
            rows[label].update({f"sacrifice_{k}": v for k, v in sacrifice_rates(target_eval, ev).items()})
        if privacy is not None:
            for label, extra in privacy_rows(privacy, "oracle").items():
                rows[label].update(extra)
        evals = {"target": target_eval, "oracle": oracle_eval, "unlearned": unlearned_eval}
        result = {"models": rows, "verdict": verdict(evals, privacy, cfg.verdict), "benchmark": bench.source}
        run.write_json("metrics.json", result)
        atomic_write_text(run.file("summary.md"), summary_markdown(result))
        # The unlearned checkpoint's card, now with the metrics (fingerprints only, never content).
        write_model_card(unlearned, model_card_info(run.path))
        life.children = [run.file(s) for s in ("target", "oracle", "unlearn") if run.file(s).exists()]
    return result


class _Trajectory:
    """Forget quality and utility along the unlearning run, for the report's trade-off curve: the
    target at step 0, the log-prob metrics every ``unlearn.eval_every`` optimizer steps (the loop's
    ``on_eval``; no generation, so no ROUGE and no model utility there), and the unlearned model at
    the last step (its own full evaluation, not repeated here); written to ``trajectory.json`` after
    each point, so a resumed run keeps the points it has. Every point has ``logprob_utility`` (model
    utility without ROUGE, the curve's y); ``generated`` says whether ROUGE and model utility exist."""

    KEYS = ("forget_quality", "model_utility", "logprob_utility", "forget_rouge", "forget_probability",
            "forget_truth_ratio", "retain_rouge")

    def __init__(self, run: RunDir, target: Path, sets, oracle_eval: dict, target_eval: dict, cfg: PipelineConfig,
                 n_forget: int, resume: bool, step_scores: StepScores):
        self.run, self.target, self.sets, self.oracle_eval, self.cfg = run, target, sets, oracle_eval, cfg
        self.step_scores = step_scores
        train = presets.train_config(cfg.unlearn, presets.UNLEARN)  # what api.unlearn will train with
        self.every, self.last = train.eval_every, planned_steps(train, n_forget)
        self.points = {row["step"]: row for row in run.read_json("trajectory.json")} \
            if resume and run.has("trajectory.json") else {}
        self.points[0] = self._row(0, target_eval)
        self.fmt: ChatFormat | None = None

    def _row(self, step: int, result: dict) -> dict:
        row = summary_row(result)
        return {"step": step, "generated": True, **{k: row.get(k) for k in self.KEYS},
                "logprob_utility": logprob_utility(row)}

    def _write(self) -> None:
        if self.every:
            self.run.write_json("trajectory.json", [self.points[s] for s in sorted(self.points)])

    @property
    def on_eval(self):
        # A procedure (UniErase) has no steps to evaluate along the way.
        gradient = not isinstance(build_method(self.cfg.method, **self.cfg.method_options), Procedure)
        return self._evaluate if self.every and gradient else None

    def _evaluate(self, model, step: int) -> None:
        if step >= self.last:
            return  # the unlearned model's own evaluation is this point (finish)
        if self.fmt is None:
            self.fmt = ChatFormat(load_tokenizer(str(self.target)), system_prompt=self.cfg.system_prompt,
                                  max_length=self.cfg.max_length)
        # log-prob metrics only: generation (ROUGE, model utility) runs for the final models alone
        row = evaluate_likelihoods(model, self.sets, self.fmt, batch_size=self.cfg.eval_batch_size,
                                   oracle=self.oracle_eval, scores_held=self.step_scores.at(step, self.fmt))
        self.points[step] = {"step": step, "generated": False, **{k: row.get(k) for k in self.KEYS}}
        self._write()

    def finish(self, unlearned_eval: dict, unlearn_dir: Path) -> None:
        stats = unlearn_dir / "train_stats.json"
        if self.every and stats.exists():
            recorded = read_json(stats)
            # A calibrated run keeps the weights of its best check, not necessarily its last step's.
            best = recorded.get("best_step")
            steps = int(recorded["steps"] if best is None else best)
            self.points[steps] = self._row(steps, unlearned_eval)
            self._write()


def calibration_forget(bench: Benchmark) -> QADataset:
    """The forget split, or its evaluation copy when that holds the same rows (question and answer, in
    order) with paraphrased and perturbed answers: calibrated stopping's truth-ratio test needs them,
    and training reads question and answer only, so it trains on the same data either way."""
    forget = bench.split("forget")
    if bench.has("eval_forget"):
        rich = bench.split("eval_forget")
        if [(e.question, e.answer) for e in rich] == [(e.question, e.answer) for e in forget]:
            return rich
    return forget


def _unlearn(target: Path, bench: Benchmark, out: Path, cfg: PipelineConfig, resume: bool, common: dict,
             on_eval=None, step_scores: StepScores | None = None) -> Path:
    # Calibrated against the holdout split; a benchmark without one says so (--no-calibrate runs without).
    calibrate = cfg.calibrate and not isinstance(build_method(cfg.method, **cfg.method_options), Procedure)
    forget = calibration_forget(bench) if calibrate else bench.split("forget")
    return api.unlearn(target, forget, bench.split("retain"), out, method=cfg.method,
                       method_options=cfg.method_options, train=cfg.unlearn, resume=resume, wagle=cfg.wagle,
                       guard=cfg.guard, on_eval=on_eval, holdout=bench.split("holdout") if calibrate else None,
                       calibrate=cfg.calibrate if calibrate else False, step_scores=step_scores, **common)


def _privacy(run: RunDir, bench: Benchmark, models: dict[str, Path], cfg: PipelineConfig, resume: bool,
             echo, cache: Path | None = None, scores: dict[str, ModelScores] | None = None) -> dict | None:
    """MIA AUCs (forget vs holdout), EM/ES of each model, with the base model as the reference
    attack's reference; written to ``privacy.json``. None when the benchmark has no holdout split.
    ``cache`` holds the target's and oracle's results for runs that share them. ``scores`` (label ->
    the scores of that model's evaluation, made with ``extra_pairs=privacy_pairs(forget, holdout)``)
    spare running those models again: only the reference model is run, once."""
    if not bench.has("holdout"):
        return None
    if resume and run.has("privacy.json"):
        return run.read_json("privacy.json")
    echo("[obliviate] privacy evaluation (membership inference, memorisation)")
    done = read_json(cache) if cache is not None and Path(cache).exists() else {}
    todo = {label: path for label, path in models.items() if label not in done}
    results = {**done, **privacy_of_models(todo, bench.split("forget"), bench.split("holdout"), reference=cfg.model,
                                           dtype=cfg.dtype, system_prompt=cfg.system_prompt,
                                           max_length=cfg.max_length, batch_size=cfg.eval_batch_size,
                                           scores=scores)}
    if cache is not None and not done:
        atomic_write_json(cache, {k: v for k, v in results.items() if k in ("target", "oracle")})
    run.write_json("privacy.json", results)
    return results


def _eval_sets(bench: Benchmark):
    return eval_sets_from_benchmark(bench)


COLUMNS = [("mia_auc_loss", "AUC LOSS"), ("mia_auc_zlib", "AUC zlib"), ("mia_auc_mink", "AUC Min-K%"),
           ("mia_auc_minkpp", "AUC Min-K%++"), ("forget_quality", "forget quality"), ("model_utility", "model utility"),
           ("forget_rouge", "forget ROUGE-L"), ("holdout_rouge", "holdout ROUGE-L"), ("retain_rouge", "retain ROUGE-L")]


def summary_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The run's table (header, rows): a row per model with its two-sided verdict (forget vs holdout)
    and the :data:`COLUMNS` (membership AUCs forget vs holdout first: 0.5 is a never-seen set) in the
    summary style; what the CLI prints and summary.md holds."""
    calls = (result.get("verdict") or {}).get("by_model") or {}
    header = ["model", "verdict"] + [title for _, title in COLUMNS]
    rows = [[label, calls.get(label, "-")] + [format_number(row.get(k), SUMMARY) for k, _ in COLUMNS]
            for label, row in result["models"].items()]
    return header, rows


def summary_markdown(result: dict[str, Any]) -> str:
    """summary.md: the table, then the verdict in words (``reporting.tables.verdict_summary``)."""
    return "\n\n".join([markdown_table(*summary_table(result)), *verdict_summary(result["verdict"])]) + "\n"
