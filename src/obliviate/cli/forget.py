"""``obliviate forget``: one deletion request end to end (``obliviate.forget``).

Registered in the main app with ``register(app)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from obliviate.attacks.run import PROBES
from obliviate.cli.errors import user_errors
from obliviate.cli.options import (
    Dtype,
    MaxLength,
    RemoteCode,
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
from obliviate.errors import UserError
from obliviate.forget import COLUMNS, HOLDOUT_HELP, ForgetConfig, HoldoutRequired, run_forget
from obliviate.reporting.tables import SUMMARY, format_number, verdict_summary
from obliviate.training import presets


def _numbers(text: str, flag: str, kind: type = int) -> tuple:
    """Comma-separated numbers ('' = none)."""
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers such as 0,10,25, got {text!r}") from None


@user_errors
@with_train_options(presets.UNLEARN)
def forget(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(
        help="The model to forget from: a model directory, hub id, the embedded default, or the run directory of a "
             "previous `obliviate forget` request (sequential requests: its ledger is extended and every earlier "
             "request is re-checked) (required; or 'model:' in --config).", show_default=False)] = None,
    forget: Annotated[Optional[str], typer.Option(
        help="The records to delete: QA rows (file, DIR:split or HUB_ID:split) (required; or 'forget:' "
        "in --config).", show_default=False)] = None,
    holdout: Annotated[Optional[str], typer.Option(
        help="Records of the same kind the model never saw (QA rows): forgotten means treated like these. E.g. "
             "records after the training cut-off, TOFU's holdout split, the synthetic benchmark's holdout "
             "(required; or 'holdout:' in --config).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory to write (required; or 'out:' "
                                                "in --config).", show_default=False)] = None,
    retain: Annotated[Optional[str], typer.Option(
        help="Records to keep: the retain regulariser's data, and the utility check against the model "
             "before.")] = None,
    method: Annotated[str, typer.Option(help="Unlearning method: any of `obliviate methods` (gradient methods and "
                                             "unierase).")] = "npo",
    method_option: Annotated[Optional[list[str]], typer.Option(
        "--method-option", "-m", help="Method hyper-parameter key=value, repeatable.")] = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate/--no-calibrate", help="Calibrated unlearning (gradient methods): every --check-every steps "
        "score forget vs holdout (log-probs only), stop once they are indistinguishable, keep the checkpoint "
        "closest to the band's centre.")] = True,
    calibrate_alpha: Annotated[float, typer.Option(help="Calibrated unlearning: each criterion's level.")] = 0.05,
    gate: Annotated[bool, typer.Option(
        "--gate/--no-gate", help="Calibrated unlearning: forget rows that already look like holdout rows stop "
        "contributing to the forget loss.")] = True,
    eval_batch_size: Annotated[int, typer.Option(
        help="Scoring batch size of the evaluations; generation decodes twice as many questions at a time.")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy generation length limit in evaluation.")] = 200,
    relearn_steps: Annotated[str, typer.Option(
        help="Relearning attack: optimizer step counts to measure at, comma-separated.")] = "0,10,25,50",
    relearn_lr: Annotated[float, typer.Option(help="Relearning attack: learning rate.")] = 1e-5,
    relearn_fraction: Annotated[float, typer.Option(
        help="Relearning attack: share of the forget rows relearned on (the rest are measured).")] = 0.15,
    quantise_bits: Annotated[str, typer.Option(
        help="Quantisation attack: bit widths, comma-separated ('' = no quantisation attack).")] = "4",
    quantise_backend: Annotated[str, typer.Option(
        help="Quantisation attack: auto (bitsandbytes on a GPU, else round-to-nearest), rtn or bnb.")] = "auto",
    probes: Annotated[str, typer.Option(
        help="Probe attacks, comma-separated: paraphrase, few_shot, context ('' = none).")] = ",".join(PROBES),
    alpha: Annotated[float, typer.Option(
        help="Verdict: family-wise error rate shared by the criteria (Bonferroni).")] = 0.05,
    auc_band: Annotated[Optional[str], typer.Option(
        help="Verdict: a fixed band LO,HI for every membership AUC (default: the band the sample sizes give).")] = None,
    utility_tolerance: Annotated[float, typer.Option(
        help="Verdict: share of the utility before the request that may be lost.")] = 0.1,
    recheck_attacks: Annotated[bool, typer.Option(
        "--recheck-attacks/--no-recheck-attacks", help="Sequential requests: run the relearning and quantisation "
        "attacks for each earlier request too.")] = True,
    sign_key: Annotated[Optional[Path], typer.Option(
        "--sign-key", help="Sign the audit record with this Ed25519 private key (PEM; `obliviate keygen`).",
        exists=True, dir_okay=False)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help=(
        "YAML file with this command's options by name (training options under 'train:', method options under "
        "'method_options:'); flags given on the command line win, unknown keys are errors."))] = None,
    dtype: Dtype = "float32",
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
    max_length: MaxLength = 512,
    skip_bad: SkipBad = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted request (finished stages are "
                                                          "kept).")] = False,
    trust_remote_code: RemoteCode = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
    train_overrides: dict | None = None,
) -> None:
    """A deletion request end to end: calibrated unlearning -> oracle-free evaluation (forget vs holdout) ->
    relearning, quantisation and probe attacks -> two-sided verdict -> audit record -> report.

    --model may be a previous request's run: the new record links to the previous one (a ledger per model
    lineage) and every earlier request is re-checked on the new model."""
    console = Console(highlight=False)
    v, sections = apply_config(
        ctx, config, dict(model=model, forget=forget, holdout=holdout, out=out, retain=retain,
                          method=method, calibrate=calibrate, calibrate_alpha=calibrate_alpha, gate=gate,
                          eval_batch_size=eval_batch_size, max_new_tokens=max_new_tokens, relearn_steps=relearn_steps,
                          relearn_lr=relearn_lr, relearn_fraction=relearn_fraction, quantise_bits=quantise_bits,
                          quantise_backend=quantise_backend, probes=probes, alpha=alpha, auc_band=auc_band,
                          utility_tolerance=utility_tolerance, recheck_attacks=recheck_attacks, dtype=dtype,
                          system_prompt=system_prompt, max_length=max_length, skip_bad=skip_bad,
                          trust_remote_code=trust_remote_code),
        sections=("train", "method_options"), required=("model", "forget", "out"))
    if v["holdout"] is None:
        raise HoldoutRequired(f"obliviate forget needs --holdout: {HOLDOUT_HELP}")
    train = train_config(presets.UNLEARN, sections.get("train"), train_overrides or {})
    options = check_finite_options({**mapping_section(sections.get("method_options"), "method_options"),
                                    **parse_method_options(method_option)}, "method option")
    band = _numbers(v["auc_band"], "--auc-band", float) if v["auc_band"] else None
    if band is not None and len(band) != 2:
        raise UserError(f"--auc-band takes two numbers LO,HI such as 0.4,0.6, got {v['auc_band']!r}")
    cfg = ForgetConfig(method=v["method"], method_options=options, train=train.to_dict(), calibrate=v["calibrate"],
                       calibrate_alpha=v["calibrate_alpha"], gate=v["gate"], dtype=v["dtype"],
                       system_prompt=v["system_prompt"] or None, max_length=v["max_length"],
                       eval_batch_size=v["eval_batch_size"], max_new_tokens=v["max_new_tokens"],
                       relearn_steps=_numbers(v["relearn_steps"], "--relearn-steps"), relearn_lr=v["relearn_lr"],
                       relearn_fraction=v["relearn_fraction"],
                       quantise_bits=_numbers(v["quantise_bits"], "--quantise-bits"),
                       quantise_backend=v["quantise_backend"],
                       probes=tuple(p.strip() for p in v["probes"].split(",") if p.strip()), alpha=v["alpha"],
                       auc_band=band, utility_tolerance=v["utility_tolerance"], recheck_attacks=v["recheck_attacks"],
                       skip_bad=v["skip_bad"], trust_remote_code=v["trust_remote_code"])
    result = run_forget(v["model"], v["forget"], v["holdout"], v["out"], cfg, retain=v["retain"],
                        overwrite=overwrite, resume=resume, progress=not no_progress, sign_key=sign_key,
                        echo=lambda message: console.print(message, markup=False))
    _print_result(console, result, Path(v["out"]))


def _print_result(console: Console, result: dict[str, Any], out: Path) -> None:
    verdict = result["verdict"]
    table = Table(title=f"Deletion request {result['request']}: forget vs never-seen holdout rows")
    for i, title in enumerate(["model"] + [t for _, t in COLUMNS] + ["call"]):
        table.add_column(title, justify="right" if 0 < i <= len(COLUMNS) else "left")
    for label, row in result["models"].items():
        table.add_row(label, *[format_number(row.get(k), SUMMARY) for k, _ in COLUMNS],
                      (verdict.get("by_model") or {}).get(label, "-"))
    console.print(table)
    for line in verdict_summary(verdict):
        console.print(line.replace("**", ""), markup=False)
    for e in result["earlier"]:
        console.print(f"earlier request {e['request']} ({e['n_forget']} forget rows): {e['then'] or '-'} then, "
                      f"{e['now']} now", markup=False)
    console.print(f"audit record: {out / 'audit.json'} (head {result['audit']['head']})\n"
                  f"ledger: {out / 'ledger.json'}\nreport: {out / 'report' / 'report.html'}\nrun directory: {out}",
                  markup=False)


def register(app: typer.Typer) -> None:
    """Add the ``forget`` command to the ``obliviate`` app."""
    app.command("forget")(forget)


__all__ = ["register", "forget"]
