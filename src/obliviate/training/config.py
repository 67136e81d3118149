"""Training options, validated. The same options drive finetuning and every unlearning method."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from obliviate.options import OptionsError, check_fields, options_from_dict

TRACKERS = ("tensorboard", "mlflow")
# 8-bit AdamW keeps its two moments in 8 bits (bitsandbytes, Dettmers et al. 2022, arXiv 2110.02861):
# 2 bytes/param of optimiser state instead of 8. The paged variant also pages them to CPU RAM under
# GPU memory pressure (CUDA only).
OPTIMIZERS = ("adamw", "sgd", "adamw8bit", "paged_adamw8bit")  # Accelerate's trackers that log to local files


@dataclass
class TrainConfig:
    epochs: float = 5.0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    scheduler: str = "linear"  # linear | constant | cosine
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"  # adamw | sgd | adamw8bit | paged_adamw8bit
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    max_steps: int = 0  # 0: epochs decide
    save_every: int = 0  # optimizer steps between resumable checkpoints; 0: only at the end
    eval_every: int = 0  # optimizer steps between trajectory evaluations; 0: none
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    merge_lora: bool = True
    log_with: str = ""  # experiment trackers, comma-separated: tensorboard, mlflow (logs under RUN/tracking)
    sync_every: int = 10  # optimizer steps between reads of the logged values from the device (one host sync)
    check_every: int = 0  # optimizer steps between calibrated-stopping checks (with one); 0: once per epoch
    sam_rho: float = 0.0  # sharpness-aware unlearning: radius of the forget term's weight perturbation; 0: off
    smooth_sigma: float = 0.0  # randomized smoothing: std of Gaussian weight noise on the forget term; 0: off
    smooth_samples: int = 1  # randomized smoothing: noise draws per micro-batch

    def __post_init__(self) -> None:
        # Types first (finite floats, whole ints, real bools): the range checks below compare numbers.
        problems = check_fields(self)
        if problems:
            raise OptionsError("invalid training options: " + "; ".join(problems))
        if self.epochs <= 0 and self.max_steps <= 0:
            problems.append("epochs must be > 0 (or set max_steps)")
        for name in ("batch_size", "grad_accum", "lora_r", "sync_every", "smooth_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.lr <= 0:
            problems.append("lr must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            problems.append("warmup_ratio must be in [0, 1)")
        if self.scheduler not in ("linear", "constant", "cosine"):
            problems.append("scheduler must be linear, constant or cosine")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            problems.append("mixed_precision must be no, bf16 or fp16")
        if min(self.max_steps, self.save_every, self.eval_every, self.check_every, self.weight_decay,
               self.max_grad_norm, self.sam_rho, self.smooth_sigma) < 0:
            problems.append("max_steps, save_every, eval_every, check_every, weight_decay, max_grad_norm, sam_rho "
                            "and smooth_sigma must be >= 0")
        if self.sam_rho > 0 and self.smooth_sigma > 0:
            problems.append("sam_rho and smooth_sigma are two ways to smooth the forget term: set one of them")
        unknown = sorted(set(self.trackers()) - set(TRACKERS))
        if unknown:
            problems.append(f"log_with: unknown tracker {', '.join(unknown)} (choose from {', '.join(TRACKERS)})")
        if problems:
            raise OptionsError("invalid training options: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return options_from_dict(cls, data, "training options")

    def trackers(self) -> list[str]:
        return [t.strip() for t in self.log_with.split(",") if t.strip()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
