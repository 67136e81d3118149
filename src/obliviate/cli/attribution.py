"""Attribution commands: ``wagle-mask``, ``guard-weights``, ``sacrifice-rate``.

Registered in the main app with ``register(app)``. For ``obliviate unlearn`` this module also
exports the option types ``WagleMaskOpt ... GuardProjectionOpt`` and :func:`unlearn_attribution_kwargs`,
which turns those options into the ``wagle=`` / ``guard=`` arguments of ``api.unlearn``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from obliviate.attribution import GuardConfig, WagleConfig, compute_guard, compute_wagle_mask, save_guard, save_mask
from obliviate.cli.errors import user_errors
from obliviate.cli.options import Dtype, RemoteCode, check_finite_options, parse_method_options
from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat
from obliviate.data.sources import as_dataset
from obliviate.evaluation.evaluate import load_eval
from obliviate.evaluation.sacrifice import metric_drops, sacrifice_rates
from obliviate.methods import Procedure, build_method
from obliviate.models.loading import DEFAULT_MODEL, load_model, load_tokenizer
from obliviate.processes import processes

console = Console(highlight=False)

Model = Annotated[str, typer.Option(help="The model to attribute (the target: a run's model/ directory, hub id, ...).")]
Forget = Annotated[str, typer.Option(help="Forget data (file, DIR:split or HUB_ID:split).")]
Retain = Annotated[str, typer.Option(help="Retain data (file, DIR:split or HUB_ID:split).")]
SystemPrompt = Annotated[str, typer.Option(help="System prompt of the chat template ('' for none); as in unlearn.")]
MaxLength = Annotated[int, typer.Option(help="Longest prompt + answer in tokens; as in unlearn.")]
BatchSize = Annotated[int, typer.Option(help="Examples per forward/backward pass.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]

# Options for `obliviate unlearn` (wired there; see unlearn_attribution_kwargs).
WagleMaskOpt = Annotated[Optional[Path], typer.Option(
    "--wagle-mask", help="WAGLE: update only the weights of this mask file (from `obliviate wagle-mask`).",
    rich_help_panel="Attribution")]
WagleRhoOpt = Annotated[Optional[float], typer.Option(
    "--wagle-rho", help="WAGLE: compute a mask before training that lets this share of the weights move.",
    rich_help_panel="Attribution")]
WagleGammaOpt = Annotated[Optional[float], typer.Option(
    "--wagle-gamma", help="WAGLE: Hessian approximation gamma*I [default: 1e-6]; needs --wagle-rho.",
    rich_help_panel="Attribution")]
WagleScopeOpt = Annotated[Optional[str], typer.Option(
    "--wagle-scope", help="WAGLE: rank weights globally, per layer or per tensor [default: global]; needs --wagle-rho.",
    rich_help_panel="Attribution")]
GuardWeightsOpt = Annotated[Optional[Path], typer.Option(
    "--guard-weights", help="GUARD: per-sample forget weights from this file (from `obliviate guard-weights`).",
    rich_help_panel="Attribution")]
GuardTauOpt = Annotated[Optional[float], typer.Option(
    "--guard-tau", help="GUARD: compute sample weights before training with this temperature (in standard "
    "deviations of the attribution; inf = uniform).", rich_help_panel="Attribution")]
GuardProjectionOpt = Annotated[Optional[int], typer.Option(
    "--guard-projection-dim", help="GUARD: estimate attributions with a CountSketch of this dimension "
    "(default exact); needs --guard-tau.", rich_help_panel="Attribution")]
WagleNormsOpt = Annotated[Optional[bool], typer.Option(
    "--wagle-norms/--wagle-no-norms", help="WAGLE: let norm weights be selected [default: yes]; needs --wagle-rho.",
    rich_help_panel="Attribution", show_default=False)]
WagleEmbeddingsOpt = Annotated[Optional[bool], typer.Option(
    "--wagle-embeddings/--wagle-no-embeddings", help="WAGLE: let embedding (and untied lm_head) weights be "
    "selected [default: yes]; needs --wagle-rho.", rich_help_panel="Attribution", show_default=False)]
WagleBatchSizeOpt = Annotated[Optional[int], typer.Option(
    "--wagle-batch-size", help="WAGLE: examples per scoring pass [default: 8]; needs --wagle-rho.",
    rich_help_panel="Attribution")]
GuardRelativeTauOpt = Annotated[Optional[bool], typer.Option(
    "--guard-relative-tau/--guard-absolute-tau", help="GUARD: --guard-tau in standard deviations of the "
    "attributions [default], or raw; needs --guard-tau.", rich_help_panel="Attribution", show_default=False)]
GuardSeedOpt = Annotated[Optional[int], typer.Option(
    "--guard-seed", help="GUARD: seed of the sketch's hash functions [default: 0]; needs --guard-tau.",
    rich_help_panel="Attribution")]
GuardBatchSizeOpt = Annotated[Optional[int], typer.Option(
    "--guard-batch-size", help="GUARD: samples per attribution pass [default: 8]; needs --guard-tau.",
    rich_help_panel="Attribution")]
GuardParamsOpt = Annotated[Optional[str], typer.Option(
    "--guard-params", help="GUARD: regex, attribute only the parameters whose names match [default: all]; "
    "needs --guard-tau.", rich_help_panel="Attribution")]

# `obliviate unlearn` flag (parameter name) for every WagleConfig / GuardConfig field: each option of
# the components is reachable from the command (a test checks the tables against the dataclasses).
WAGLE_FLAGS = {"rho": "wagle_rho", "gamma": "wagle_gamma", "scope": "wagle_scope", "include_norms": "wagle_norms",
               "include_embeddings": "wagle_embeddings", "batch_size": "wagle_batch_size"}
GUARD_FLAGS = {"tau": "guard_tau", "relative_tau": "guard_relative_tau", "projection_dim": "guard_projection_dim",
               "seed": "guard_seed", "batch_size": "guard_batch_size", "params": "guard_params"}


def _cli(name: str) -> str:
    return "--" + name.replace("_", "-")


def unlearn_attribution_kwargs(wagle_mask: Path | None = None, guard_weights: Path | None = None,
                               **options: Any) -> dict[str, Any]:
    """``{"wagle": ..., "guard": ...}`` for ``api.unlearn`` from the unlearn command's options
    (``wagle_rho=...``, ``guard_tau=...``: the parameter names in WAGLE_FLAGS / GUARD_FLAGS)."""
    unknown = set(options) - set(WAGLE_FLAGS.values()) - set(GUARD_FLAGS.values())
    if unknown:
        raise TypeError(f"unknown attribution options: {', '.join(sorted(unknown))}")
    wagle_given = {f: options[p] for f, p in WAGLE_FLAGS.items() if options.get(p) is not None}
    guard_given = {f: options[p] for f, p in GUARD_FLAGS.items() if options.get(p) is not None}
    if wagle_mask is not None and "rho" in wagle_given:
        raise typer.BadParameter("give either --wagle-mask or --wagle-rho, not both")
    if "rho" not in wagle_given and wagle_given:
        raise typer.BadParameter(f"{', '.join(_cli(WAGLE_FLAGS[f]) for f in wagle_given)} need --wagle-rho")
    if guard_weights is not None and "tau" in guard_given:
        raise typer.BadParameter("give either --guard-weights or --guard-tau, not both")
    if "tau" not in guard_given and guard_given:
        raise typer.BadParameter(f"{', '.join(_cli(GUARD_FLAGS[f]) for f in guard_given)} need --guard-tau")
    wagle: Any = wagle_given or wagle_mask
    guard: Any = guard_weights
    if guard_given:
        guard = {"projection_dim": None, **guard_given}
    return {"wagle": wagle, "guard": guard}


def merge_attribution(from_config: Any, from_flags: Any, key: str) -> Any:
    """The ``wagle`` / ``guard`` value from ``--config`` and from the flags: the flags win, option by
    option when both are option mappings; a file given by a flag replaces the file's options."""
    if from_config is not None and not isinstance(from_config, (dict, str)):
        raise ValueError(f"--config: '{key}' must be a file path or a mapping of options, "
                         f"got {type(from_config).__name__}")
    if isinstance(from_config, dict) and isinstance(from_flags, dict):
        return {**from_config, **from_flags}
    return from_flags if from_flags is not None else from_config


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")


