"""UniErase (Yu et al. 2025, arXiv 2505.15674): a learnable unlearning token plus a small
closed-form, null-space-projected edit (AlphaEdit, Fang et al. 2024, arXiv 2410.02355).

    from obliviate.unierase import UniEraseOptions, unierase
    unierase(model, tokenizer, forget, retain, "runs/unierase/model", UniEraseOptions(layers=[4, 5]))

``token`` is stage 1 (the unlearning token), ``edit`` stage 2 (the edit), ``recipe`` both, ``run``
the run directory that ``obliviate unierase`` writes.
"""

from obliviate.unierase.edit import alphaedit_update, default_layers, nullspace_projector
from obliviate.unierase.recipe import STATS_FILE, UniEraseOptions, apply_unierase, first_token_rate, unierase
from obliviate.unierase.run import run_unierase
from obliviate.unierase.token import UNLEARN_TOKEN, add_unlearn_token, train_unlearn_token

__all__ = ["UniEraseOptions", "unierase", "apply_unierase", "run_unierase", "first_token_rate", "add_unlearn_token",
           "train_unlearn_token", "alphaedit_update", "nullspace_projector", "default_layers", "UNLEARN_TOKEN",
           "STATS_FILE"]
