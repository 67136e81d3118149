"""Unlearning methods: one small loss each, composable.

Interface with the training loop
--------------------------------
``build_method(name, **hparams)`` builds a method; ``list_methods()`` names them all and
``method_options(name)`` gives a method's options with their defaults. A gradient method is a
:class:`Method`, run by ``training.loop.train``; a method that edits the model in one call (UniErase,
``methods.unierase``) is a :class:`Procedure`: ``method.apply(model, tokenizer, forget, retain, fmt)``
returns a :class:`ProcedureResult` (model, tokenizer, stats). Tell them apart with
``isinstance(method, Procedure)``.

The loop, once per step, calls::

    loss, logs = method(StepInputs(model, forget=batch, retain=retain_batch, ref_model=ref, step=step))

``loss`` is a scalar tensor with a graph; ``logs`` maps ``loss``, ``forget_loss`` (and
``retain_loss``) to floats. Batches are those of docs/ARCHITECTURE.md: a forget batch is
``{"answer": view, "idk": view?, "index", "weight", "ref_logp"?}``, a retain batch
``{"answer": view, "index"}``, each view from ``data.chat.pad_batch``. A method declares:

- ``name``: str
- ``needs_ref_model``: a frozen copy of the starting model must be passed as ``ref_model`` (KL, RMU).
- ``needs_ref_logps``: ``forget["ref_logp"]`` must hold ``{view: summed log-prob [B]}`` of every view
  in ``views`` under the starting model, computed once before training with
  ``reference_logps(ref_model, {view: batch[view] ...})`` (the loop: ``reference_logps_for_rows`` over
  the whole forget set) (NPO, IdkDPO). Compute them in the same precision as training so that the
  log-ratio starts at 0.
- ``views``: the forget views its batches must carry ("answer", "idk").
- ``uses_retain``: it needs a retain batch every step (retain=None is a ValueError).
- ``trainable(name) -> bool``: whether the parameter ``name`` may train (RMU: only the MLPs of
  layers L-2..L). Call ``bind(model)`` first: it fixes model-dependent defaults (RMU's middle layer).
  ``method(...)`` binds on its first call anyway, but the optimiser is usually built before that.

Every method is a :class:`Composite`::

    loss = forget_weight * mean_i(weight_i * forget_i) + retain_weight * retain

where ``forget_i`` is a forget objective's per-sample loss (``ga``, ``nll``, ``idk_nll``, ``npo``,
``simnpo``, ``idk_dpo``, ``rmu``, ``undial``, ``wga``, ``satimp``, ``ceu``, ``lmf``),
``weight_i = forget["weight"]`` and ``retain`` a retain regulariser's scalar (``nll``, ``kl``, ``rmu``,
``nll_constraint``: PDU's Lagrangian term, whose dual variable the objective updates itself) computed
from the retain batch only. Presets: ``ga graddiff ga_kl npo npo_kl npo_only simnpo idk_nll idk_dpo rmu
undial wga satimp ceu pdu sft`` (docs/methods.md); any pair with
``build_method("custom", forget="npo", retain="kl", beta=0.05, retain_weight=2.0)``.
``sft`` is plain NLL on the forget stream: the loop finetunes by passing its data as the forget batch.

Helpers (``common``): ``sequence_logps`` (the one summed log-prob of a view's label tokens),
``token_logps`` (its terms, for token-weighted losses), ``row_means``, ``soft_cross_entropy``,
``per_sample_nll``, ``kl_on_labels``, ``reference_logps``, ``reference_logps_for_rows``,
``hidden_states_at``. Losses are computed in float32.
"""

from obliviate.methods.base import Method, Objective, Procedure, ProcedureResult, StepInputs
from obliviate.methods.common import (
                                      hidden_states_at,
                                      kl_on_labels,
                                      per_sample_nll,
                                      reference_logps,
                                      reference_logps_for_rows,
                                      sequence_logps,
)
from obliviate.methods.composite import Composite
from obliviate.methods.registry import FORGET, PRESETS, PROCEDURES, RETAIN, build_method, list_methods, method_options

__all__ = [
    "Method", "Objective", "Procedure", "ProcedureResult", "StepInputs", "Composite", "build_method", "list_methods",
    "method_options", "PRESETS", "PROCEDURES", "FORGET", "RETAIN", "sequence_logps", "per_sample_nll",
    "kl_on_labels", "reference_logps", "reference_logps_for_rows", "hidden_states_at",
]
