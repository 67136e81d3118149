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

Three generic mechanisms serve unlearning without the loop knowing any method:

- **checks** (``checks``): a callback called every ``check_every`` optimizer steps (and before the
  first and after the last) that may stop training, gate forget samples (weight 0 in the forget
  loss) and rate the model by a distance; the best-rated weights are restored at the end, and
  ``checks.jsonl`` logs every check. Calibrated stopping (``evaluation.stopping``) is one.
- **smoothing** (``smoothing``): sharpness-aware (``sam_rho``) or randomized (``smooth_sigma``)
  smoothing of the forget term of any :class:`~obliviate.methods.base.SplitMethod`.
- **no host syncs per step**: a step never waits for the device. Logged values stay on the device
  and are read every ``sync_every`` steps (and before checkpoints, checks, evaluations and the end);
  where a batch's label tokens sit is computed on the host before it moves
  (``methods.common.index_labels``), and batches move to a GPU from pinned memory without blocking.
  A non-finite loss is reported at the next read, naming its step.
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
from obliviate.methods.base import SplitMethod
from obliviate.methods.common import index_labels
from obliviate.models.loading import apply_lora
from obliviate.processes import launched_on_cpus
from obliviate.runs import RunDir
from obliviate.training.checkpoint import latest_checkpoint, load_state, save_state
from obliviate.training.checks import Check, CheckState
from obliviate.training.config import TrainConfig
from obliviate.training.divergence import check_loss, check_weights
from obliviate.training.optim import build_optimizer, build_scheduler, decay_masked, param_groups
from obliviate.training.smoothing import smoothed_step

CHECKS_LOG = "checks.jsonl"
# Rows sorted by length in mega-batches of LENGTH_GROUPS x batch_size before batching: measured on TOFU
# forget10 / retain90 (SmolLM2 tokens, batch 8), 1.0-1.5% of the tokens are padding at 64 against 3-4%
# at 16, and the mega-batches still mix rows differently every epoch.
LENGTH_GROUPS = 64


@dataclass
class TrainResult:
    model: torch.nn.Module
    steps: int
    seconds: float
    tokens: int
    last_loss: float | None
    history: list[dict] = field(default_factory=list)
    state_dict: dict | None = None  # FSDP/DeepSpeed: the full weights, gathered (on the main process)
    checks: list[dict] = field(default_factory=list)  # each check's record (as in checks.jsonl)
    stopped_at: int | None = None  # the step a check stopped training at
    best_step: int | None = None  # the check whose weights the model holds (None: the last step's)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _total_micro(cfg: TrainConfig, per_epoch: int) -> int:
    return cfg.max_steps * cfg.grad_accum if cfg.max_steps else max(1, round(cfg.epochs * per_epoch))


def planned_steps(cfg: TrainConfig, n_examples: int, world: int = 1) -> int:
    """Optimizer steps ``train`` will take on ``n_examples`` primary examples (per process), unless a
    check stops it earlier."""
    per_epoch = num_batches(n_examples, cfg.batch_size) // world  # the batches _shard keeps per process
    return math.ceil(_total_micro(cfg, per_epoch) / cfg.grad_accum)


