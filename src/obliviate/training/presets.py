"""Training defaults by purpose, in one place: what ``finetune``/``unlearn`` use unless told
otherwise, and the demo's (small and fast on a 2-core CPU)."""

from __future__ import annotations

from typing import Any

from obliviate.training.config import TrainConfig

FINETUNE: dict[str, Any] = {"epochs": 10, "lr": 2e-4, "batch_size": 8, "warmup_ratio": 0.1}
UNLEARN: dict[str, Any] = {"epochs": 5, "lr": 1e-5, "batch_size": 8, "warmup_ratio": 0.0, "scheduler": "constant"}
# The ID-vs-OOD study (studies/id_ood.py): targets and oracles that memorise its small splits.
STUDY_FINETUNE: dict[str, Any] = {"epochs": 10, "lr": 3e-4, "batch_size": 8, "warmup_ratio": 0.1}
# NPO 8 epochs at 6e-5 on the demo's 8-entity benchmark (4 at 3e-5 left forget quality at 0.002).
# One trajectory point mid-run (step 8 of 16), besides the target and the kept checkpoint: each point
# scores every evaluation set (about 20 s on 2 CPU cores), the calibration checks run every epoch anyway.
DEMO_FINETUNE: dict[str, Any] = {"epochs": 8, "lr": 3e-4, "batch_size": 8, "warmup_ratio": 0.1}
DEMO_UNLEARN: dict[str, Any] = {"epochs": 8, "lr": 6e-5, "batch_size": 4, "scheduler": "constant",
                                "warmup_ratio": 0.0, "eval_every": 8}


def train_config(train: TrainConfig | dict[str, Any] | None, defaults: dict[str, Any]) -> TrainConfig:
    """``train`` as a TrainConfig; a mapping overrides ``defaults`` key by key."""
    if isinstance(train, TrainConfig):
        return train
    return TrainConfig.from_dict({**defaults, **(train or {})})