def _load(model: str, dtype: str, system_prompt: str, max_length: int, trust_remote_code: bool):
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    # this process's accelerator under accelerate launch, as everywhere
    loaded = load_model(model, dtype=dtype, device=processes().device, trust_remote_code=trust_remote_code)
    return loaded, ChatFormat(tokenizer, system_prompt=system_prompt or None, max_length=max_length)


def print_mask_report(report: dict[str, Any]) -> None:
    table = Table(title=f"WAGLE mask: rho {report['rho']}, gamma {report['gamma']:g}, scope {report['scope']}")
    for column in ("module type", "weights", "selected", "share", "of mask"):
        table.add_column(column, justify="left" if column == "module type" else "right")
    for kind, row in sorted(report["by_module_type"].items(), key=lambda kv: -kv[1]["weights"]):
        table.add_row(kind, f"{row['weights']:,}", f"{row['selected']:,}", f"{row['share']:.3f}",
                      f"{row['of_mask']:.3f}")
    table.add_row("all", f"{report['candidates']:,}", f"{report['selected']:,}", f"{report['share']:.3f}", "1.000",
                  style="bold")
    console.print(table)
    if report["frozen_parameters"]:
        console.print(f"frozen by option (not ranked): {len(report['frozen_parameters'])} parameter tensors")


