"""UniErase (Yu et al. 2025, arXiv 2505.15674): a learnable unlearning token plus a small
closed-form, null-space-projected edit (AlphaEdit, Fang et al. 2024, arXiv 2410.02355).

Registered like every method: ``build_method("unierase", layers=[4, 5])`` returns a :class:`UniErase`,
a ``methods.Procedure``::

    result = build_method("unierase").apply(model, tokenizer, forget, retain, ChatFormat(tokenizer))
    save_checkpoint(result.model, result.tokenizer, out)  # result.stats: what both stages did

``token`` is stage 1 (the unlearning token), ``edit`` stage 2 (the edit), ``recipe`` both;
``unierase(...)`` also writes the checkpoint and ``unierase.json``.
"""

from obliviate.methods.unierase.edit import alphaedit_update, default_layers, nullspace_projector
from obliviate.methods.unierase.recipe import (
                                               STATS_FILE,
                                               EarlierEditsMissing,
                                               UniErase,
                                               UniEraseOptions,
                                               apply_unierase,
                                               check_earlier,
                                               edit_record,
                                               first_token_rate,
                                               recorded_edits,
                                               unierase,
)
from obliviate.methods.unierase.token import UNLEARN_TOKEN, add_unlearn_token, train_unlearn_token

__all__ = ["UniErase", "UniEraseOptions", "unierase", "apply_unierase", "first_token_rate", "add_unlearn_token",
           "train_unlearn_token", "alphaedit_update", "nullspace_projector", "default_layers", "UNLEARN_TOKEN",
           "STATS_FILE", "EarlierEditsMissing", "check_earlier", "edit_record", "recorded_edits"]
