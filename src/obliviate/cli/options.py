"""Shared CLI plumbing: training options generated from TrainConfig, YAML configs, method options.

Every TrainConfig field becomes a ``--flag`` on the commands that train, so ``--help`` lists them
all; a flag left out keeps the YAML value (``--config``), else the command's default.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from obliviate.training.config import TrainConfig

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
}


def load_yaml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise typer.BadParameter(f"{path}: file not found", param_hint="--config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise typer.BadParameter(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})",
                                 param_hint="--config") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path}: the top level must be a mapping", param_hint="--config")
    return data


def with_train_options(defaults: dict[str, Any]):
    """Add one ``--flag`` per TrainConfig field; the command receives ``train_overrides`` (a dict of
    the flags actually given) and builds its TrainConfig from defaults < YAML < flags."""

    def decorate(fn):
        import typing

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


def train_config(defaults: dict[str, Any], yaml_train: dict[str, Any] | None, flags: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.from_dict({**defaults, **(yaml_train or {}), **flags})
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_method_options(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as YAML scalars (numbers, booleans, strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"'{item}' is not key=value", param_hint="--method-option")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out
