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
from obliviate.bench import BenchConfig, leaderboard_markdown, run_bench
from obliviate.cli import attacks, attribution, unierase
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
    apply_config,
    check_finite_options,
    mapping_section,
    parse_method_options,
    train_config,
    with_train_options,
)
from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT
from obliviate.data.synthetic import SyntheticConfig, generate_benchmark, write_benchmark
from obliviate.evaluation.evaluate import summary_row
from obliviate.methods.registry import list_methods, method_options
from obliviate.models.loading import DEFAULT_MODEL, check_model_spec
from obliviate.pipeline import PipelineConfig, run_pipeline, summary_table
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
Dtype = Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16 or float16.")]
SystemPrompt = Annotated[str, typer.Option(help="System prompt of the chat template ('' for none).")]
MaxLength = Annotated[int, typer.Option(help="Longest prompt + answer in tokens; longer rows are errors.")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip bad data rows instead of stopping; what was "
                                                         "skipped, and where, goes to stderr.")]
RemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub model's own code (off by default).")]
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
    config: Config = None, dtype: Dtype = "float32", system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
    max_length: MaxLength = 512, skip_bad: SkipBad = False, overwrite: Overwrite = False, resume: Resume = False,
    trust_remote_code: RemoteCode = False, no_progress: NoProgress = False, train_overrides: dict | None = None,
) -> None:
    """Unlearn the forget data from a model and write the unlearned model.

    With WAGLE options only the weights of the mask may change; with GUARD options forget samples
    are re-weighted by their alignment with the retain data."""
    v, sections = apply_config(ctx, config, dict(model=model, forget=forget, retain=retain, out=out, method=method,
                                                 dtype=dtype, system_prompt=system_prompt, max_length=max_length,
                                                 skip_bad=skip_bad, trust_remote_code=trust_remote_code),
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
                       progress=not no_progress, trust_remote_code=v["trust_remote_code"], **attribution)
    console.print(f"unlearned model: {path}")


@app.command()
@user_errors
def evaluate(
    model: Annotated[str, typer.Option(help="Model to evaluate.")],
    benchmark: Annotated[str, typer.Option(help="Benchmark directory (synthetic or TOFU layout) or hub id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write eval/<label>.json into.")],
    label: Annotated[str, typer.Option(
        help="Name of this model in the results (target, oracle, unlearned...).")] = "model",
    forget_split: Annotated[str, typer.Option(help="TOFU forget split (forget01, forget05, forget10).")] = "forget10",
    oracle_eval: Annotated[Optional[Path], typer.Option(help="The oracle's eval JSON, for forget quality.")] = None,
    batch_size: Annotated[int, typer.Option(help="Scoring and generation batch size.")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy generation length limit.")] = 200,
    dtype: Dtype = "float32", system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT, max_length: MaxLength = 512,
    trust_remote_code: RemoteCode = False, no_progress: NoProgress = False,
) -> None:
    """TOFU metrics (probability, ROUGE-L, truth ratio, forget quality, model utility), per sample."""
    result = api.evaluate(model, benchmark, out, label=label, forget_split=forget_split, oracle_eval=oracle_eval,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, dtype=dtype,
                          system_prompt=system_prompt or None, max_length=max_length,
                          progress=not no_progress, trust_remote_code=trust_remote_code)
    for key, value in summary_row(result).items():
        console.print(f"{key:>28}: {value}")


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

    Defaults finish in minutes on a 2-core CPU with the embedded SmolLM2-135M-Instruct; raise the sizes
    (e.g. --n-entities 200 --facts-per-entity 20) on a GPU, or pass --benchmark with a TOFU directory.
    """
    pcfg = PipelineConfig(model=model, method=method,
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
) -> None:
    """Methods x forget splits x seeds on one benchmark, reusing target and oracle; leaderboard and report."""
    board = run_bench(BenchConfig.from_yaml(config), out, overwrite=overwrite, progress=not no_progress,
                      echo=console.print)
    console.print(Markdown(leaderboard_markdown(board)))
    console.print(f"report: {out / 'report'}")


def _print_result(result: dict[str, Any], out: Path) -> None:
    header, rows = summary_table(result)  # the table summary.md holds, as a terminal table
    table = Table(title="TOFU metrics")
    for i, title in enumerate(header):
        table.add_column(title, justify="right" if i else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    v = result["verdict"]
    console.print(f"forgotten: [bold]{'yes' if v['forgotten'] else 'no'}[/bold]   "
                  f"utility kept: [bold]{'yes' if v['utility_kept'] else 'no'}[/bold]   "
                  f"target memorised: {'yes' if v['target_memorised'] else 'no'}")
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


_register_commands()


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # python -m obliviate.cli.main
    main()
