"""Methods by name: presets, ``custom`` for any forget objective + retain regulariser, and
procedures (methods that edit the model in one call instead of training, e.g. UniErase)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from obliviate.methods.base import Objective, Procedure, nonnegative
from obliviate.methods.ceu import CrossEntropyUnlearning
from obliviate.methods.composite import Composite
from obliviate.methods.dpo import IdkDPO
from obliviate.methods.ga import GradientAscent
from obliviate.methods.kl import RetainKL
from obliviate.methods.nll import NLL, IdkNLL, RetainNLL
from obliviate.methods.npo import NPO
from obliviate.methods.pdu import LogitMarginFlattening, RetainNLLConstraint
from obliviate.methods.rmu import RMUForget, RMURetain
from obliviate.methods.satimp import SatImp
from obliviate.methods.simnpo import SimNPO
from obliviate.methods.undial import UNDIAL
from obliviate.methods.unierase import UniErase, UniEraseOptions
from obliviate.methods.wga import WeightedGradientAscent

FORGET: dict[str, type[Objective]] = {
    "ga": GradientAscent, "nll": NLL, "idk_nll": IdkNLL, "npo": NPO, "simnpo": SimNPO,
    "idk_dpo": IdkDPO, "rmu": RMUForget, "undial": UNDIAL, "wga": WeightedGradientAscent, "satimp": SatImp,
    "ceu": CrossEntropyUnlearning, "lmf": LogitMarginFlattening,
}
RETAIN: dict[str, type[Objective]] = {"nll": RetainNLL, "kl": RetainKL, "rmu": RMURetain,
                                      "nll_constraint": RetainNLLConstraint}
WEIGHTS = ("forget_weight", "retain_weight")


@dataclass(frozen=True)
class Preset:
    forget: str
    retain: str | None
    description: str


PRESETS: dict[str, Preset] = {
    "ga": Preset("ga", None, "gradient ascent on the forget answers (Jang et al. 2023, arXiv 2210.01504)"),
    "graddiff": Preset("ga", "nll", "gradient ascent + retain NLL (Liu et al. 2022, arXiv 2203.12817; TOFU)"),
    "ga_kl": Preset("ga", "kl", "gradient ascent + KL(ref || model) on retain answers (TOFU, arXiv 2401.06121)"),
    "npo": Preset("npo", "nll", "NPO, beta=0.1, + retain NLL (NPO+RT; Zhang et al. 2024, arXiv 2404.05868)"),
    "npo_kl": Preset("npo", "kl", "NPO + KL(ref || model) on retain answers (arXiv 2404.05868)"),
    "npo_only": Preset("npo", None, "NPO alone, no retain term (arXiv 2404.05868)"),
    "simnpo": Preset("simnpo", "nll", "SimNPO, reference-free, beta=2.5 gamma=0, + retain NLL "
                                      "(Fan et al. 2024, arXiv 2410.07163)"),
    "idk_nll": Preset("idk_nll", "nll", "NLL on refusal answers + retain NLL (TOFU IdkNLL, arXiv 2401.06121)"),
    "idk_dpo": Preset("idk_dpo", "nll", "DPO preferring refusals to the true answers, beta=0.1, + retain NLL "
                                        "(Rafailov et al. 2023, arXiv 2305.18290)"),
    "rmu": Preset("rmu", "rmu", "RMU: steer layer-L activations of forget tokens to c*u, keep retain ones "
                                "(Li et al. 2024, arXiv 2403.03218); retain_weight is their alpha"),
    "undial": Preset("undial", "nll", "UNDIAL: self-distillation towards the reference's logits with the true "
                                      "token's lowered by gamma=10, + retain NLL (Dong et al. 2025, arXiv 2402.10052)"),
    "wga": Preset("wga", "nll", "weighted gradient ascent, token log-probs weighted by p^alpha (alpha=1), + retain "
                                "NLL (Wang et al. 2025, arXiv 2502.19301)"),
    "satimp": Preset("satimp", "nll", "SatImp: token log-probs weighted by p^beta1 (1-p)^beta2 (beta1=5, beta2=1), "
                                      "+ retain NLL (Yang et al. 2025, arXiv 2505.11953)"),
    "ceu": Preset("ceu", "nll", "CE-U: cross-entropy towards the model's own distribution without the true token, "
                                "+ retain NLL (Yang 2025, arXiv 2503.01224)"),
    "pdu": Preset("lmf", "nll_constraint", "PDU: logit-margin flattening subject to retain NLL <= epsilon, by a dual "
                                           "variable updated by dual ascent (Entesari et al. 2025, arXiv 2506.05314)"),
    "sft": Preset("nll", None, "plain NLL on the training answers (finetuning)"),
}


@dataclass(frozen=True)
class ProcedureSpec:
    options: type  # a dataclass of the procedure's options; its __post_init__ checks the values
    build: Callable[[Any], Procedure]  # options -> procedure
    description: str


PROCEDURES: dict[str, ProcedureSpec] = {
    "unierase": ProcedureSpec(UniEraseOptions, UniErase,
                              "UniErase: a learnt <unlearn> token + a null-space-projected edit of a few MLPs, "
                              "no training loop (Yu et al. 2025, arXiv 2505.15674)"),
}


def list_methods() -> dict[str, str]:
    """Method names and one-line descriptions, ``custom`` and procedures included."""
    out = {name: p.description for name, p in PRESETS.items()}
    out["custom"] = (f"forget=<{'|'.join(FORGET)}> retain=<{'|'.join(RETAIN)}|none>, "
                     "with forget_weight, retain_weight and the parts' options")
    out.update({name: p.description for name, p in PROCEDURES.items()})
    return out


def method_options(name: str) -> dict[str, Any] | None:
    """The options ``name`` takes, with their defaults; None for ``custom``, whose options depend on
    the parts chosen."""
    if name == "custom":
        return None
    if name in PROCEDURES:
        return dataclasses.asdict(PROCEDURES[name].options())
    built = build_method(name)
    assert isinstance(built, Composite)
    opts: dict[str, Any] = {"forget_weight": built.forget_weight}
    if built.retain is not None:
        opts["retain_weight"] = built.retain_weight
    for part in (built.forget, built.retain):
        if part is not None:
            opts.update({f: getattr(part, f) for f in _options(type(part))})
    return opts


def _options(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def _lookup(table: dict[str, type[Objective]], key, role: str) -> type[Objective]:
    if key not in table:
        raise ValueError(f"unknown {role} objective {key!r}; valid: {', '.join(table)}")
    return table[key]


def build_method(name: str, **hparams) -> Composite | Procedure:
    """A method by preset name, ``custom`` with ``forget=`` and ``retain=`` part names, or a
    procedure by name (a :class:`~obliviate.methods.base.Procedure`, e.g. ``unierase``).

    Other keyword arguments are ``forget_weight``, ``retain_weight`` and the parts' options (e.g.
    ``beta``, ``gamma``, ``layer``, ``steering_coeff``, ``seed``, ``tokens``), or the procedure's
    options; an option the method does not take is a ValueError listing the valid ones.
    """
    if name in PROCEDURES:
        spec = PROCEDURES[name]
        valid = _options(spec.options)
        unknown = sorted(set(hparams) - set(valid))
        if unknown:
            raise ValueError(f"method '{name}' does not take {', '.join(unknown)}; valid options: {', '.join(valid)}")
        return spec.build(spec.options(**hparams))
    if name == "custom":
        if "forget" not in hparams:
            raise ValueError(f"custom needs forget=<{'|'.join(FORGET)}>")
        forget_key = hparams.pop("forget")
        retain_key = hparams.pop("retain", None)
        retain_key = None if retain_key in (None, "none", "") else retain_key
        label = f"custom({forget_key}+{retain_key or 'none'})"
    elif name in PRESETS:
        preset = PRESETS[name]
        for key in ("forget", "retain"):
            if key in hparams:
                raise ValueError(f"'{key}' is an option of 'custom', not of the preset '{name}'")
        forget_key, retain_key, label = preset.forget, preset.retain, name
    else:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(list_methods())}")

    forget_cls = _lookup(FORGET, forget_key, "forget")
    retain_cls = _lookup(RETAIN, retain_key, "retain") if retain_key is not None else None
    valid = ["forget_weight"] + (["retain_weight"] if retain_cls else [])
    valid += [o for cls in (forget_cls, retain_cls) if cls for o in _options(cls) if o not in valid]
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(f"method '{label}' does not take {', '.join(unknown)}; valid options: {', '.join(valid)}")

    def build(cls: type[Objective]) -> Objective:
        return cls(**{k: v for k, v in hparams.items() if k in _options(cls)})

    return Composite(
        forget=build(forget_cls),
        retain=build(retain_cls) if retain_cls else None,
        forget_weight=nonnegative("forget_weight", hparams.get("forget_weight", 1.0)),
        retain_weight=nonnegative("retain_weight", hparams.get("retain_weight", 1.0)),
        name=label,
    )