@user_errors
def wagle_mask(
    forget: Forget, retain: Retain,
    out: Annotated[Path, typer.Option("--out", "-o", help="Mask file to write (.safetensors).")],
    model: Model = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="The unlearning method whose forget loss is attributed.")] = "npo",
    method_option: Annotated[Optional[list[str]], typer.Option(
        "--method-option", "-m", help="Method hyper-parameter key=value, repeatable.")] = None,
    rho: Annotated[float, typer.Option(help="Share of the candidate weights the mask lets move.")] = 0.2,
    gamma: Annotated[float, typer.Option(help="Retain-Hessian approximation gamma*I.")] = 1e-6,
    scope: Annotated[str, typer.Option(help="Rank weights over all candidates (global), per decoder layer "
                                            "(layer) or per parameter tensor (tensor).")] = "global",
    norms: Annotated[bool, typer.Option("--norms/--no-norms", help="Let norm weights be selected.")] = True,
    embeddings: Annotated[bool, typer.Option("--embeddings/--no-embeddings",
                                             help="Let embedding (and untied lm_head) weights be selected.")] = True,
    batch_size: BatchSize = 8, dtype: Dtype = "float32", system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
    max_length: MaxLength = 512, overwrite: Overwrite = False, trust_remote_code: RemoteCode = False,
) -> None:
    """WAGLE (Jia et al. 2024): score every weight for a method's unlearning and write the top-rho mask."""
    cfg = WagleConfig(rho=rho, gamma=gamma, scope=scope, include_norms=norms, include_embeddings=embeddings,
                      batch_size=batch_size)
    built = build_method(method, **check_finite_options(parse_method_options(method_option), "method option"))
    if isinstance(built, Procedure):
        raise ValueError(f"method '{method}' edits the model in one go: WAGLE masks apply to gradient methods only")
    forget_ds, retain_ds = as_dataset(forget), as_dataset(retain)
    _check_out(out, overwrite)
    loaded, fmt = _load(model, dtype, system_prompt, max_length, trust_remote_code)
    mask = compute_wagle_mask(loaded, fmt, built, forget_ds, retain_ds, cfg)
    save_mask(out, mask, {"method": built.name, "model": model, "forget": forget_ds.source,
                          "retain": retain_ds.source})
    print_mask_report(mask.report)
    console.print(f"mask written to {out}")


