"""The one training loop, shared by finetuning and every unlearning method.

A method turns a batch into a loss (``obliviate.methods``, the :class:`~obliviate.methods.Method`
protocol); this loop owns everything else: batching (length-grouped, deterministic per seed and
epoch, so a resumed run sees the same batches), the retain stream, Accelerate (one CPU, one GPU, or
several processes with ``accelerate launch``; mixed precision; DDP/FSDP/DeepSpeed from the Accelerate
config), gradient accumulation, clipping, LoRA, gradient checkpointing, weight masks (only masked
weights move: no gradient, no weight decay), reference log-probs computed once before training,
resumable checkpoints (``checkpoint``), per-step logs, and stopping with
:class:`~obliviate.training.divergence.TrainingDiverged` when the loss or the weights stop being
finite. The optimizer and schedule are in ``optim``. Batches and views come from ``data.batches``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, is_mlflow_available, is_tensorboard_available, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from obliviate.data.batches import batch_tokens, collate, encode_views, to_device, view_lengths
from obliviate.data.chat import ChatFormat, length_grouped_batches, num_batches
from obliviate.data.qa import QADataset
from obliviate.methods import Method, Procedure, StepInputs, reference_logps_for_rows
from obliviate.models.loading import apply_lora
from obliviate.processes import launched_on_cpus
from obliviate.runs import RunDir
from obliviate.training.checkpoint import latest_checkpoint, load_state, save_state
from obliviate.training.config import TrainConfig
from obliviate.training.divergence import check_loss, check_weights
from obliviate.training.optim import build_optimizer, build_scheduler, decay_masked, param_groups


@dataclass
class TrainResult:
    model: torch.nn.Module
    steps: int
    seconds: float
    tokens: int
    last_loss: float | None
    history: list[dict] = field(default_factory=list)
    state_dict: dict | None = None  # FSDP/DeepSpeed: the full weights, gathered (on the main process)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _total_micro(cfg: TrainConfig, per_epoch: int) -> int:
    return cfg.max_steps * cfg.grad_accum if cfg.max_steps else max(1, round(cfg.epochs * per_epoch))


def planned_steps(cfg: TrainConfig, n_examples: int, world: int = 1) -> int:
    """Optimizer steps ``train`` will take on ``n_examples`` primary examples (per process)."""
    per_epoch = num_batches(n_examples, cfg.batch_size) // world  # the batches _shard keeps per process
    return math.ceil(_total_micro(cfg, per_epoch) / cfg.grad_accum)


def _shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    if world == 1:
        return batches
    usable = len(batches) // world * world
    return batches[:usable][rank::world]


def train(model, tokenizer, method: Method | Procedure, primary: QADataset, cfg: TrainConfig, *,
          retain: QADataset | None = None, fmt: ChatFormat | None = None, run: RunDir | None = None,
          resume: bool = False, sample_weights: torch.Tensor | None = None,
          param_masks: dict[str, torch.Tensor] | None = None,
          on_eval: Callable[[torch.nn.Module, int], None] | None = None, progress: bool = True,
          accelerator=None, description: str = "train") -> TrainResult:
    """Train ``model`` with ``method`` on ``primary`` (the forget set, or the finetuning data for
    ``sft``), drawing retain batches from ``retain`` when the method uses them.

    ``param_masks`` maps parameter names to boolean tensors: entries that are False never change.
    ``sample_weights`` (one per primary example) reach the method as ``batch["weight"]``.
    Raises :class:`~obliviate.training.divergence.TrainingDiverged` when the loss or the weights
    become NaN or infinite.
    """
    if isinstance(method, Procedure):
        raise TypeError(f"method '{method.name}' is not trained by the loop: it is a procedure, run it with its "
                        "apply()")
    if not isinstance(method, Method):
        raise TypeError(f"{type(method).__name__} is not a methods.Method (name, views, needs_ref_model, "
                        "needs_ref_logps, uses_retain, trainable, bind, __call__)")
    fmt = fmt or ChatFormat(tokenizer)
    trackers = cfg.trackers() if run is not None else []
    if accelerator is None:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=launched_on_cpus(),
                                  **_tracking_kwargs(trackers, run))
    elif trackers:
        raise ValueError("log_with needs the loop to create its Accelerator; configure trackers on yours instead")
    if trackers:
        accelerator.init_trackers(description, config={k: v for k, v in cfg.to_dict().items() if k != "log_with"})
    set_seed(cfg.seed)
    if method.uses_retain and retain is None:
        raise ValueError(f"method '{method.name}' needs retain data")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha)
    method.bind(model)  # model-dependent defaults (e.g. RMU's layer) before choosing trainables
    for name, p in model.named_parameters():
        if p.requires_grad or not cfg.lora:
            p.requires_grad_(bool(method.trainable(name)))
    ref_model = None
    if method.needs_ref_model:
        ref_model = copy.deepcopy(accelerator.unwrap_model(model)).eval().requires_grad_(False)
        ref_model.to(accelerator.device)

    pad_id = tokenizer.pad_token_id
    forget_rows = encode_views(fmt, primary, tuple(method.views))
    retain_rows = encode_views(fmt, retain, ("answer",)) if retain is not None and method.uses_retain else None
    if sample_weights is not None and len(sample_weights) != len(forget_rows):
        raise ValueError(f"{len(sample_weights)} sample weights for {len(forget_rows)} examples")
    model.to(accelerator.device)
    ref_logps = None
    if method.needs_ref_logps:
        with accelerator.autocast():  # same precision as training, so log-ratios start at 0
            ref_logps = reference_logps_for_rows(model, forget_rows, pad_id, cfg.batch_size)

    rank, world = accelerator.process_index, accelerator.num_processes
    lengths = view_lengths(forget_rows)
    epoch_order: dict[int, list[list[int]]] = {}  # the current epoch's batches, drawn once per epoch

    def epoch_batches(epoch: int) -> list[list[int]]:
        if epoch not in epoch_order:
            epoch_order.clear()
            epoch_order[epoch] = _shard(length_grouped_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch),
                                        rank, world)
        return epoch_order[epoch]

    per_epoch = len(epoch_batches(0))
    assert per_epoch == num_batches(len(lengths), cfg.batch_size) // world  # planned_steps relies on it
    if per_epoch == 0:
        raise ValueError(f"{len(forget_rows)} examples are too few for batch size {cfg.batch_size} "
                         f"on {world} processes")
    total_micro = _total_micro(cfg, per_epoch)
    total_steps = math.ceil(total_micro / cfg.grad_accum)

    retain_lengths = view_lengths(retain_rows) if retain_rows else []
    retain_per_cycle = len(_shard(length_grouped_batches(retain_lengths, cfg.batch_size, seed=0), rank, world))
    if retain_rows and retain_per_cycle == 0:
        raise ValueError(f"{len(retain_rows)} retain examples are too few for batch size {cfg.batch_size} "
                         f"on {world} processes")
    retain_order: dict[int, list[list[int]]] = {}  # the current cycle's retain batches, drawn once per cycle

    def retain_batch(micro: int) -> dict | None:
        # A pure function of the micro-step index, so a resumed run draws the same retain batches.
        if not retain_rows:
            return None
        cycle, pos = divmod(micro, retain_per_cycle)
        if cycle not in retain_order:
            retain_order.clear()
            retain_order[cycle] = _shard(length_grouped_batches(retain_lengths, cfg.batch_size,
                                                                seed=cfg.seed + 10_000 + cycle), rank, world)
        order = retain_order[cycle]
        idx = order[pos % len(order)]
        return collate([retain_rows[i] for i in idx], idx, pad_id)

    masks, hooks = {}, []
    if param_masks:
        named = dict(model.named_parameters())
        for name, mask in param_masks.items():
            if name not in named:
                raise ValueError(f"weight mask names unknown parameter '{name}'")
            p = named[name]
            if mask.shape != p.shape:
                raise ValueError(f"weight mask for '{name}' has shape {tuple(mask.shape)}, "
                                 f"parameter has {tuple(p.shape)}")
            m = mask.to(device=p.device, dtype=p.dtype)
            masks[name] = m
            hooks.append(p.register_hook(lambda g, m=m: g * m))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters")
    sharded = _sharded(accelerator)
    optimizer = build_optimizer(cfg, param_groups(trainable, set(masks), cfg.weight_decay), sharded)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    _check_sharded_setup(accelerator, cfg, masks)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # One schedule step per optimizer step: by default a prepared scheduler steps num_processes times,
    # but total_steps above already counts this process's (sharded) steps.
    scheduler.step_with_optimizer = False
    masked_params = [(dict(accelerator.unwrap_model(model).named_parameters())[n], m) for n, m in masks.items()]

    step, history = 0, []
    if resume and run is not None and (ckpt := latest_checkpoint(run)) is not None:
        step = load_state(accelerator, ckpt)
        history = [h for h in run.read_log() if h.get("step", 0) <= step]
    if run is not None and accelerator.is_main_process:
        # Steps logged after the checkpoint we resume from are redone: drop them from the log.
        run.rewrite_log(history)

    model.train()
    start_micro = step * cfg.grad_accum
    tokens, last_loss, t0 = 0, None, time.time()
    bar = _progress(progress and accelerator.is_main_process, description, total_steps, step)
    pending: list[dict] = []  # this step's micro-batch logs, read once at the optimizer step
    micro = start_micro
    with bar:
        while micro < total_micro:
            epoch, pos = divmod(micro, per_epoch)
            idx = epoch_batches(epoch)[pos]
            batch = collate([forget_rows[i] for i in idx], idx, pad_id, sample_weights, ref_logps)
            rbatch = retain_batch(micro)
            tokens += batch_tokens(batch) + batch_tokens(rbatch)  # counted on the CPU: no device sync
            batch, rbatch = to_device(batch, accelerator.device), to_device(rbatch, accelerator.device)
            sync = (micro + 1) % cfg.grad_accum == 0 or micro + 1 == total_micro
            ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(model)
            with ctx, accelerator.autocast():
                loss, logs = method(StepInputs(model=model, forget=batch, retain=rbatch, ref_model=ref_model,
                                               step=step))
                accelerator.backward(loss / cfg.grad_accum)
            pending.append({"loss": loss.detach(), **logs})  # the method's own "loss" log wins, as before
            micro += 1
            if not sync:
                continue
            acc_logs: dict[str, float] = {}
            for logged in pending:  # same order and arithmetic as summing at each micro-step
                for k, v in logged.items():
                    acc_logs[k] = acc_logs.get(k, 0.0) + float(v) / cfg.grad_accum
            pending = []
            if world > 1:  # log the global batch's numbers, as one process would
                acc_logs = _mean_over_processes(accelerator, acc_logs)
            check_loss(acc_logs["loss"], step + 1, cfg.lr)  # before the step: the weights are still sound
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if cfg.weight_decay and masked_params:
                decay_masked(masked_params, scheduler.get_last_lr()[0], cfg.weight_decay)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == 1 or micro == total_micro:
                _check_replicas(accelerator, model)
            last_loss = acc_logs["loss"]
            record = {"step": step, "epoch": round(micro / per_epoch, 4), "lr": scheduler.get_last_lr()[0],
                      "seconds": round(time.time() - t0, 3), **{k: round(v, 6) for k, v in acc_logs.items()}}
            history.append(record)
            if run is not None and accelerator.is_main_process:
                run.log(record)
            if trackers:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            bar.update(step, loss=last_loss)
            if run is not None and cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                check_weights(accelerator, accelerator.unwrap_model(model), step, cfg.lr)  # never checkpoint NaN
                save_state(accelerator, run, step)
            if on_eval is not None and cfg.eval_every and step % cfg.eval_every == 0:
                on_eval(accelerator.unwrap_model(model), step)
    check_weights(accelerator, accelerator.unwrap_model(model), step, cfg.lr)
    seconds = time.time() - t0
    if trackers:
        accelerator.end_training()
    if world > 1:  # tokens of every process, so tokens/s is the job's throughput
        tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), reduction="sum"))
    state_dict = None
    if sharded:
        state_dict = accelerator.get_state_dict(model)  # a collective: every process takes part
    model = accelerator.unwrap_model(model)
    if cfg.lora and cfg.merge_lora:
        model = model.merge_and_unload()
    for hook in hooks:
        hook.remove()
    model.eval()
    return TrainResult(model, step, seconds, tokens, last_loss, history, state_dict)


def _tracking_kwargs(trackers: list[str], run: RunDir | None) -> dict:
    """Accelerate's own TensorBoard / MLflow trackers, writing under ``RUN/tracking`` (MLflow: a local
    file store there unless MLFLOW_TRACKING_URI says otherwise)."""
    if not trackers or run is None:  # trackers need a run directory (the caller gives none without one)
        return {}
    missing = [t for t, ok in (("tensorboard", is_tensorboard_available), ("mlflow", is_mlflow_available))
               if t in trackers and not ok()]
    if missing:
        packages = " ".join("mlflow-skinny" if m == "mlflow" else "tensorboard" for m in missing)
        raise ValueError(f"log_with={','.join(missing)} needs the package installed (pip install {packages})")
    root = run.file("tracking")
    if "mlflow" in trackers and "MLFLOW_TRACKING_URI" not in os.environ:
        import mlflow  # optional extra (obliviate[tracking])

        # The local file store the issue asks for; MLflow 3 wants this opt-in for it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((root / "mlruns").resolve().as_uri())
    return {"log_with": trackers, "project_dir": str(root)}


def _sharded(accelerator) -> bool:
    """FSDP or DeepSpeed: the engine owns the parameters, and no process holds whole ones."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _check_sharded_setup(accelerator, cfg: TrainConfig, masks: dict) -> None:
    """What FSDP / DeepSpeed need before ``prepare``, and what the loop cannot do under them."""
    kind = accelerator.distributed_type
    if cfg.lora and _sharded(accelerator):
        raise ValueError(f"LoRA is not supported with {kind.value}: adapters are small enough for DDP "
                         "(use the DDP config)")
    if cfg.eval_every and _sharded(accelerator):
        raise ValueError(f"eval_every is not supported with {kind.value}: evaluation during training needs the "
                         "whole model on each process (evaluate the saved checkpoints instead)")
    if masks and _sharded(accelerator):
        raise ValueError(f"weight masks need whole parameters; they are not supported with {kind.value} "
                         "(use DDP, or one process)")
    if kind == DistributedType.DEEPSPEED:
        if cfg.grad_accum > 1:
            # DeepSpeed steps its optimizer inside backward, so the loop's accumulation would step every batch.
            raise ValueError("grad_accum > 1 is not supported with DeepSpeed; raise batch_size or use FSDP")
        plugin = accelerator.state.deepspeed_plugin
        # No dataloader goes through prepare(), so DeepSpeed cannot infer these from one.
        for key, value in (("train_micro_batch_size_per_gpu", cfg.batch_size),
                           ("gradient_clipping", cfg.max_grad_norm)):
            if plugin.deepspeed_config.get(key, "auto") == "auto":
                plugin.deepspeed_config[key] = value


