"""The Python API; the CLI is a thin layer over these functions.

    import obliviate
    target = obliviate.finetune("smollm2-135m", "data/bench:full", "runs/target")
    oracle = obliviate.finetune("smollm2-135m", "data/bench:retain", "runs/oracle")
    obliviate.unlearn(target, "data/bench:forget", "data/bench:retain", "runs/npo", method="npo")
    obliviate.evaluate("runs/npo/model", "data/bench", "runs/npo", label="unlearned",
                       oracle_eval="runs/oracle/eval/oracle.json")

Each function only composes the layers below: data specs become rows (``data.sources``), a run
directory is opened and closed (``runs``), a method is built (``methods``) and trained
(``training``) or applied, and the model is evaluated (``evaluation``). Every call refuses to
overwrite a run unless ``overwrite=True``; ``resume=True`` continues an interrupted run with the same
inputs and options (a finished one is returned as is).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from obliviate.attribution import jsonable_options, parse_guard, parse_wagle, prepare_attribution
from obliviate.data.benchmark import load_benchmark
from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat
from obliviate.data.multiple_choice import MCSet, load_mc_sets
from obliviate.data.qa import QADataset
from obliviate.data.sources import DataSpec, as_dataset
from obliviate.errors import UserError
from obliviate.evaluation import lm_eval_bridge
from obliviate.evaluation.engines import VLLMGreedy, check_engine
from obliviate.evaluation.evaluate import (
    check_length_budget,
    eval_sets_from_benchmark,
    evaluate_with_scores,
    load_eval,
    save_eval,
    summary_row,
)
from obliviate.evaluation.multiple_choice import evaluate_mc_sets
from obliviate.evaluation.scores import ModelScores, Pair, StepScores
from obliviate.evaluation.stopping import HOLDOUT_NEEDED, CalibratedCheck, CalibrationOptions
from obliviate.methods import Procedure, build_method
from obliviate.models.fingerprint import model_sha256
from obliviate.models.loading import check_model_spec, load_model, load_tokenizer, resolve_model_path, save_checkpoint
from obliviate.processes import processes
from obliviate.reporting.model_card import model_card_info, write_model_card
from obliviate.runs import RunDir, RunError, safe_name
from obliviate.runs.fingerprint import dataset_fingerprint, sha256_path
from obliviate.training import presets
from obliviate.training.config import TrainConfig
from obliviate.training.loop import train as train_loop

__all__ = ["finetune", "unlearn", "evaluate", "evaluate_scored", "ScoredEvaluation", "DEFAULT_SYSTEM_PROMPT"]


def finetune(model: str, data: DataSpec, out: str | Path, train: TrainConfig | dict | None = None, *,
             dtype: str = "float32", system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_length: int = 512,
             skip_bad: bool = False, overwrite: bool = False, resume: bool = False, progress: bool = True,
             trust_remote_code: bool = False) -> Path:
    """Finetune ``model`` on a QA set (to plant knowledge: the target; on retain only: the oracle).
    Returns the directory of the finetuned checkpoint."""
    train = presets.train_config(train, presets.FINETUNE)
    check_model_spec(str(model))  # a mistyped path fails now, not on the hub
    ds = as_dataset(data, skip_bad)  # bad data fails before any run directory is made
    config = {"command": "finetune", "model": str(model), "data": ds.source, "dtype": dtype,
              "system_prompt": system_prompt, "max_length": max_length, "train": train.to_dict()}
    run, config = _open_run(out, config, {"train": ds}, overwrite=overwrite, resume=resume, inputs=(model, data))
    if run.status() == "done":
        return run.file("model")
    with run.running("finetune", resume=resume):
        tokenizer, net, fmt = _load(model, dtype, system_prompt, max_length, trust_remote_code)
        return _train(run, net, tokenizer, fmt, build_method("sft"), ds, train, retain=None, resume=resume,
                      progress=progress, description="finetune")


def unlearn(model: str | Path, forget: DataSpec, retain: DataSpec | None, out: str | Path, method: str = "npo",
            method_options: dict[str, Any] | None = None, train: TrainConfig | dict | None = None, *,
            dtype: str = "float32", system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_length: int = 512,
            skip_bad: bool = False, overwrite: bool = False, resume: bool = False, progress: bool = True,
            trust_remote_code: bool = False, sample_weights: torch.Tensor | None = None,
            param_masks: dict[str, torch.Tensor] | None = None,
            on_eval: Callable[[torch.nn.Module, int], None] | None = None,
            extra_config: dict[str, Any] | None = None, wagle: Any = None, guard: Any = None,
            general: DataSpec | None = None, log: Callable[[str], None] | None = None,
            holdout: DataSpec | None = None, calibrate: bool | dict[str, Any] | CalibrationOptions = False,
            step_scores: StepScores | None = None) -> Path:
    """Unlearn ``forget`` from ``model`` with a method from ``obliviate.methods`` (``obliviate methods``
    lists them), keeping ``retain``. Returns the directory of the unlearned checkpoint.

    Gradient methods train with ``train``; a procedure (UniErase) edits the model in one go and
    ignores ``train``. ``wagle``: a WAGLE mask file, or options to compute one (``{"rho": 0.2, ...}``,
    ``attribution.WagleConfig``); ``guard``: a GUARD weights file, or options (``{"tau": 1.0, ...}``,
    ``attribution.GuardConfig``). Computed ones are saved in the run (docs/attribution.md).
    ``general``: extra data a procedure preserves (UniErase's general-knowledge set); ``log`` receives
    a procedure's progress messages.

    ``calibrate`` (True or ``evaluation.stopping.CalibrationOptions`` / their mapping) with a ``holdout``
    (records of the forget set's kind the model never saw): calibrated unlearning. Every
    ``train.check_every`` optimizer steps (0: every epoch) forget and holdout rows are scored with
    log-probs only; training stops once the membership AUCs and knowledge tests are inside their band,
    the checkpoint closest to the band's centre is kept, and forget rows that already look like holdout
    rows stop contributing (per-sample gating). The path is logged in ``checks.jsonl``. ``step_scores``
    (``evaluation.scores.StepScores``) shares the checks' scores with ``on_eval`` at the same step, and
    may hold the model's scores for step 0."""
    method_options = dict(method_options or {})
    built = build_method(method, **method_options)
    procedure = isinstance(built, Procedure)
    train = presets.train_config(train, presets.UNLEARN)
    wagle, guard = parse_wagle(wagle), parse_guard(guard)  # bad options fail before the run directory
    calibration = CalibrationOptions.parse(calibrate)
    if calibration is not None and holdout is None:
        raise UserError(f"{HOLDOUT_NEEDED}: give one (--holdout FILE)")
    if holdout is not None and calibration is None:
        raise UserError("a holdout is used by calibrated unlearning: add --calibrate (calibrate=True), or leave "
                        "out --holdout")
    if procedure and calibration is not None:
        raise ValueError(f"method '{method}' edits the model in one go: calibrated stopping applies to gradient "
                         "methods only")
    if procedure and (wagle is not None or guard is not None or param_masks is not None
                      or sample_weights is not None or on_eval is not None):
        raise ValueError(f"method '{method}' edits the model in one go: WAGLE, GUARD, masks, sample weights "
                         "and evaluation during training apply to gradient methods only")
    if wagle is not None and train.lora:
        raise ValueError("WAGLE masks the model's own weights; it cannot be combined with LoRA (set lora off)")
    check_model_spec(str(model))
    if general is not None and not procedure:
        raise ValueError(f"general data is used by procedures (unierase), not by '{method}'")
    datasets = {"forget": as_dataset(forget, skip_bad)}  # bad input fails before any run directory is made
    if retain is not None:
        datasets["retain"] = as_dataset(retain, skip_bad)
    if general is not None:
        datasets["general"] = as_dataset(general, skip_bad)
    if holdout is not None:
        datasets["holdout"] = as_dataset(holdout, skip_bad)
    config = {"command": "unlearn", "model": str(model), "method": method, "method_options": method_options,
              "forget": datasets["forget"].source, "retain": datasets["retain"].source if retain is not None else None,
              "dtype": dtype, "system_prompt": system_prompt, "max_length": max_length,
              **({"general": datasets["general"].source} if general is not None else {}),
              **({"holdout": datasets["holdout"].source, "calibrate": calibration.to_json()}
                 if calibration is not None else {}),
              **({} if procedure else {"train": train.to_dict()}),
              **_attribution_options(wagle, guard), **(extra_config or {})}
    run, config = _open_run(out, config, datasets, overwrite=overwrite, resume=resume,
                            inputs=(model, forget, retain, general, holdout))
    if run.status() == "done":
        return run.file("model")
    forget_ds, retain_ds = datasets["forget"], datasets.get("retain")
    with run.running("unlearn", resume=resume):
        tokenizer, net, fmt = _load(model, dtype, system_prompt, max_length, trust_remote_code)
        if isinstance(built, Procedure):
            result = built.apply(net, tokenizer, forget_ds, retain_ds, fmt, general=datasets.get("general"), log=log)
            out_dir = run.file("model")
            if run.writer:  # the statistics travel with the checkpoint (model/<method>.json)
                save_checkpoint(result.model, result.tokenizer, out_dir)
                run.write_json(f"model/{built.name}.json", result.stats)
        else:
            if wagle is not None or guard is not None:
                param_masks, sample_weights, attribution_config = prepare_attribution(
                    run, net, fmt, built, forget_ds, retain_ds, lora=train.lora, wagle=wagle, guard=guard,
                    param_masks=param_masks, sample_weights=sample_weights, resume=resume)
                run.write_config({**config, **attribution_config}, seed=train.seed)
            on_check = (CalibratedCheck(fmt, forget_ds, datasets["holdout"], calibration, step_scores)
                        if calibration is not None else None)
            out_dir = _train(run, net, tokenizer, fmt, built, forget_ds, train, retain=retain_ds, resume=resume,
                             progress=progress, description=f"unlearn ({method})", sample_weights=sample_weights,
                             param_masks=param_masks, on_eval=on_eval, on_check=on_check)
        if run.writer:
            write_model_card(out_dir, model_card_info(run.path))
    return out_dir


def evaluate(model: str | Path, benchmark: str | Path | dict[str, QADataset], out: str | Path | None = None, *,
             label: str = "model", forget_split: str = "forget10", oracle_eval: str | Path | dict | None = None,
             batch_size: int = 32, max_new_tokens: int = 200, dtype: str = "float32",
             system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_length: int = 512, progress: bool = True,
             trust_remote_code: bool = False, model_obj=None, tokenizer=None, scored_tokens: str = "labels",
             mc: Sequence[str | MCSet] = (), mc_list_choices: bool = False, lm_eval: Sequence[str] = (),
             lm_eval_limit: int | None = None, lm_eval_include: str | Path | None = None,
             length_budget: float | None = None, engine: str = "obliviate") -> dict:
    """TOFU evaluation of ``model`` on a benchmark (directory, TOFU directory or hub id) or on given
    sets. With ``out``, writes ``out/eval/<label>.json`` (and records it in the run registry).
    ``oracle_eval`` (the oracle's eval result or its path) gives forget quality. Returns the
    ``eval.json`` dict. ``scored_tokens``: "labels" scores each answer with its closing end-of-turn
    token (as training and the field's reference framework do), "answer" the answer's tokens alone.

    ``mc``: multiple-choice sets (``NAME=FILE_OR_HUB_ID`` or sets; ``evaluation.multiple_choice``),
    in ``multiple_choice`` of the result; ``mc_list_choices`` lists the lettered choices in their
    prompts. ``lm_eval``: lm-evaluation-harness tasks run on the same loaded model
    (``evaluation.lm_eval_bridge``; at most ``lm_eval_limit`` documents each, local task YAML files
    under ``lm_eval_include``), summarised in ``lm_eval`` of the result, in full in
    ``out/lm_eval/<label>.json``. ``length_budget`` (a factor, default off) bounds each set's
    generations to that many times its longest reference answer (``evaluate.set_token_budgets``).
    ``engine``: "obliviate" decodes the greedy answers itself, "vllm" has vLLM make them (a GPU and
    ``pip install vllm``; ``evaluation.engines``)."""
    return evaluate_scored(model, benchmark, out, label=label, forget_split=forget_split, oracle_eval=oracle_eval,
                           batch_size=batch_size, max_new_tokens=max_new_tokens, dtype=dtype,
                           system_prompt=system_prompt, max_length=max_length, progress=progress,
                           trust_remote_code=trust_remote_code, model_obj=model_obj, tokenizer=tokenizer,
                           scored_tokens=scored_tokens, mc=mc, mc_list_choices=mc_list_choices, lm_eval=lm_eval,
                           lm_eval_limit=lm_eval_limit, lm_eval_include=lm_eval_include,
                           length_budget=length_budget, engine=engine).result


def evaluate_scored(model: str | Path, benchmark: str | Path | dict[str, QADataset], out: str | Path | None = None,
                    *, label: str = "model", forget_split: str = "forget10",
                    oracle_eval: str | Path | dict | None = None, batch_size: int = 32, max_new_tokens: int = 200,
                    dtype: str = "float32", system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_length: int = 512,
                    progress: bool = True, trust_remote_code: bool = False, model_obj=None, tokenizer=None,
                    extra_pairs: Sequence[Pair] = (), scored_tokens: str = "labels", mc: Sequence[str | MCSet] = (),
                    mc_list_choices: bool = False, lm_eval: Sequence[str] = (), lm_eval_limit: int | None = None,
                    lm_eval_include: str | Path | None = None,
                    length_budget: float | None = None, engine: str = "obliviate") -> ScoredEvaluation:
    """:func:`evaluate`, also returning the model's per-token scores (``evaluation.scores``), so that
    privacy, exposure and attacks read them instead of running the model again; ``extra_pairs``
    (e.g. ``evaluation.privacy.privacy_pairs``) are scored too."""
    label = safe_name(label, "--label")
    check_length_budget(length_budget)
    check_engine(engine)
    if engine == "vllm" and processes().num_processes > 1:
        raise UserError("--engine vllm runs in one process: run obliviate evaluate without accelerate launch")
    if model_obj is None:
        check_model_spec(str(model))
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise RunError(f"{out} is a file, not a directory: give --out a directory")
    sets = benchmark if isinstance(benchmark, dict) else \
        eval_sets_from_benchmark(load_benchmark(benchmark, forget_split))
    oracle = load_eval(oracle_eval) if isinstance(oracle_eval, (str, Path)) else oracle_eval
    mc_sets = load_mc_sets(mc)  # bad files and unknown tasks fail before the model loads
    lm_plan = lm_eval_bridge.plan_lm_eval(lm_eval, lm_eval_limit, lm_eval_include) if lm_eval else None
    if tokenizer is None:
        tokenizer = load_tokenizer(str(model), trust_remote_code=trust_remote_code)
    if model_obj is None:
        model_obj = load_model(str(model), dtype=dtype, device=processes().device, trust_remote_code=trust_remote_code)
    fmt = ChatFormat(tokenizer, system_prompt=system_prompt, max_length=max_length, scored_tokens=scored_tokens)
    start = time.time()
    state = processes()  # under accelerate launch: batches split across processes, merged in order
    generate = VLLMGreedy(resolve_model_path(str(model)), dtype=dtype, trust_remote_code=trust_remote_code) \
        if engine == "vllm" else None
    evaluation = evaluate_with_scores(model_obj, tokenizer, sets, fmt=fmt, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens, oracle=oracle,
                                      progress=progress and state.is_main_process, label=label,
                                      distributed=state.num_processes > 1, extra_pairs=extra_pairs,
                                      length_budget=length_budget, generate=generate)
    evaluation.result.multiple_choice = evaluate_mc_sets(model_obj, fmt, mc_sets, batch_size,
                                                         list_choices=mc_list_choices,
                                                         distributed=state.num_processes > 1)
    lm_run = lm_eval_bridge.run_lm_eval(model_obj, tokenizer, lm_plan, batch_size=batch_size) if lm_plan else None
    if lm_run is not None:
        evaluation.result.extra["lm_eval"] = {**lm_eval_bridge.summary(lm_run),
                                              **({"file": f"lm_eval/{label}.json"} if out is not None else {})}
    result = evaluation.result.to_json()
    result["seconds"] = round(time.time() - start, 3)
    if out is not None and state.is_main_process:
        run = RunDir(out)
        path = save_eval(result, run.file("eval", f"{label}.json"))
        if lm_run is not None:
            lm_eval_bridge.save_lm_eval(lm_run, run.file("lm_eval", f"{label}.json"))
        run.record_result(path, "eval", model=str(model), metrics={"models": {label: summary_row(result)}})
    state.wait_for_everyone()
    return ScoredEvaluation(result, evaluation.scores)


@dataclass
class ScoredEvaluation:
    """An evaluation's ``eval.json`` dict and the per-token scores it was computed from."""

    result: dict[str, Any]
    scores: ModelScores


# -- composition steps ----------------------------------------------------------------------------


def _open_run(out: str | Path, config: dict[str, Any], datasets: dict[str, QADataset], *, overwrite: bool,
              resume: bool, inputs: tuple) -> tuple[RunDir, dict[str, Any]]:
    """Open the run with the fingerprint of its model, data and options; write its config and data
    fingerprints (a resumed run already has the same ones). Returns the run and the config as written
    (with the model's sha256)."""
    config = {**config, "model_sha256": model_sha256(config["model"])}
    data = {role: dataset_fingerprint(ds) for role, ds in datasets.items()}
    run = RunDir.open(out, kind=config["command"], fingerprint={"config": config, "data": data},
                      overwrite=overwrite, resume=resume, inputs=inputs)
    if run.status() != "done":
        run.write_config(config, seed=config.get("train", {}).get("seed"))
        run.write_json("data.json", data)
    return run, config


def _attribution_options(wagle, guard) -> dict[str, Any]:
    """WAGLE / GUARD as the user gave them (options, or a file with its sha256): part of the run's
    fingerprint, so a resumed run uses the same ones."""
    out: dict[str, Any] = {}
    for key, spec in (("wagle", wagle), ("guard", guard)):
        if isinstance(spec, Path):
            out[key] = {"file": str(spec), "sha256": sha256_path(spec)}
        elif spec is not None:
            out[key] = jsonable_options(vars(spec))
    return out


def _load(model: str | Path, dtype: str, system_prompt: str | None, max_length: int, trust_remote_code: bool):
    tokenizer = load_tokenizer(str(model), trust_remote_code=trust_remote_code)
    net = load_model(str(model), dtype=dtype, device=processes().device, trust_remote_code=trust_remote_code)
    return tokenizer, net, ChatFormat(tokenizer, system_prompt=system_prompt, max_length=max_length)


def _train(run: RunDir, model, tokenizer, fmt: ChatFormat, method, primary: QADataset, train: TrainConfig, *,
           retain: QADataset | None, resume: bool, progress: bool, description: str, sample_weights=None,
           param_masks=None, on_eval=None, on_check=None) -> Path:
    result = train_loop(model, tokenizer, method, primary, train, retain=retain, fmt=fmt, run=run, resume=resume,
                        sample_weights=sample_weights, param_masks=param_masks, on_eval=on_eval, on_check=on_check,
                        progress=progress, description=description)
    out = run.file("model")
    if run.writer:  # under FSDP/DeepSpeed the loop gathered the full state dict for this process
        save_checkpoint(result.model, tokenizer, out, merge_lora=train.merge_lora, state_dict=result.state_dict)
    processes().wait_for_everyone()  # every process returns a checkpoint that exists
    run.write_json("train_stats.json", {"steps": result.steps, "seconds": round(result.seconds, 3),
                                        "tokens": result.tokens,
                                        "tokens_per_second": round(result.tokens_per_second, 2),
                                        "last_loss": result.last_loss,
                                        **({"stopped_at": result.stopped_at, "best_step": result.best_step,
                                            "checks": len(result.checks)} if on_check is not None else {})})
    return out
