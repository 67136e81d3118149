"""``obliviate unierase``: the UniErase recipe (unlearning token + null-space-projected edit) as a run.

Registered in the main app with ``register(app)``. The same run as ``obliviate unlearn --method unierase``,
with UniErase's options as flags.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from obliviate import api
from obliviate.cli.errors import user_errors
from obliviate.cli.options import (
    Dtype,
    MaxLength,
    RemoteCode,
    SkipBad,
    SystemPrompt,
    apply_config,
    mapping_section,
    parse_method_options,
)
from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT
from obliviate.methods.unierase import STATS_FILE, UniEraseOptions
from obliviate.models.loading import DEFAULT_MODEL, check_model_spec
from obliviate.runs import read_json


def _option_help() -> str:
    defaults = UniEraseOptions()
    return ", ".join(f"{f.name}={getattr(defaults, f.name)}" for f in fields(UniEraseOptions))


@user_errors
def unierase(
    ctx: typer.Context,
    forget: Annotated[Optional[str], typer.Option(help="Forget data (file, DIR:split or HUB_ID:split) (required; or "
                                                       "'forget:' in --config).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory to write (required; or 'out:' in "
                                                "--config).", show_default=False)] = None,
    model: Annotated[str, typer.Option(help="The model to unlearn from (a run's model/ directory, hub id, "
                                            "...).")] = DEFAULT_MODEL,
    retain: Annotated[Optional[str], typer.Option(help="Retain data: its keys are preserved by the edit.")] = None,
    general: Annotated[Optional[str], typer.Option(
        help="General QA data whose keys are preserved too (default: built-in world facts and real authors).")] = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--option", "-u", help=f"UniErase option key=value, repeatable (e.g. -u layers=[4,5] -u l2=0.5). "
        f"Options and defaults: {_option_help()}.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file with this command's options by name, "
                                                   "UniErase options under 'options:'; flags given on the command "
                                                   "line win, unknown keys are errors.")] = None,
    dtype: Dtype = "float32",
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
    max_length: MaxLength = 512,
    skip_bad: SkipBad = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    trust_remote_code: RemoteCode = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only the result.")] = False,
) -> None:
    """UniErase: learn an unlearning token, then edit a few MLP down-projections (AlphaEdit-style,
    null-space projected) so that forget questions are answered "<unlearn> I don't know..."."""
    console = Console(highlight=False)
    v, sections = apply_config(ctx, config, dict(forget=forget, out=out, model=model, retain=retain, general=general,
                                                 dtype=dtype, system_prompt=system_prompt, max_length=max_length,
                                                 skip_bad=skip_bad, trust_remote_code=trust_remote_code),
                               sections=("options",), required=("forget", "out"))
    options = {**mapping_section(sections.get("options"), "options"), **parse_method_options(option, "--option")}
    UniEraseOptions.from_dict(options)  # bad options fail here, naming the option
    check_model_spec(v["model"])  # a mistyped path fails here, before a run directory exists
    log = None if quiet else (lambda message: console.print(message, markup=False))
    path = api.unlearn(v["model"], v["forget"], v["retain"], v["out"], method="unierase", method_options=options,
                       general=v["general"], dtype=v["dtype"], system_prompt=v["system_prompt"] or None,
                       max_length=v["max_length"], skip_bad=v["skip_bad"], overwrite=overwrite,
                       trust_remote_code=v["trust_remote_code"], log=log)
    stats = read_json(path / STATS_FILE)
    console.print(f"edited model: {path}", markup=False)
    console.print(f"<unlearn> first on {stats['forget_first_token_rate']:.0%} of forget questions"
                  + (f", {stats['retain_first_token_rate']:.0%} of retain questions"
                     if "retain_first_token_rate" in stats else "")
                  + f"; {stats['edited_share']:.4%} of parameters edited (layers {stats['layers']})", markup=False)


def register(app: typer.Typer) -> None:
    """Add the ``unierase`` command to the ``obliviate`` app."""
    app.command("unierase")(unierase)


__all__ = ["register", "unierase"]