def _mean_over_processes(accelerator, logs: dict[str, float]) -> dict[str, float]:
    keys = sorted(logs)
    values = torch.tensor([logs[k] for k in keys], dtype=torch.float32, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(values, reduction="mean").tolist()))


def _check_replicas(accelerator, model) -> None:
    """Data-parallel replicas must hold the same weights. A forward pass that skips DDP's own
    bookkeeping (one aborted by an exception, say) leaves gradients unsynchronised without any
    error; this turns that into one. Sharded strategies (FSDP, DeepSpeed) hold no replicas."""
    if accelerator.num_processes == 1 or accelerator.distributed_type in (DistributedType.FSDP,
                                                                          DistributedType.DEEPSPEED):
        return
    with torch.no_grad():
        total = sum(p.double().sum() for p in model.parameters() if p.requires_grad)
    sums = accelerator.gather(total.reshape(1))
    if not bool((sums == sums[0]).all()):
        raise RuntimeError("data-parallel replicas diverged (weight sums per process: "
                           f"{sums.tolist()}): gradients were not synchronised, e.g. because the method's "
                           "forward pass bypassed DistributedDataParallel.forward or ended in an exception")


class _progress:
    """A rich progress bar for steps (a no-op when disabled, e.g. on non-main processes)."""

    def __init__(self, enabled: bool, description: str, total: int, done: int):
        self.enabled = enabled
        if enabled:
            self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self.task = self.p.add_task(description, total=total, completed=done, loss="-")

    def __enter__(self):
        if self.enabled:
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)

    def update(self, step: int, loss: float | None) -> None:
        if self.enabled:
            self.p.update(self.task, completed=step, loss=f"{loss:.4f}" if loss is not None else "-")
