"""Evidence commands: reports, the run registry, audit records.

Registered in the main app with::

    app.command()(report)
    app.command()(certify)
    app.command()(verify)
    app.add_typer(runs_app, name="runs")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from obliviate.cli.errors import user_errors
from obliviate.errors import UserError
from obliviate.reporting import (
    audit,  # a module: its certify and verify share names with the commands here
    signing,
)
from obliviate.reporting.model_card import model_card_info, write_model_card
from obliviate.reporting.registry import leaderboard
from obliviate.reporting.report import write_report
from obliviate.reporting.tables import format_number
from obliviate.runs import safe_name
from obliviate.runs.registry import Registry, read_json_file, unlearn_run_dir

runs_app = typer.Typer(help="The run registry: list, inspect, compare and rank runs.", no_args_is_help=True)

RegistryOption = Annotated[Optional[Path], typer.Option(
    "--registry", help="Registry database (default: $OBLIVIATE_REGISTRY, else <user data dir>/obliviate/runs.db).")]


def _console() -> Console:
    return Console(highlight=False)


def _get_run(registry: Path | None, run_id: str):
    """A run by id or prefix; an unknown or ambiguous id is a user error (the registry raises KeyError)."""
    try:
        return Registry(registry).get_run(run_id)
    except KeyError as e:
        raise UserError(str(e.args[0]) if e.args else f"no run '{run_id}'") from None


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else ""


def _table(title: str | None, header: list[str]) -> Table:
    table = Table(title=title, show_lines=False)
    for h in header:
        table.add_column(h, overflow="fold")
    return table


# ----------------------------------------------------------------------------------------------
# report


@user_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (finetune, unlearn, eval, demo ...).",
                                               exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.html, report.md and figures/.")],
    examples: Annotated[int, typer.Option(help="Example questions per set shown with each model's generation.")] = 3,
    title: Annotated[str, typer.Option(help="Title of the report.")] = "obliviate report",
) -> None:
    """Write a self-contained HTML report and a Markdown summary of one or more runs."""
    rep = write_report(runs, out, examples=examples, title=title)
    _console().print(f"report: {rep.html}\nsummary: {rep.markdown}")


# ----------------------------------------------------------------------------------------------
# runs


@runs_app.command("list")
@user_errors
def runs_list(
    kind: Annotated[Optional[str], typer.Option(
        help="Only runs of this kind (finetune, unlearn, eval, attack, demo).")] = None,
    benchmark: Annotated[Optional[str], typer.Option(help="Only runs on this benchmark.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Only runs of this unlearning method.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Only runs that started from this model.")] = None,
    status: Annotated[Optional[str], typer.Option(
        help="Only runs with this status (running, done, failed, crashed).")] = None,
    parent: Annotated[Optional[str], typer.Option(help="Only the sub-runs of this run id.")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many runs (newest first).")] = 50,
    registry: RegistryOption = None,
) -> None:
    """List registered runs, newest first."""
    rows = Registry(registry).list_runs(limit=limit, kind=kind, benchmark=benchmark, method=method,
                                        model=model, status=status, parent_id=parent)
    table = _table(None, ["id", "kind", "benchmark", "method", "status", "started", "forget quality", "utility",
                          "path"])
    for r in rows:
        row = r.summary()
        table.add_row(r.id, r.kind or "", r.benchmark or "", r.method or "", r.status, _when(r.started),
                      format_number(row.get("forget_quality")), format_number(row.get("model_utility")), r.path)
    _console().print(table)


@runs_app.command("show")
@user_errors
def runs_show(
    run_id: Annotated[str, typer.Argument(help="Run id (or a unique prefix of one).")],
    registry: RegistryOption = None,
) -> None:
    """Show one run: identity, fingerprints, status and every metric."""
    r = _get_run(registry, run_id)
    facts = _table(f"run {r.id}", ["field", "value"])
    for key in ("path", "kind", "benchmark", "method", "model", "status", "parent_id", "config_hash", "model_sha256",
                "host", "pid"):
        facts.add_row(key, str(getattr(r, key) if getattr(r, key) is not None else ""))
    facts.add_row("started", _when(r.started))
    facts.add_row("finished", _when(r.finished))
    for role, sha in r.data_sha256.items():
        facts.add_row(f"{role} data sha256", sha)
    console = _console()
    console.print(facts)
    models = (r.metrics or {}).get("models") or {}
    if models:
        table = _table("metrics", ["metric", *models])
        for key in sorted({k for row in models.values() for k in row}):
            table.add_row(key, *(format_number(row.get(key)) for row in models.values()))
        console.print(table)


@runs_app.command("compare")
@user_errors
def runs_compare(
    run_ids: Annotated[list[str], typer.Argument(help="Two or more run ids (or unique prefixes).")],
    registry: RegistryOption = None,
) -> None:
    """Compare runs: every metric side by side, and the config entries that differ."""
    try:
        cmp = Registry(registry).compare(run_ids)
    except KeyError as e:  # an unknown or ambiguous run id
        raise UserError(str(e.args[0]) if e.args else str(e)) from None
    header = [r.id for r in cmp.runs]
    console = _console()
    diff = _table("config differences", ["config", *header])
    for key, values in cmp.config_diff.items():
        diff.add_row(key, *(str(v) if v is not None else "" for v in values))
    console.print(diff)
    metrics = _table("metrics", ["metric", *header])
    for key, values in cmp.metrics.items():
        metrics.add_row(key, *(format_number(v) for v in values))
    console.print(metrics)


@runs_app.command("leaderboard")
@user_errors
def runs_leaderboard(
    benchmark: Annotated[Optional[str], typer.Option(help="Rank runs of this benchmark only.")] = None,
    label: Annotated[str, typer.Option(help="Which evaluated model of each run to rank.")] = "unlearned",
    all_runs: Annotated[bool, typer.Option("--all-runs", help="Rank every run, not only each method's best.")] = False,
    registry: RegistryOption = None,
) -> None:
    """Rank methods: Pareto front of (forget quality, model utility), then forget quality, then utility."""
    rows = leaderboard(Registry(registry), benchmark, label=label, best_per_method=not all_runs)
    table = _table(f"leaderboard{' - ' + benchmark if benchmark else ''}",
                   ["rank", "front", "method", "forget quality", "model utility", "oracle utility", "run"])
    for r in rows:
        table.add_row(str(r.rank), str(r.front or "-"), r.method or "", format_number(r.forget_quality),
                      format_number(r.model_utility), format_number(r.oracle_model_utility), r.run_id)
    console = _console()
    console.print(table)
    console.print("front 1 = no other run has both higher forget quality and higher model utility.")


@runs_app.command("add")
@user_errors
def runs_add(
    run_dirs: Annotated[list[Path], typer.Argument(help="Finished run directories to register (with their sub-runs).",
                                                   exists=True, file_okay=False)],
    registry: RegistryOption = None,
) -> None:
    """Register runs that ended without being recorded (or refresh their rows)."""
    reg = Registry(registry)
    for run_dir in run_dirs:
        run_id = reg.add_run(run_dir)
        _console().print(f"{run_id}  {run_dir}")


@runs_app.command("mark-crashed")
@user_errors
def runs_mark_crashed(registry: RegistryOption = None) -> None:
    """Mark runs left "running" by a process that no longer exists (on this host) as crashed."""
    changed = Registry(registry).mark_crashed()
    _console().print(f"{len(changed)} run(s) closed" + (": " + ", ".join(changed) if changed else ""))


# ----------------------------------------------------------------------------------------------
# certify / verify


@user_errors
def certify(
    run: Annotated[Path, typer.Argument(help="The unlearn (or demo) run that carried out the deletion.",
                                        exists=True, file_okay=False)],
    alpha: Annotated[float, typer.Option(
        help="Family-wise error rate of the verdict, shared by its statistical criteria (Bonferroni).")] = 0.05,
    auc_band_min: Annotated[Optional[float], typer.Option(
        help="Lower end of a fixed band for the membership AUCs (forget vs holdout); default: the band the "
             "sample sizes give.")] = None,
    auc_band_max: Annotated[Optional[float], typer.Option(help="Upper end of that band.")] = None,
    utility_tolerance: Annotated[float, typer.Option(
        help="Share of the utility before unlearning that may be lost before the model is over-unlearned.")] = 0.1,
    quantise_tolerance: Annotated[float, typer.Option(
        help="How far quantisation may move the forget - holdout ROUGE-L gap.")] = 0.05,
    label: Annotated[str, typer.Option(help="Which evaluated model is the unlearned one.")] = "unlearned",
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o",
        help="Record path (.json) or folder (default: RUN/audit.json); an .html page is written beside it.")] = None,
    model_card: Annotated[bool, typer.Option(
        "--model-card/--no-model-card",
        help="Also write README.md (a model card with the record's hash) into the unlearned checkpoint.")] = False,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Exit with status 1 unless the verdict is indistinguishable.")] = False,
    sign_key: Annotated[Optional[Path], typer.Option(
        "--sign-key", help="Sign the record with this Ed25519 private key (PEM; `obliviate keygen` writes one), "
        "so that `verify --public-key` proves who certified it.", exists=True, dir_okay=False)] = None,
) -> None:
    """Write a hash-chained audit record of a deletion: fingerprints, configs, code version, metrics
    and the two-sided verdict (forget set vs never-seen holdout rows: under-unlearned /
    indistinguishable / over-unlearned per criterion); optionally signed (Ed25519)."""
    if (auc_band_min is None) != (auc_band_max is None):
        raise UserError("give both --auc-band-min and --auc-band-max, or neither")
    band = (auc_band_min, auc_band_max) if auc_band_min is not None and auc_band_max is not None else None
    settings = audit.Settings(alpha=alpha, auc_band=band, utility_tolerance=utility_tolerance,
                              quantise_tolerance=quantise_tolerance, label=label)
    key = signing.load_private_key(sign_key) if sign_key is not None else None  # a bad key fails before writing
    record = audit.certify(run, settings)
    if key is not None:
        record = signing.sign(record, key)
    json_path, html_path = audit.write_record(record, out or run / "audit.json")
    console = _console()
    table = _table(None, ["criterion", "value", "interval", "band / required", "p-value", "call"])
    for e in record["entries"]:
        if e["type"] != "check":
            continue
        if e["op"] == audit.TWO_SIDED:
            table.add_row(e["name"], format_number(e["value"]), _threshold(e.get("interval")),
                          _threshold(e.get("band")), format_number(e.get("p_value")), e["verdict"])
        else:
            table.add_row(e["name"], format_number(e["value"]), "", f"{e['op']} {_threshold(e['threshold'])}", "",
                          e["verdict"])
    console.print(table)
    verdict = audit.record_verdict(record)
    console.print(f"verdict: {verdict}\nrecord: {json_path}\npage: {html_path}\nhead: {record['head']}"
                  + ("\nsigned: ed25519" if key is not None else ""))
    if model_card:
        card = write_model_card(unlearn_run_dir(run) / "model", model_card_info(run, record, json_path))
        console.print(f"model card: {card}")
    if strict and verdict != "indistinguishable":
        raise typer.Exit(1)


def _threshold(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join("inf" if v is None else format_number(v) for v in value) + "]"
    return format_number(value)


@user_errors
def verify(
    record: Annotated[Path, typer.Argument(help="An audit record written by `certify`.", exists=True, dir_okay=False)],
    expected_head: Annotated[Optional[str], typer.Option(
        help="The head hash kept elsewhere (model card, ticket); the record must end with it.")] = None,
    rehash: Annotated[bool, typer.Option(
        "--rehash/--no-rehash", help="Re-hash the models and data files the record names.")] = True,
    public_key: Annotated[Optional[Path], typer.Option(
        "--public-key", help="Require a valid Ed25519 signature by this public key (PEM).", exists=True,
        dir_okay=False)] = None,
) -> None:
    """Check an audit record: hash chain, verdicts, and (by default) that the named files are unchanged.

    Exit code 1 when the record fails a check; 2 when the file is not a well-formed record."""
    key = signing.load_public_key(public_key) if public_key is not None else None
    problems = audit.verify(record, expected_head=expected_head, rehash=rehash)
    content = read_json_file(record, required=True)  # audit.verify checked it is a well-formed record
    signed = "signature" in content
    if key is not None:
        problems += signing.signature_problems(content, key)
    console = _console()
    if problems:
        for p in problems:
            console.print(f"FAIL {p}", markup=False)
        raise typer.Exit(1)
    console.print(f"OK {record}: chain intact" + (", files unchanged" if rehash else "")
                  + (", signed by the given key" if key is not None else
                     " (signed; give --public-key to check the signature)" if signed else ""))


@user_errors
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for NAME.key (private, mode 0600) and NAME.pub.")],
    name: Annotated[str, typer.Option(help="File name stem of the key pair.")] = "audit",
) -> None:
    """Write a new Ed25519 key pair for signing audit records (`certify --sign-key NAME.key`); give
    NAME.pub to whoever checks them (`verify --public-key NAME.pub`)."""
    private, public = signing.write_key_pair(out, safe_name(name, "--name"))
    _console().print(f"private key: {private}\npublic key: {public}")


__all__ = ["runs_app", "report", "certify", "verify", "keygen"]