@user_errors
def guard_weights(
    forget: Forget, retain: Retain,
    out: Annotated[Path, typer.Option("--out", "-o", help="Weights file to write (.json).")],
    model: Model = DEFAULT_MODEL,
    tau: Annotated[float, typer.Option(help="Softmax temperature; inf gives uniform weights.")] = 1.0,
    relative_tau: Annotated[bool, typer.Option(
        "--relative-tau/--absolute-tau",
        help="tau in standard deviations of the attributions (default), or raw.")] = True,
    projection_dim: Annotated[Optional[int], typer.Option(
        help="Estimate attributions from CountSketches of this dimension (default: exact).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sketch's hash functions.")] = 0,
    params: Annotated[Optional[str], typer.Option(
        help="Regex: attribute only the parameters whose names match (default: all).")] = None,
    batch_size: BatchSize = 8, dtype: Dtype = "float32", system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
    max_length: MaxLength = 512, overwrite: Overwrite = False, trust_remote_code: RemoteCode = False,
) -> None:
    """GUARD (Niu et al. 2025): weight forget samples by their gradient alignment with the retain set."""
    cfg = GuardConfig(tau=tau, relative_tau=relative_tau, projection_dim=projection_dim, seed=seed,
                      batch_size=batch_size, params=params)
    forget_ds, retain_ds = as_dataset(forget), as_dataset(retain)
    _check_out(out, overwrite)
    loaded, fmt = _load(model, dtype, system_prompt, max_length, trust_remote_code)
    result = compute_guard(loaded, fmt, forget_ds, retain_ds, cfg)
    save_guard(out, result, forget_ds, {"model": model, "forget": forget_ds.source, "retain": retain_ds.source})
    a, w = result.attributions, result.weights
    console.print(f"{len(w)} forget samples; attribution mean {a.mean():.4g}, std {a.std(unbiased=False):.4g}; "
                  f"weights min {w.min():.3f}, max {w.max():.3f} (sum {w.sum():.1f})")
    table = Table(title="most retain-aligned forget samples (unlearned most gently)")
    for column in ("weight", "attribution", "question"):
        table.add_column(column, justify="right" if column != "question" else "left", overflow="fold")
    for i in w.argsort()[:5].tolist():
        table.add_row(f"{w[i]:.3f}", f"{a[i]:.4g}", forget_ds.examples[i].question)
    console.print(table)
    console.print(f"weights written to {out}")


@user_errors
def sacrifice_rate(
    target_eval: Annotated[Path, typer.Option(help="The target (pre-unlearning) model's eval JSON.")],
    unlearned_eval: Annotated[Path, typer.Option(help="The unlearned model's eval JSON.")],
    retain_set: Annotated[str, typer.Option(help="The evaluated set that counts as retained knowledge.")] = "retain",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Sacrifice rate (GUARD): retain drop / forget drop per metric, from the target model."""
    target, unlearned = load_eval(target_eval), load_eval(unlearned_eval)
    rates = sacrifice_rates(target, unlearned, retain_set=retain_set)
    drops = metric_drops(target, unlearned, retain_set=retain_set)
    if as_json:
        console.print_json(json.dumps({"sacrifice_rate": rates, "drops": drops}))
        return
    table = Table(title=f"sacrifice rate ({retain_set} drop / forget drop; lower is better)")
    for column in ("metric", "retain drop", "forget drop", "sacrifice rate"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for metric, rate in rates.items():
        d = drops[metric]
        table.add_row(metric, "-" if d is None else f"{d['retain']:+.4f}", "-" if d is None else f"{d['forget']:+.4f}",
                      "undefined" if rate is None else f"{rate:.4f}")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``wagle-mask``, ``guard-weights`` and ``sacrifice-rate`` to the main app."""
    app.command("wagle-mask")(wagle_mask)
    app.command("guard-weights")(guard_weights)
    app.command("sacrifice-rate")(sacrifice_rate)
