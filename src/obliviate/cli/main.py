"""The ``obliviate`` command. Each command is a thin wrapper over ``obliviate.api`` / ``pipeline``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from obliviate import api
from obliviate.bench import BenchConfig, leaderboard_markdown, muse_markdown, run_bench, run_muse_bench
from obliviate.cli import attacks, attribution, forget, unierase
from obliviate.cli.attribution import (
    GuardBatchSizeOpt,
    GuardParamsOpt,
    GuardProjectionOpt,
    GuardRelativeTauOpt,
    GuardSeedOpt,
    GuardTauOpt,
    GuardWeightsOpt,
    WagleBatchSizeOpt,
    WagleEmbeddingsOpt,
    WagleGammaOpt,
    WagleMaskOpt,
    WagleNormsOpt,
    WagleRhoOpt,
    WagleScopeOpt,
    merge_attribution,
    unlearn_attribution_kwargs,
)
from obliviate.cli.errors import user_errors
from obliviate.cli.evidence import certify, keygen, report, runs_app, verify
from obliviate.cli.options import (
    Dtype,
    MaxLength,
    RemoteCode,
    ScoredTokens,
    ScoredTokensOption,
    SkipBad,
    SystemPrompt,
    apply_config,
    check_finite_options,
    mapping_section,
    parse_method_options,
    train_config,
    with_train_options,
)
from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT
from obliviate.data.hazard import HazardConfig, generate_hazard, write_hazard
from obliviate.data.muse import MuseSyntheticConfig, write_synthetic_muse
from obliviate.data.synthetic import SyntheticConfig, generate_benchmark, write_benchmark
from obliviate.errors import UserError
from obliviate.evaluation.engines import check_engine
from obliviate.evaluation.evaluate import summary_row
from obliviate.evaluation.lm_eval_bridge import lm_eval_summary_row
from obliviate.evaluation.multiple_choice import mc_summary
from obliviate.evaluation.muse import evaluate_muse_model, muse_row
from obliviate.methods.registry import list_methods, method_options
from obliviate.models.loading import DEFAULT_MODEL, check_model_spec
from obliviate.pipeline import PipelineConfig, run_pipeline, summary_table
from obliviate.reporting.tables import verdict_summary
from obliviate.training import presets
from obliviate.training.config import TrainConfig

app = typer.Typer(help="obliviate: machine unlearning for LLMs, with TOFU-exact evaluation and evidence.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console(highlight=False)

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run (finished stages are kept).")]
Config = Annotated[Optional[Path], typer.Option("--config", help=(
    "YAML file with this command's options by name (training options under 'train:'); flags given on the "
    "command line win, unknown keys are errors."))]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]


@app.command()
@user_errors
@with_train_options(presets.FINETUNE)
def finetune(
    ctx: typer.Context,
    data: Annotated[Optional[str], typer.Argument(
        help="QA data: a file (.jsonl/.json/.csv/.parquet), DIR:split, or HUB_ID:split (required; or 'data:' "
             "in --config).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory to write (required; or 'out:' "
                                                "in --config).", show_default=False)] = None,
    model: Annotated[str, typer.Option(help="Hub id, local directory, or the embedded default.")] = DEFAULT_MODEL,
    config: Config = None, dtype: Dtype = "float32", system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
    max_length: MaxLength = 512, skip_bad: SkipBad = False, overwrite: Overwrite = False, resume: Resume = False,
    trust_remote_code: RemoteCode = False, no_progress: NoProgress = False, train_overrides: dict | None = None,
) -> None:
    """Finetune a model on QA data: the target (all data) or the oracle (retain split only)."""
    v, sections = apply_config(ctx, config, dict(data=data, out=out, model=model, dtype=dtype,
                                                 system_prompt=system_prompt, max_length=max_length,
                                                 skip_bad=skip_bad, trust_remote_code=trust_remote_code),
                               sections=("train",), required=("data", "out"))
    cfg = train_config(presets.FINETUNE, sections.get("train"), train_overrides or {})
    check_model_spec(v["model"])  # a mistyped path fails here, before a run directory exists
    path = api.finetune(v["model"], v["data"], v["out"], cfg, dtype=v["dtype"],
                        system_prompt=v["system_prompt"] or None, max_length=v["max_length"], skip_bad=v["skip_bad"],
                        overwrite=overwrite, resume=resume, progress=not no_progress,
                        trust_remote_code=v["trust_remote_code"])
    console.print(f"finetuned model: {path}")


@app.command()
@user_errors
@with_train_options(presets.UNLEARN)
def unlearn(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(
        help="The model to unlearn from (run's model/ directory, hub id, ...) (required; or 'model:' in --config).",
        show_default=False)] = None,
    forget: Annotated[Optional[str], typer.Option(
        help="Forget data: QA rows (file, DIR:split or HUB_ID:split) or a plain-text corpus (.txt, .jsonl with "
             "'text', a folder of .txt) (required; or 'forget:' in --config).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory to write (required; or 'out:' "
                                                "in --config).", show_default=False)] = None,
    retain: Annotated[Optional[str], typer.Option(
        help="Retain data for the retain regulariser (QA rows or plain text, as --forget).")] = None,
    method: Annotated[str, typer.Option(help="Unlearning method; `obliviate methods` lists them.")] = "npo",
    method_option: Annotated[Optional[list[str]], typer.Option(
        "--method-option", "-m", help="Method hyper-parameter key=value, repeatable (e.g. -m beta=0.1 "
        "-m retain_weight=2); `obliviate methods` lists each method's options.")] = None,
    wagle_mask: WagleMaskOpt = None, wagle_rho: WagleRhoOpt = None, wagle_gamma: WagleGammaOpt = None,
    wagle_scope: WagleScopeOpt = None, wagle_norms: WagleNormsOpt = None, wagle_embeddings: WagleEmbeddingsOpt = None,
    wagle_batch_size: WagleBatchSizeOpt = None, guard_weights: GuardWeightsOpt = None, guard_tau: GuardTauOpt = None,
    guard_relative_tau: GuardRelativeTauOpt = None, guard_projection_dim: GuardProjectionOpt = None,
    guard_seed: GuardSeedOpt = None, guard_batch_size: GuardBatchSizeOpt = None, guard_params: GuardParamsOpt = None,
    holdout: Annotated[Optional[str], typer.Option(
        help="Holdout data for --calibrate: records of the same kind as --forget that the model never saw (QA "
             "rows, as --forget).")] = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="Calibrated unlearning: every --check-every steps score forget vs --holdout (log-probs "
        "only); stop once the membership AUCs and knowledge tests are inside their band, keep the checkpoint "
        "closest to its centre, and gate forget rows that already look like holdout rows. Needs --holdout.")] = False,
    calibrate_alpha: Annotated[float, typer.Option(
        help="With --calibrate: the level of each criterion's band or test.")] = 0.05,
    gate: Annotated[bool, typer.Option(
        "--gate/--no-gate", help="With --calibrate: per-sample gating (forget rows whose NLL reached their holdout "
        "quantile stop contributing to the forget loss).")] = True,
    config: Config = None, dtype: Dtype = "float32", system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
    max_length: MaxLength = 512, skip_bad: SkipBad = False, overwrite: Overwrite = False, resume: Resume = False,
    trust_remote_code: RemoteCode = False, no_progress: NoProgress = False, train_overrides: dict | None = None,
) -> None:
    """Unlearn the forget data from a model and write the unlearned model.

    With WAGLE options only the weights of the mask may change; with GUARD options forget samples
    are re-weighted by their alignment with the retain data; with --calibrate (and --holdout)
    unlearning stops where the forget rows look like never-seen rows."""
    v, sections = apply_config(ctx, config, dict(model=model, forget=forget, retain=retain, out=out, method=method,
                                                 dtype=dtype, system_prompt=system_prompt, max_length=max_length,
                                                 skip_bad=skip_bad, trust_remote_code=trust_remote_code,
                                                 holdout=holdout, calibrate=calibrate, calibrate_alpha=calibrate_alpha,
                                                 gate=gate),
                               sections=("train", "method_options", "wagle", "guard"),
                               required=("model", "forget", "out"))
    cfg = train_config(presets.UNLEARN, sections.get("train"), train_overrides or {})
    options = check_finite_options({**mapping_section(sections.get("method_options"), "method_options"),
                                    **parse_method_options(method_option)}, "method option")
    attribution = unlearn_attribution_kwargs(
        wagle_mask=wagle_mask, wagle_rho=wagle_rho, wagle_gamma=wagle_gamma, wagle_scope=wagle_scope,
        wagle_norms=wagle_norms, wagle_embeddings=wagle_embeddings, wagle_batch_size=wagle_batch_size,
        guard_weights=guard_weights, guard_tau=guard_tau, guard_relative_tau=guard_relative_tau,
        guard_projection_dim=guard_projection_dim, guard_seed=guard_seed, guard_batch_size=guard_batch_size,
        guard_params=guard_params)
    attribution = {key: merge_attribution(sections.get(key), attribution[key], key) for key in ("wagle", "guard")}
    check_model_spec(v["model"])  # a mistyped path fails here, before a run directory exists
    path = api.unlearn(v["model"], v["forget"], v["retain"], v["out"], method=v["method"], method_options=options,
                       train=cfg, dtype=v["dtype"], system_prompt=v["system_prompt"] or None,
                       max_length=v["max_length"], skip_bad=v["skip_bad"], overwrite=overwrite, resume=resume,
                       progress=not no_progress, trust_remote_code=v["trust_remote_code"], holdout=v["holdout"],
                       calibrate={"alpha": v["calibrate_alpha"], "gate": v["gate"]} if v["calibrate"] else False,
                       **attribution)
    console.print(f"unlearned model: {path}")


@app.command()
@user_errors
def evaluate(
    model: Annotated[str, typer.Option(help="Model to evaluate.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write eval/<label>.json (and "
                                                          "muse/<label>.json) into.")],
    benchmark: Annotated[Optional[str], typer.Option(
        help="Benchmark directory (synthetic or TOFU layout) or hub id, for the TOFU metrics (optional with "
             "--muse).")] = None,
    label: Annotated[str, typer.Option(
        help="Name of this model in the results (target, oracle, unlearned...).")] = "model",
    forget_split: Annotated[str, typer.Option(help="TOFU forget split (forget01, forget05, forget10).")] = "forget10",
    oracle_eval: Annotated[Optional[Path], typer.Option(help="The oracle's eval JSON, for forget quality.")] = None,
    batch_size: Annotated[int, typer.Option(help="Scoring batch size (prompts per prefill, answers per pass); "
                                                 "generation decodes twice as many questions at a time.")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy generation length limit.")] = 200,
    length_budget: Annotated[Optional[float], typer.Option(
        help="Bound each set's generations to this factor times its longest reference answer (tokens), at most "
             "--max-new-tokens (e.g. 2; recorded in eval.json as max_new_tokens_per_set). Default: "
             "--max-new-tokens for every set, as TOFU.")] = None,
    dtype: Dtype = "float32", system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT, max_length: MaxLength = 512,
    trust_remote_code: RemoteCode = False, no_progress: NoProgress = False,
    scored_tokens: ScoredTokensOption = ScoredTokens.labels,
    mc: Annotated[Optional[list[str]], typer.Option(
        "--mc", help="Multiple-choice set, NAME=FILE_OR_HUB_ID or FILE_OR_HUB_ID, repeatable: WMDP/MMLU rows "
        "(question, choices, answer) in .jsonl/.json/.csv/.parquet, or ORG/NAME:CONFIG[:SPLIT] on the hub "
        "(e.g. wmdp_bio=cais/wmdp:wmdp-bio); accuracy by each choice's log-likelihood.")] = None,
    mc_list_choices: Annotated[bool, typer.Option(
        "--mc-list-choices", help="List the lettered choices under the question in --mc prompts (the choice "
        "texts are scored either way).")] = False,
    lm_eval: Annotated[Optional[str], typer.Option(
        "--lm-eval", help="lm-evaluation-harness tasks, comma-separated (e.g. mmlu,wmdp_bio), run on the loaded "
        "model; needs pip install 'obliviate[lm_eval]'.")] = None,
    lm_eval_limit: Annotated[Optional[int], typer.Option(
        help="At most this many documents per --lm-eval task.")] = None,
    lm_eval_include: Annotated[Optional[Path], typer.Option(
        help="Folder of local lm-eval task YAML files for --lm-eval (works offline).")] = None,
    muse: Annotated[Optional[str], typer.Option(
        help="MUSE benchmark: a directory in the MUSE layout (`obliviate synth-muse`) or a hub id "
             "(muse-bench/MUSE-News): VerbMem on forget, KnowMem on forget and retain, PrivLeak; written to "
             "muse/<label>.json.")] = None,
    retain_model: Annotated[Optional[str], typer.Option(
        help="With --muse: the model trained without the forget corpus; PrivLeak compares against it.")] = None,
    engine: Annotated[str, typer.Option(
        help="Who makes the greedy answers: obliviate (its own decoding) or vllm (vLLM on a GPU, pip install "
             "vllm; the log-prob metrics are still scored on the model itself).")] = "obliviate",
) -> None:
    """TOFU metrics (probability, ROUGE-L, truth ratio, forget quality, model utility), per sample; with
    --mc, multiple-choice accuracy; with --lm-eval, lm-evaluation-harness tasks."""
    if benchmark is None and (muse is None or mc or lm_eval is not None):
        raise UserError("obliviate evaluate: give --benchmark (TOFU metrics, --mc, --lm-eval), --muse (MUSE "
                        "metrics) or both")
    if retain_model is not None and muse is None:
        raise UserError("obliviate evaluate: --retain-model is for MUSE's PrivLeak; give --muse too")
    check_engine(engine)
    if muse is not None:
        _evaluate_muse(model, muse, out, label, retain_model, batch_size=batch_size, dtype=dtype,
                       max_length=max_length, trust_remote_code=trust_remote_code)
    if benchmark is None:
        return
    result = api.evaluate(model, benchmark, out, label=label, forget_split=forget_split, oracle_eval=oracle_eval,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, dtype=dtype,
                          system_prompt=system_prompt or None, max_length=max_length,
                          progress=not no_progress, trust_remote_code=trust_remote_code,
                          scored_tokens=scored_tokens.value, mc=mc or (), mc_list_choices=mc_list_choices,
                          lm_eval=[lm_eval] if lm_eval is not None else (), lm_eval_limit=lm_eval_limit,
                          lm_eval_include=lm_eval_include, length_budget=length_budget, engine=engine)
    rows = {**summary_row(result), **mc_summary(result.get("multiple_choice") or {}),
            **lm_eval_summary_row(result.get("lm_eval"))}
    for key, value in rows.items():
        console.print(f"{key:>28}: {value}")


def _evaluate_muse(model: str, muse: str, out: Path, label: str, retain_model: str | None, **options: Any) -> None:
    result = evaluate_muse_model(model, muse, out, label=label, retain_model=retain_model, **options)
    console.print(f"MUSE ({result['benchmark']}):")
    for key, value in muse_row(result).items():
        console.print(f"{key:>28}: {value}")
    if result["note"]:
        console.print(f"note: {result['note']}")


@app.command()
@user_errors
def methods() -> None:
    """List the unlearning methods and their options."""
    for name, description in list_methods().items():
        console.print(f"[bold]{name}[/bold]: {description}")
        opts = method_options(name)
        if opts is not None:
            console.print("    options: " + ", ".join(f"{k}={v}" for k, v in opts.items()), markup=False)


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the benchmark into.")],
    preset: Annotated[str, typer.Option(help="Size preset: demo or tofu-size.")] = "demo",
    n_entities: Annotated[Optional[int], typer.Option(help="Fictitious entities (overrides the preset).")] = None,
    facts_per_entity: Annotated[Optional[int], typer.Option(help="QA pairs per entity.")] = None,
    forget_fraction: Annotated[Optional[float], typer.Option(help="Share of entities to forget.")] = None,
    seed: Annotated[int, typer.Option(help="Generator seed (same seed, same files).")] = 0,
    overwrite: Overwrite = False,
) -> None:
    """Write the built-in synthetic benchmark of fictitious entities (TOFU-like splits, ID/OOD forget sets)."""
    overrides = {k: v for k, v in dict(n_entities=n_entities, facts_per_entity=facts_per_entity,
                                       forget_fraction=forget_fraction).items() if v is not None}
    cfg = SyntheticConfig.preset(preset, seed=seed, **overrides)
    path = write_benchmark(generate_benchmark(cfg), out, cfg, overwrite=overwrite)
    console.print(f"benchmark written to {path}")


@app.command("synth-muse")
@user_errors
def synth_muse(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the MUSE benchmark into.")],
    n_forget: Annotated[Optional[int], typer.Option(help="Forget documents (one fictitious person each).")] = None,
    n_retain: Annotated[Optional[int], typer.Option(help="Retain documents.")] = None,
    n_holdout: Annotated[Optional[int], typer.Option(help="Holdout documents (never trained on).")] = None,
    facts_per_doc: Annotated[Optional[int], typer.Option(help="Sentences (facts) per document.")] = None,
    qa_per_doc: Annotated[Optional[int], typer.Option(help="KnowMem questions per forget / retain document.")] = None,
    seed: Annotated[int, typer.Option(help="Generator seed (same seed, same files).")] = 0,
    overwrite: Overwrite = False,
) -> None:
    """Write a small synthetic MUSE benchmark of fictitious people: raw forget / retain / holdout corpora,
    KnowMem QA, VerbMem prompts and PrivLeak texts, in the MUSE layout (evaluate --muse, bench --muse)."""
    overrides = {k: v for k, v in dict(n_forget=n_forget, n_retain=n_retain, n_holdout=n_holdout,
                                       facts_per_doc=facts_per_doc, qa_per_doc=qa_per_doc).items() if v is not None}
    path = write_synthetic_muse(out, MuseSyntheticConfig.from_dict({"seed": seed, **overrides}),
                                overwrite=overwrite)
    console.print(f"MUSE benchmark written to {path}")


@app.command("synth-hazard")
@user_errors
def synth_hazard(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the hazard benchmark into.")],
    preset: Annotated[str, typer.Option(help="Size preset: demo or large.")] = "demo",
    n_covered: Annotated[Optional[int], typer.Option(help="Forget-domain entities also in the public relearn "
                                                     "corpus (overrides the preset).")] = None,
    n_uncovered: Annotated[Optional[int], typer.Option(help="Forget-domain entities in the forget corpus "
                                                       "only.")] = None,
    n_holdout: Annotated[Optional[int], typer.Option(help="Forget-domain entities in no corpus (questions "
                                                     "only: the control).")] = None,
    n_retain: Annotated[Optional[int], typer.Option(help="Retain-domain entities.")] = None,
    facts_per_entity: Annotated[Optional[int], typer.Option(help="Facts (and questions) per entity.")] = None,
    docs_per_entity: Annotated[Optional[int], typer.Option(help="Prose documents per entity in the forget / "
                                                           "retain corpora.")] = None,
    faq_docs_per_entity: Annotated[Optional[int], typer.Option(help="FAQ documents (reworded questions and "
                                                               "answers) per entity there.")] = None,
    n_choices: Annotated[Optional[int], typer.Option(help="Choices per question.")] = None,
    seed: Annotated[int, typer.Option(help="Generator seed (same seed, same files).")] = 0,
    overwrite: Overwrite = False,
) -> None:
    """Write the hazardous-knowledge-style synthetic benchmark: forget / retain / public relearn corpora of
    fictitious technical text and multiple-choice questions (covered, uncovered, holdout; WMDP-like)."""
    overrides = {k: v for k, v in dict(n_covered=n_covered, n_uncovered=n_uncovered, n_holdout=n_holdout,
                                       n_retain=n_retain, facts_per_entity=facts_per_entity,
                                       docs_per_entity=docs_per_entity, faq_docs_per_entity=faq_docs_per_entity,
                                       n_choices=n_choices).items() if v is not None}
    cfg = HazardConfig.preset(preset, seed=seed, **overrides)
    path = write_hazard(generate_hazard(cfg), out, overwrite=overwrite)
    console.print(f"hazard benchmark written to {path}")




@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")] = Path("runs/demo"),
    model: Annotated[str, typer.Option(help="Model to start from.")] = DEFAULT_MODEL,
    benchmark: Annotated[Optional[str], typer.Option(
        help="Use this benchmark directory (synthetic or TOFU layout) instead of generating one.")] = None,
    n_entities: Annotated[int, typer.Option(help="Synthetic benchmark: fictitious entities.")] = 8,
    facts_per_entity: Annotated[int, typer.Option(help="Synthetic benchmark: QA pairs per entity.")] = 4,
    forget_fraction: Annotated[float, typer.Option(help="Synthetic benchmark: share of entities to forget.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Benchmark and training seed.")] = 0,
    method: Annotated[str, typer.Option(help="Unlearning method (`obliviate methods`).")] = "npo",
    method_option: Annotated[Optional[list[str]], typer.Option(
        "--method-option", "-m", help="Method key=value.")] = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate/--no-calibrate", help="Calibrated unlearning (gradient methods): stop where the forget rows "
        "look like the never-seen holdout rows (membership AUCs and knowledge tests inside their band).")] = True,
    finetune_epochs: Annotated[float, typer.Option(
        help="Epochs for target and oracle.")] = presets.DEMO_FINETUNE["epochs"],
    finetune_lr: Annotated[float, typer.Option(
        help="Learning rate for target and oracle.")] = presets.DEMO_FINETUNE["lr"],
    unlearn_epochs: Annotated[float, typer.Option(help="Unlearning epochs.")] = presets.DEMO_UNLEARN["epochs"],
    unlearn_lr: Annotated[float, typer.Option(help="Unlearning learning rate.")] = presets.DEMO_UNLEARN["lr"],
    eval_every: Annotated[int, typer.Option(help="Evaluate every N unlearning steps for the report's trade-off "
                                                 "curve (0: only before and after).")] = \
        presets.DEMO_UNLEARN["eval_every"],
    batch_size: Annotated[int, typer.Option(help="Finetuning batch size.")] = presets.DEMO_FINETUNE["batch_size"],
    max_new_tokens: Annotated[int, typer.Option(help="Greedy generation limit in evaluation.")] = 48,
    dtype: Dtype = "float32", overwrite: Overwrite = False, resume: Resume = False, no_progress: NoProgress = False,
) -> None:
    """The main job: synthetic benchmark -> finetune target and oracle -> unlearn -> evaluate all three -> verdict.

    Unlearning is calibrated NPO by default: it stops where the forget rows look like the never-seen holdout
    rows; the verdict is two-sided (under-unlearned / indistinguishable / over-unlearned per criterion).
    Defaults finish in minutes on a 2-core CPU with the embedded SmolLM2-135M-Instruct; raise the sizes
    (e.g. --n-entities 200 --facts-per-entity 20) on a GPU, or pass --benchmark with a TOFU directory.
    """
    pcfg = PipelineConfig(model=model, method=method, calibrate=calibrate,
                          method_options=check_finite_options(parse_method_options(method_option), "method option"),
                          finetune={**presets.DEMO_FINETUNE, "epochs": finetune_epochs, "lr": finetune_lr,
                                    "batch_size": batch_size, "seed": seed},
                          unlearn={**presets.DEMO_UNLEARN, "epochs": unlearn_epochs, "lr": unlearn_lr, "seed": seed,
                                   "eval_every": eval_every},
                          dtype=dtype, max_new_tokens=max_new_tokens)
    # Bad options and a mistyped model path fail here, before anything is written.
    TrainConfig.from_dict(pcfg.finetune), TrainConfig.from_dict(pcfg.unlearn)
    check_model_spec(model)
    if benchmark is None:
        bench_dir = out.parent / f"{out.name}-benchmark"
        cfg = SyntheticConfig(n_entities=n_entities, facts_per_entity=facts_per_entity,
                              forget_fraction=forget_fraction, seed=seed, retain_perturbed_entities=None)
        if not (bench_dir / "benchmark.json").exists() or overwrite:
            write_benchmark(generate_benchmark(cfg), bench_dir, cfg, overwrite=True)
        benchmark = str(bench_dir)
    result = run_pipeline(benchmark, out, pcfg, overwrite=overwrite, resume=resume, progress=not no_progress,
                          echo=console.print)
    _print_result(result, out)


@app.command()
@user_errors
def bench(
    config: Annotated[Path, typer.Argument(help="Benchmark YAML: benchmark or synthetic, model, forget_splits, "
                                                "methods, seeds, finetune, unlearn (see obliviate.bench).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Benchmark directory (re-running skips finished cells).")],
    overwrite: Overwrite = False, no_progress: NoProgress = False,
    muse: Annotated[Optional[str], typer.Option(
        help="MUSE runs on this MUSE benchmark (directory or hub id) instead of the YAML's benchmark: needs "
             "--scale and/or --sequential (or 'scale' / 'sequential' in the YAML).")] = None,
    scale: Annotated[Optional[str], typer.Option(
        help="MUSE scalability: comma-separated steps, e.g. 1,2,4 unlearns the first 1/4, 2/4 and all of the "
             "forget corpus, each from the target.")] = None,
    sequential: Annotated[Optional[int], typer.Option(
        help="MUSE sustainability: split the forget corpus in this many parts and unlearn them one after "
             "another.")] = None,
) -> None:
    """Methods x forget splits x seeds on one benchmark, reusing target and oracle; leaderboard and report.
    With a MUSE benchmark: scalability (--scale) and sustainability (--sequential) runs, table in muse.md."""
    overrides: dict[str, Any] = {k: v for k, v in dict(muse=muse, sequential=sequential).items() if v is not None}
    if scale is not None:
        overrides["scale"] = _int_list(scale, "--scale")
    cfg = BenchConfig.from_yaml(config, overrides)
    if cfg.is_muse:
        console.print(Markdown(muse_markdown(run_muse_bench(cfg, out, overwrite=overwrite, progress=not no_progress,
                                                            echo=console.print))))
    else:
        board = run_bench(cfg, out, overwrite=overwrite, progress=not no_progress, echo=console.print)
        console.print(Markdown(leaderboard_markdown(board)))
    console.print(f"report: {out / 'report'}")


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{option} takes comma-separated whole numbers such as 1,2,4, got {text!r}") from None


def _print_result(result: dict[str, Any], out: Path) -> None:
    header, rows = summary_table(result)  # the table summary.md holds, as a terminal table
    table = Table(title="Forget vs holdout: two-sided verdict, membership AUCs, TOFU metrics")
    for i, title in enumerate(header):
        table.add_column(title, justify="right" if i > 1 else "left", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in verdict_summary(result["verdict"]):  # the verdict in words, as summary.md holds it
        console.print(line.replace("**", ""), markup=False)
    console.print(f"run directory: {out}")


def _register_commands() -> None:
    """The commands that live in their own modules (evidence, attribution, attacks, UniErase)."""
    app.command()(report)
    app.command()(certify)
    app.command()(verify)
    app.command()(keygen)
    app.add_typer(runs_app, name="runs")
    attribution.register(app)
    attacks.register(app)
    unierase.register(app)
    forget.register(app)


_register_commands()


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # python -m obliviate.cli.main
    main()
