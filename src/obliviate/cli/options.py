"""Shared CLI plumbing: training options generated from TrainConfig, YAML configs, method options.

Every TrainConfig field becomes a ``--flag`` on the commands that train, so ``--help`` lists them
all. With ``--config FILE`` a command takes its options from the YAML file too: a flag given on the
command line always wins, a key the command does not know is an error listing the valid ones, and
values are converted to the option's type (``max_length: "512"`` works, ``max_length: abc`` names
the key).
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from obliviate.errors import UserError
from obliviate.options import coerce
from obliviate.training.config import TrainConfig


class ScoredTokens(str, Enum):
    """What evaluation scores of each answer (``data.chat.SCORED_TOKENS``)."""

    labels = "labels"
    answer = "answer"


ScoredTokensOption = Annotated[ScoredTokens, typer.Option(
    help="Tokens scored per answer: 'labels' = the answer + its closing end-of-turn token (the training "
         "labels, as TOFU's code and the field's reference framework score), 'answer' = the answer alone.")]

# Options that every command loading a model or data declares alike.
Dtype = Annotated[str, typer.Option(help="Weights dtype: float32, bfloat16 or float16.")]
SystemPrompt = Annotated[str, typer.Option(help="System prompt of the chat template ('' for none).")]
MaxLength = Annotated[int, typer.Option(help="Longest prompt + answer in tokens; longer rows are errors.")]
SkipBad = Annotated[bool, typer.Option("--skip-bad", help="Skip bad data rows instead of stopping; what was "
                                                         "skipped, and where, goes to stderr.")]
RemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub model's own code (off by default).")]

# Where a parameter's value came from (click's ParameterSource names): these mean the user typed it.
EXPLICIT_SOURCES = ("COMMANDLINE", "ENVIRONMENT", "PROMPT")

TRAIN_HELP = {
    "epochs": "Passes over the (forget or training) data; may be fractional.",
    "batch_size": "Examples per micro-batch (per process).",
    "grad_accum": "Micro-batches per optimizer step.",
    "lr": "Peak learning rate.",
    "weight_decay": "Decoupled weight decay (AdamW) on matrices.",
    "warmup_ratio": "Share of steps with linear warm-up.",
    "scheduler": "Learning-rate schedule after warm-up: linear, constant or cosine.",
    "max_grad_norm": "Gradient clipping norm; 0 disables clipping.",
    "optimizer": "adamw, sgd, adamw8bit or paged_adamw8bit (8-bit states, bitsandbytes; paged: CUDA only).",
    "seed": "Seed for batching and initialisation.",
    "mixed_precision": "no, bf16 or fp16 (GPU; bf16 on a CPU without bf16 units is very slow).",
    "gradient_checkpointing": "Recompute activations in backward to save memory.",
    "max_steps": "Stop after this many optimizer steps (0: epochs decide).",
    "save_every": "Write a resumable checkpoint every N optimizer steps (0: never mid-run).",
    "eval_every": "Evaluate every N steps for the trade-off trajectory (0: never).",
    "lora": "Train LoRA adapters instead of all weights.",
    "lora_r": "LoRA rank.",
    "lora_alpha": "LoRA scaling alpha.",
    "merge_lora": "Save LoRA runs merged into the base model (else adapter only).",
    "log_with": "Also log steps to experiment trackers, comma-separated: tensorboard, mlflow (files under "
                "RUN/tracking; needs `pip install obliviate[tracking]`).",
    "sync_every": "Read logged values from the device every N optimizer steps (one host sync; the log still "
                  "has every step).",
    "check_every": "With --calibrate: score forget vs holdout every N optimizer steps (0: once per epoch).",
    "sam_rho": "Sharpness-aware unlearning (Fan et al. 2025): perturb the weights by this radius along the "
               "forget loss's gradient and take the forget gradient there; 0 = off.",
    "smooth_sigma": "Randomized smoothing of the forget loss: std of Gaussian weight noise; 0 = off.",
    "smooth_samples": "Randomized smoothing: noise draws per micro-batch.",
}


def load_yaml(path: Path | None) -> dict[str, Any]:
    """The mapping in a ``--config`` file ({} without one); a located UserError when it cannot be read."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"--config {path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"--config {path}: a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"--config {path}: not UTF-8 text (byte {exc.start + 1})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise UserError(f"--config {path}{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: the top level must be a mapping of option: value, "
                        f"got {type(data).__name__}")
    return data


def _flag(param: Any) -> str:
    opts = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    return opts[0] if opts else str(param.name).upper()  # an argument: its metavar


def apply_config(ctx: typer.Context, path: Path | None, values: dict[str, Any], *, sections: tuple[str, ...] = (),
                 required: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge a ``--config`` YAML file under the command line.

    ``values``: the command's parameters that the file may set, as received. Returns those values with
    the file's filling each one not given on the command line (converted to the parameter's type),
    and the file's ``sections`` (nested mappings such as ``train``). A key that is neither a parameter
    nor a section is an error listing the valid keys; so is a ``required`` value given nowhere.
    """
    data = load_yaml(path)
    valid = set(values) | set(sections)
    unknown = sorted(str(k) for k in data if k not in valid)
    if unknown:
        train_keys = {f.name for f in fields(TrainConfig)}
        hint = ("; training options go under 'train:'" if "train" in sections and set(unknown) & train_keys else "")
        raise UserError(f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"for `{ctx.info_name}` (valid: {', '.join(sorted(valid))}){hint}")
    params = {p.name: p for p in ctx.command.params}
    callback = ctx.command.callback
    assert callback is not None  # every command here is a decorated function
    hints = typing.get_type_hints(inspect.unwrap(callback), include_extras=True)
    merged = dict(values)
    for key, value in data.items():
        if key in sections:
            continue
        source = ctx.get_parameter_source(key)
        if source is not None and source.name in EXPLICIT_SOURCES:
            continue  # the flag wins
        try:
            merged[key] = coerce(key, hints.get(key, Any), value)
        except ValueError as exc:
            raise UserError(f"--config {path}: {exc}") from None
    missing = [_flag(params[k]) if k in params else k for k in required if merged.get(k) is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)}: give {'it' if len(missing) == 1 else 'them'} on the command "
                        "line or in the --config file (" + ", ".join(f"'{k}:'" for k in required
                                                                     if merged.get(k) is None) + ")")
    return merged, {k: data[k] for k in sections if k in data}


def with_train_options(defaults: dict[str, Any]):
    """Add one ``--flag`` per TrainConfig field; the command receives ``train_overrides`` (a dict of
    the flags actually given) and builds its TrainConfig from defaults < YAML < flags."""

    def decorate(fn):
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # resolve string annotations
        params = [p.replace(annotation=hints.get(p.name, p.annotation))
                  for p in sig.parameters.values() if p.name != "train_overrides"]
        base = TrainConfig()
        for f in fields(TrainConfig):
            default = defaults.get(f.name, getattr(base, f.name))
            flag = "--" + f.name.replace("_", "-")
            decls = [f"{flag}/--no-{f.name.replace('_', '-')}"] if f.type in (bool, "bool") else [flag]
            annotation = Optional[{"int": int, "float": float, "str": str, "bool": bool}.get(str(f.type), str)]
            params.append(inspect.Parameter(
                f"train_{f.name}", inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                default=typer.Option(None, *decls, help=f"{TRAIN_HELP[f.name]} [default: {default}]",
                                     rich_help_panel="Training")))

        @functools.wraps(fn)
        def wrapper(**kwargs):
            overrides = {k[len("train_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("train_")}
            kwargs["train_overrides"] = {k: v for k, v in overrides.items() if v is not None}
            return fn(**kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def train_config(defaults: dict[str, Any], yaml_train: Any, flags: dict[str, Any]) -> TrainConfig:
    """defaults < the file's ``train:`` section < flags; every value checked by TrainConfig."""
    if yaml_train is not None and not isinstance(yaml_train, dict):
        raise UserError(f"--config: 'train' must be a mapping of training options, got {type(yaml_train).__name__}")
    return TrainConfig.from_dict({**defaults, **(yaml_train or {}), **flags})


def mapping_section(value: Any, name: str) -> dict[str, Any]:
    """A ``--config`` section that must be a mapping (``method_options``, ``options``); {} when absent."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"--config: '{name}' must be a mapping of option: value, got {type(value).__name__}")
    return value


def parse_method_options(items: list[str] | None, flag: str = "--method-option") -> dict[str, Any]:
    """``key=value`` pairs; values parsed as YAML scalars (numbers, booleans, strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"'{item}' is not key=value", param_hint=flag)
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserError(f"{flag} {item}: the value is not a YAML scalar or list "
                            f"({' '.join(str(getattr(exc, 'problem', None) or exc).split())})") from None
    return out


def check_finite_options(options: dict[str, Any], what: str) -> dict[str, Any]:
    """Refuse NaN and infinite numbers (also spelled as text: "inf", "nan") in method hyper-parameters:
    no method takes them, and a NaN loss weight trains a NaN model."""
    for key, value in options.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float, str)):
            try:
                x = float(value)
            except (ValueError, OverflowError):
                continue  # text that is not a number: the method checks it
            if not math.isfinite(x):
                raise UserError(f"{what} {key}={value!r}: must be a finite number")
    return options