def check_interval(cfg: TrainConfig, n_examples: int, world: int = 1) -> int:
    """Optimizer steps between checks: ``check_every``, or one epoch's steps when it is 0."""
    if cfg.check_every:
        return cfg.check_every
    return max(1, round(num_batches(n_examples, cfg.batch_size) // world / cfg.grad_accum))


def _shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    if world == 1:
        return batches
    usable = len(batches) // world * world
    return batches[:usable][rank::world]


def train(model, tokenizer, method: Method | Procedure, primary: QADataset, cfg: TrainConfig, *,
          retain: QADataset | None = None, fmt: ChatFormat | None = None, run: RunDir | None = None,
          resume: bool = False, sample_weights: torch.Tensor | None = None,
          param_masks: dict[str, torch.Tensor] | None = None,
          on_eval: Callable[[torch.nn.Module, int], None] | None = None, on_check: Check | None = None,
          progress: bool = True, accelerator=None, description: str = "train") -> TrainResult:
    """Train ``model`` with ``method`` on ``primary`` (the forget set, or the finetuning data for
    ``sft``), drawing retain batches from ``retain`` when the method uses them.

    ``param_masks`` maps parameter names to boolean tensors: entries that are False never change.
    ``sample_weights`` (one per primary example) reach the method as ``batch["weight"]``.
    ``on_check(model, step)`` (``training.checks``) runs at step 0, every ``check_every`` steps and
    after the last step; it may stop training and gate samples, and the best-rated weights are
    restored at the end. Raises :class:`~obliviate.training.divergence.TrainingDiverged` when the
    loss or the weights become NaN or infinite.
    """
    if isinstance(method, Procedure):
        raise TypeError(f"method '{method.name}' is not trained by the loop: it is a procedure, run it with its "
                        "apply()")
    if not isinstance(method, Method):
        raise TypeError(f"{type(method).__name__} is not a methods.Method (name, views, needs_ref_model, "
                        "needs_ref_logps, uses_retain, trainable, bind, __call__)")
    smoothing = cfg.sam_rho > 0 or cfg.smooth_sigma > 0
    if smoothing and not isinstance(method, SplitMethod):
        raise ValueError(f"sam_rho / smooth_sigma smooth the forget term alone: method '{method.name}' does not "
                         "expose it (a methods.base.SplitMethod, e.g. any composite method, does)")
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
            epoch_order[epoch] = _shard(length_grouped_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch,
                                                               group_factor=LENGTH_GROUPS), rank, world)
        return epoch_order[epoch]

    per_epoch = len(epoch_batches(0))
    assert per_epoch == num_batches(len(lengths), cfg.batch_size) // world  # planned_steps relies on it
    if per_epoch == 0:
        raise ValueError(f"{len(forget_rows)} examples are too few for batch size {cfg.batch_size} "
                         f"on {world} processes")
    total_micro = _total_micro(cfg, per_epoch)
    total_steps = math.ceil(total_micro / cfg.grad_accum)

    retain_lengths = view_lengths(retain_rows) if retain_rows else []
    retain_per_cycle = len(_shard(length_grouped_batches(retain_lengths, cfg.batch_size, seed=0,
                                                         group_factor=LENGTH_GROUPS), rank, world))
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
                                                                seed=cfg.seed + 10_000 + cycle,
                                                                group_factor=LENGTH_GROUPS), rank, world)
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
    _check_sharded_setup(accelerator, cfg, masks, on_check is not None)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # One schedule step per optimizer step: by default a prepared scheduler steps num_processes times,
    # but total_steps above already counts this process's (sharded) steps.
    scheduler.step_with_optimizer = False
    masked_params = [(dict(accelerator.unwrap_model(model).named_parameters())[n], m) for n, m in masks.items()]
    smooth_params = [p for _, p in trainable]
    smooth_masks = [masks.get(n) for n, _ in trainable] if masks else None

    step, history = 0, []
    checks = CheckState()
    check_log: list[dict] = []
    if resume and run is not None and (ckpt := latest_checkpoint(run)) is not None:
        state = load_state(accelerator, ckpt)
        step = int(state["step"])
        checks = CheckState.load(state.get("checks"), ckpt)
        history = [h for h in run.read_log() if h.get("step", 0) <= step]
        check_log = [c for c in run.read_log(CHECKS_LOG) if c.get("step", 0) <= step]
    if run is not None and accelerator.is_main_process:
        # Steps logged after the checkpoint we resume from are redone: drop them from the logs.
        run.rewrite_log(history)
        if on_check is not None:
            run.rewrite_log(check_log, CHECKS_LOG)
    every = check_interval(cfg, len(forget_rows), world) if on_check is not None else 0

    model.train()
    start_micro = step * cfg.grad_accum
    tokens, last_loss, t0 = 0, None, time.time()
    bar = _progress(progress and accelerator.is_main_process, description, total_steps, step)
    pending: list[dict] = []  # this step's micro-batch logs (device tensors), summed at the optimizer step
    unread: list[tuple[dict, dict]] = []  # steps whose logged values are still on the device

    def read_logs() -> None:
        """Read the logged values of the steps since the last read: one host sync for all of them."""
        nonlocal last_loss
        if not unread:
            return
        flat = torch.stack([v for _, values in unread for v in values.values()]).tolist()
        i = 0
        for record, values in unread:
            logged = dict(zip(values, flat[i:i + len(values)]))
            i += len(values)
            if world > 1:  # log the global batch's numbers, as one process would
                logged = _mean_over_processes(accelerator, logged)
            check_loss(logged["loss"], record["step"], cfg.lr)
            last_loss = logged["loss"]
            record.update({k: round(v, 6) for k, v in logged.items()})
            history.append(record)
            if run is not None and accelerator.is_main_process:
                run.log(record)
            if trackers:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        unread.clear()
        bar.update(step, loss=last_loss)

    def check(at: int) -> bool:
        """Run the check at step ``at``; True when it says stop."""
        assert on_check is not None
        unwrapped = accelerator.unwrap_model(model)
        decision = on_check(unwrapped, at)
        best = checks.record(decision, at, unwrapped)
        model.train()  # a check may score in eval mode
        record = {"step": at, "distance": decision.distance, "stop": decision.stop, "best": best,
                  "gated": len(checks.gated), **decision.criteria}
        check_log.append(record)
        if run is not None and accelerator.is_main_process:
            run.log(record, CHECKS_LOG)
        return decision.stop

    def micro_step(inp: StepInputs, sync: bool, micro: int) -> dict:
        """One micro-batch's forward and backward; its logs (device tensors)."""
        def context(last: bool):
            no_sync = world > 1 and not (sync and last)
            return _both(accelerator.no_sync(model) if no_sync else contextlib.nullcontext(), accelerator.autocast())

        def backward(loss: torch.Tensor) -> None:
            accelerator.backward(loss / cfg.grad_accum)

        if smoothing:
            generator = None
            if cfg.smooth_sigma > 0:  # a pure function of the micro-step, so a resumed run draws the same noise
                generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed * 1_000_003 + micro)
            assert isinstance(method, SplitMethod)
            return smoothed_step(method, inp, smooth_params, backward=backward, context=context, rho=cfg.sam_rho,
                                 sigma=cfg.smooth_sigma, samples=cfg.smooth_samples, masks=smooth_masks,
                                 generator=generator)
        with context(True):
            loss, logs = method(inp)
            backward(loss)
        return {"loss": loss.detach(), **logs}  # the method's own "loss" log wins, as before

    micro = start_micro
    stopped = on_check is not None and step == 0 and check(0)
    with bar:
        while micro < total_micro and not stopped:
            epoch, pos = divmod(micro, per_epoch)
            idx = epoch_batches(epoch)[pos]
            batch = collate([forget_rows[i] for i in idx], idx, pad_id,
                            checks.weights(sample_weights, len(forget_rows)), ref_logps)
            rbatch = retain_batch(micro)
            tokens += batch_tokens(batch) + batch_tokens(rbatch)  # counted on the CPU: no device sync
            batch = index_labels(batch)  # label positions found on the host
            rbatch = index_labels(rbatch) if rbatch is not None else None
            batch, rbatch = _to_device(batch, accelerator.device), _to_device(rbatch, accelerator.device)
            sync = (micro + 1) % cfg.grad_accum == 0 or micro + 1 == total_micro
            pending.append(micro_step(StepInputs(model=model, forget=batch, retain=rbatch, ref_model=ref_model,
                                                 step=step, float_logs=False), sync, micro))
            micro += 1
            if not sync:
                continue
            acc_logs: dict[str, torch.Tensor] = {}
            for logged in pending:  # in float64, in order: the same numbers as summing Python floats
                for k, v in logged.items():
                    value = torch.as_tensor(v, device=accelerator.device).double() / cfg.grad_accum
                    acc_logs[k] = acc_logs[k] + value if k in acc_logs else value
            pending = []
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
            unread.append(({"step": step, "epoch": round(micro / per_epoch, 4), "lr": scheduler.get_last_lr()[0],
                            "seconds": round(time.time() - t0, 3)}, acc_logs))
            due_check = on_check is not None and (step % every == 0 or micro == total_micro)
            due_save = run is not None and cfg.save_every and step % cfg.save_every == 0 and step < total_steps
            due_eval = on_eval is not None and cfg.eval_every and step % cfg.eval_every == 0
            if step % cfg.sync_every == 0 or due_check or due_save or due_eval or micro == total_micro:
                read_logs()  # a non-finite loss stops training here, before a check, checkpoint or evaluation
            if due_check and check(step):
                stopped = True
                break
            if due_save:
                assert run is not None
                check_weights(accelerator, accelerator.unwrap_model(model), step, cfg.lr)  # never checkpoint NaN
                save_state(accelerator, run, step, extra={"checks": checks.to_json()} if on_check else None,
                           write=checks.write if on_check else None)
            if due_eval:
                assert on_eval is not None
                on_eval(accelerator.unwrap_model(model), step)
        read_logs()
    check_weights(accelerator, accelerator.unwrap_model(model), step, cfg.lr)
    if checks.best_step is not None and checks.best_step != step:
        checks.restore_best(accelerator.unwrap_model(model))  # the closest check's weights, not the last step's
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
    return TrainResult(model, step, seconds, tokens, last_loss, history, state_dict, check_log, checks.stopped_at,
                       checks.best_step)


def _to_device(batch, device: torch.device):
    """``data.batches.to_device``; on CUDA through pinned memory, without blocking: a copy from pageable
    host memory waits for the device's stream first, which would be a host sync per batch."""
    if device.type != "cuda":
        return to_device(batch, device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch.pin_memory().to(device, non_blocking=True) if torch.is_tensor(batch) else batch


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


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


def _check_sharded_setup(accelerator, cfg: TrainConfig, masks: dict, checking: bool = False) -> None:
    """What FSDP / DeepSpeed need before ``prepare``, and what the loop cannot do under them."""
    kind = accelerator.distributed_type
    if (checking or cfg.sam_rho or cfg.smooth_sigma) and _sharded(accelerator):
        raise ValueError(f"checks during training and sam_rho / smooth_sigma need whole parameters on each process; "
                         f"they are not supported with {kind.value} (use DDP, or one process)")
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
