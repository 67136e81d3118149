"""Attribution-guided unlearning: which weights may change (WAGLE), which samples to forget gently (GUARD).

- WAGLE (Jia et al. 2024, arXiv 2410.17509): ``compute_wagle_mask`` scores every weight and keeps
  the top fraction rho; the mask goes to ``training.loop.train(param_masks=...)`` (no other weight
  moves, weight decay included). ``save_mask`` / ``load_mask`` write and read it as safetensors.
- GUARD (Niu et al. 2025, arXiv 2506.10946): ``compute_guard`` gives each forget sample a weight
  inversely related to its gradient alignment with the retain set; the weights go to
  ``train(sample_weights=...)`` and reach the method as ``batch["weight"]``.

``api.unlearn(..., wagle=..., guard=...)`` computes (or loads) both before training through
:func:`prepare_attribution`, saving them in the run directory. Details: docs/attribution.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from obliviate.attribution.guard import (
    GuardConfig,
    GuardResult,
    compute_guard,
    guard_attributions,
    guard_weights,
    load_guard_weights,
    save_guard,
)
from obliviate.attribution.wagle import (
    WagleConfig,
    WagleMask,
    check_masks,
    compute_wagle_mask,
    load_mask,
    mask_report,
    module_type,
    save_mask,
    select_top,
    wagle_scores,
)
from obliviate.methods import Composite, Method

__all__ = [
    "WagleConfig", "WagleMask", "compute_wagle_mask", "wagle_scores", "select_top", "mask_report", "module_type",
    "save_mask", "load_mask", "check_masks", "GuardConfig", "GuardResult", "compute_guard", "guard_attributions",
    "guard_weights", "save_guard", "load_guard_weights", "parse_wagle", "parse_guard", "prepare_attribution",
    "jsonable_options",
]

WAGLE_FILE = "wagle_mask.safetensors"
WAGLE_REPORT = "wagle.json"
GUARD_FILE = "guard_weights.json"

WagleSpec = WagleConfig | dict | str | Path
GuardSpec = GuardConfig | dict | str | Path


def parse_wagle(spec: WagleSpec | None) -> WagleConfig | Path | None:
    """A mask file to load, or the options to compute one with (a dict of WagleConfig fields)."""
    if spec is None or isinstance(spec, WagleConfig):
        return spec
    if isinstance(spec, dict):
        return WagleConfig.from_dict(spec)
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: WAGLE mask file not found")
        return path
    raise TypeError(f"wagle must be a mask path, a dict of options or a WagleConfig, got {type(spec).__name__}")


def parse_guard(spec: GuardSpec | None) -> GuardConfig | Path | None:
    """A weights file to load, or the options to compute weights with (a dict of GuardConfig fields)."""
    if spec is None or isinstance(spec, GuardConfig):
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        if isinstance(spec.get("tau"), str):
            spec["tau"] = float(spec["tau"])  # "inf" from YAML/JSON
        return GuardConfig.from_dict(spec)
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: GUARD weights file not found")
        return path
    raise TypeError(f"guard must be a weights path, a dict of options or a GuardConfig, got {type(spec).__name__}")


def _method_masks(masks: dict[str, torch.Tensor], model: torch.nn.Module, method: Method,
                  source: str) -> dict[str, torch.Tensor]:
    """The masks of the parameters the method trains; one the file does not name is frozen (all False)."""
    check_masks(masks, model, source)
    method.bind(model)
    out = {}
    for name, p in model.named_parameters():
        if method.trainable(name):
            out[name] = masks[name] if name in masks else torch.zeros(p.shape, dtype=torch.bool)
    return out


def prepare_attribution(run, model: torch.nn.Module, fmt, method: Composite, forget, retain, *, lora: bool = False,
                        wagle: WagleSpec | None = None, guard: GuardSpec | None = None,
                        param_masks: dict[str, torch.Tensor] | None = None,
                        sample_weights: torch.Tensor | None = None,
                        resume: bool = False) -> tuple[dict | None, torch.Tensor | None, dict[str, Any]]:
    """Compute or load GUARD weights, then the WAGLE mask (its forget gradient uses the weights),
    saving both in the run directory (``guard_weights.json``, ``wagle_mask.safetensors`` + ``wagle.json``).
    On ``resume`` the files already in the run are reused. Returns ``(param_masks, sample_weights,
    config)`` for ``train`` and the run's config."""
    wagle, guard = parse_wagle(wagle), parse_guard(guard)
    config: dict[str, Any] = {}
    if guard is not None:
        if sample_weights is not None:
            raise ValueError("give either sample_weights or guard, not both")
        if isinstance(guard, Path) or (resume and run.has(GUARD_FILE)):
            path = guard if isinstance(guard, Path) else run.file(GUARD_FILE)
            sample_weights = load_guard_weights(path, len(forget))
            config["guard"] = {"weights_file": str(path)}
        else:
            if retain is None:
                raise ValueError("GUARD needs retain data")
            result = compute_guard(model, fmt, forget, retain, guard)
            if run.writer:  # one process writes; every process computed the same weights
                save_guard(run.file(GUARD_FILE), result, forget)
            sample_weights = result.weights
            config["guard"] = {**jsonable_options(vars(guard)), "weights_file": GUARD_FILE}
    if wagle is not None:
        if param_masks is not None:
            raise ValueError("give either param_masks or wagle, not both")
        if lora:
            raise ValueError("WAGLE masks the model's own weights; it cannot be combined with LoRA (set lora off)")
        if isinstance(wagle, Path) or (resume and run.has(WAGLE_FILE)):
            path = wagle if isinstance(wagle, Path) else run.file(WAGLE_FILE)
            masks, meta = load_mask(path)
            param_masks = _method_masks(masks, model, method, str(path))
            config["wagle"] = {"mask_file": str(path), **{k: meta[k] for k in ("rho", "gamma", "scope") if k in meta}}
        else:
            if retain is None:
                raise ValueError("WAGLE needs retain data")
            mask = compute_wagle_mask(model, fmt, method, forget, retain, wagle, sample_weights=sample_weights)
            if run.writer:
                save_mask(run.file(WAGLE_FILE), mask, {"method": method.name})
            run.write_json(WAGLE_REPORT, mask.report)
            param_masks = mask.masks
            config["wagle"] = {**jsonable_options(vars(wagle)), "mask_file": WAGLE_FILE}
    return param_masks, sample_weights, config


def jsonable_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options as JSON/YAML can hold them: an infinite value (GUARD's uniform ``tau``) as "inf"."""
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in options.items()}
