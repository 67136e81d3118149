"""The one training loop, shared by finetuning and every unlearning method.

A method turns a batch into a loss (``obliviate.methods``); this loop owns everything else: batching
(length-grouped, deterministic per seed and epoch, so a resumed run sees the same batches), the
retain stream, Accelerate (one CPU, one GPU, or several processes with ``accelerate launch``; mixed
precision; DDP/FSDP/DeepSpeed from the Accelerate config), gradient accumulation, clipping, LoRA,
gradient checkpointing, weight masks (only masked weights move: no gradient, no weight decay),
reference log-probs computed once before training, resumable checkpoints and per-step logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from obliviate.data.chat import ChatFormat, Encoded, length_grouped_batches, num_batches, pad_batch
from obliviate.data.qa import QADataset
from obliviate.data.refusal import refusal_for
from obliviate.processes import launched_on_cpus
from obliviate.runs import RunDir, atomic_write_json
from obliviate.training.config import TrainConfig


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


def encode_views(fmt: ChatFormat, ds: QADataset, views: tuple[str, ...]) -> list[dict[str, Encoded]]:
    """Encode each example once per view ("answer": the true answer, "idk": a refusal answer)."""
    from obliviate.data.qa import DataError

    out = []
    for i, ex in enumerate(ds.examples):
        row = {}
        for view in views:
            if view != "answer" and not ex.question:
                raise DataError(ds.source, ex.meta.get("row", i + 1), f"this method's '{view}' view needs questions; "
                                "the row is a plain-text document (use ga, graddiff, npo, simnpo or rmu)")
            answer = ex.answer if view == "answer" else refusal_for(i)
            try:
                row[view] = fmt.encode(ex.question, answer)
            except ValueError as exc:
                raise DataError(ds.source, ex.meta.get("row", i + 1), str(exc)) from None
        out.append(row)
    return out


def collate(rows: list[dict[str, Encoded]], index: list[int], pad_id: int,
            weights: torch.Tensor | None = None, ref_logps: dict[str, torch.Tensor] | None = None) -> dict:
    batch: dict = {view: pad_batch([r[view] for r in rows], pad_id) for view in rows[0]}
    idx = torch.tensor(index, dtype=torch.long)
    batch["index"] = idx
    batch["weight"] = weights[idx] if weights is not None else torch.ones(len(index))
    if ref_logps:
        batch["ref_logp"] = {view: values[idx] for view, values in ref_logps.items()}
    return batch


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


@torch.no_grad()
def precompute_ref_logps(model, rows, pad_id, batch_size, device) -> dict[str, torch.Tensor]:
    """Summed log-probs of each view's label tokens under the model as it is now (the frozen
    reference), computed once so no reference copy has to stay in memory during training."""
    from obliviate.methods.common import sequence_logps

    was_training = model.training
    model.eval()
    views = list(rows[0])
    out = {v: torch.zeros(len(rows)) for v in views}
    for start in range(0, len(rows), batch_size):
        chunk = list(range(start, min(start + batch_size, len(rows))))
        for v in views:
            view = to_device(pad_batch([rows[i][v] for i in chunk], pad_id), device)
            out[v][chunk] = sequence_logps(model, view)[0].float().cpu()
    model.train(was_training)
    return out


def _schedule(cfg: TrainConfig, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1 - progress)

    return factor


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


def _latest_checkpoint(run: RunDir) -> Path | None:
    done = [p for p in (run.path / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def train(model, tokenizer, method, primary: QADataset, cfg: TrainConfig, *, retain: QADataset | None = None,
          fmt: ChatFormat | None = None, run: RunDir | None = None, resume: bool = False,
          sample_weights: torch.Tensor | None = None, param_masks: dict[str, torch.Tensor] | None = None,
          on_eval: Callable[[torch.nn.Module, int], None] | None = None, progress: bool = True,
          accelerator=None, description: str = "train") -> TrainResult:
    """Train ``model`` with ``method`` on ``primary`` (the forget set, or the finetuning data for
    ``sft``), drawing retain batches from ``retain`` when the method uses them.

    ``param_masks`` maps parameter names to boolean tensors: entries that are False never change.
    ``sample_weights`` (one per primary example) reach the method as ``batch["weight"]``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from obliviate.methods import StepInputs

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
    if getattr(method, "uses_retain", False) and retain is None:
        raise ValueError(f"method '{method.name}' needs retain data")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora:
        from obliviate.models.loading import apply_lora

        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha)
    if hasattr(method, "bind"):
        method.bind(model)  # model-dependent defaults (e.g. RMU's layer) before choosing trainables
    for name, p in model.named_parameters():
        if p.requires_grad or not cfg.lora:
            p.requires_grad_(bool(method.trainable(name)))
    ref_model = None
    if getattr(method, "needs_ref_model", False):
        import copy

        ref_model = copy.deepcopy(accelerator.unwrap_model(model)).eval().requires_grad_(False)
        ref_model.to(accelerator.device)

    pad_id = tokenizer.pad_token_id
    forget_rows = encode_views(fmt, primary, tuple(getattr(method, "views", ("answer",))))
    retain_rows = encode_views(fmt, retain, ("answer",)) if retain is not None and method.uses_retain else None
    if sample_weights is not None and len(sample_weights) != len(forget_rows):
        raise ValueError(f"{len(sample_weights)} sample weights for {len(forget_rows)} examples")
    model.to(accelerator.device)
    ref_logps = None
    if getattr(method, "needs_ref_logps", False):
        with accelerator.autocast():  # same precision as training, so log-ratios start at 0
            ref_logps = precompute_ref_logps(model, forget_rows, pad_id, cfg.batch_size, accelerator.device)

    rank, world = accelerator.process_index, accelerator.num_processes
    lengths = [len(r["answer"] if "answer" in r else next(iter(r.values()))) for r in forget_rows]

    def epoch_batches(epoch: int) -> list[list[int]]:
        return _shard(length_grouped_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch), rank, world)

    per_epoch = len(epoch_batches(0))
    assert per_epoch == num_batches(len(lengths), cfg.batch_size) // world  # planned_steps relies on it
    if per_epoch == 0:
        raise ValueError(f"{len(forget_rows)} examples are too few for batch size {cfg.batch_size} "
                         f"on {world} processes")
    total_micro = _total_micro(cfg, per_epoch)
    total_steps = math.ceil(total_micro / cfg.grad_accum)

    retain_lengths = [len(r["answer"]) for r in retain_rows] if retain_rows else []

    def retain_batch(micro: int) -> dict | None:
        # A pure function of the micro-step index, so a resumed run draws the same retain batches.
        if not retain_rows:
            return None
        n_batches = len(_shard(length_grouped_batches(retain_lengths, cfg.batch_size, seed=0), rank, world))
        cycle, pos = divmod(micro, max(1, n_batches))
        order = _shard(length_grouped_batches(retain_lengths, cfg.batch_size, seed=cfg.seed + 10_000 + cycle),
                       rank, world)
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
                raise ValueError(f"weight mask for '{name}' has shape {tuple(mask.shape)}, parameter has {tuple(p.shape)}")
            m = mask.to(device=p.device, dtype=p.dtype)
            masks[name] = m
            hooks.append(p.register_hook(lambda g, m=m: g * m))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters")
    # Masked weights get their weight decay by hand, on masked entries only; AdamW's decoupled decay
    # would otherwise shrink weights whose gradient is zero.
    decay = [p for n, p in trainable if n not in masks and p.ndim >= 2]
    no_decay = [p for n, p in trainable if n not in masks and p.ndim < 2] + [p for n, p in trainable if n in masks]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    sharded = _sharded(accelerator)
    optimizer = _optimizer(cfg, groups, sharded)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total_steps))
    _check_sharded_setup(accelerator, cfg, masks)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # One schedule step per optimizer step: by default a prepared scheduler steps num_processes times,
    # but total_steps above already counts this process's (sharded) steps.
    scheduler.step_with_optimizer = False
    masked_params = [(dict(accelerator.unwrap_model(model).named_parameters())[n], m) for n, m in masks.items()]

    step, history = 0, []
    if resume and run is not None and (ckpt := _latest_checkpoint(run)) is not None:
        accelerator.load_state(str(ckpt))
        step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
        history = [h for h in run.read_log() if h.get("step", 0) <= step]
    if run is not None and accelerator.is_main_process:
        # Steps logged after the checkpoint we resume from are redone: drop them from the log.
        run.rewrite_log(history)

    model.train()
    start_micro = step * cfg.grad_accum
    tokens, last_loss, t0 = 0, None, time.time()
    bar = _progress(progress and accelerator.is_main_process, description, total_steps, step)
    acc_logs: dict[str, float] = {}
    micro = start_micro
    with bar:
        while micro < total_micro:
            epoch, pos = divmod(micro, per_epoch)
            idx = epoch_batches(epoch)[pos]
            batch = to_device(collate([forget_rows[i] for i in idx], idx, pad_id, sample_weights, ref_logps),
                              accelerator.device)
            rbatch = to_device(retain_batch(micro), accelerator.device)
            sync = (micro + 1) % cfg.grad_accum == 0 or micro + 1 == total_micro
            ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(model)
            with ctx, accelerator.autocast():
                loss, logs = method(StepInputs(model=model, forget=batch, retain=rbatch, ref_model=ref_model, step=step))
                accelerator.backward(loss / cfg.grad_accum)
            tokens += int(sum(v["attention_mask"].sum() for k, v in batch.items() if isinstance(v, dict) and "attention_mask" in v))
            if rbatch is not None:
                tokens += int(rbatch["answer"]["attention_mask"].sum())
            for k, v in {"loss": float(loss.detach()), **logs}.items():
                acc_logs[k] = acc_logs.get(k, 0.0) + float(v) / cfg.grad_accum
            micro += 1
            if not sync:
                continue
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if cfg.weight_decay and masked_params:
                lr = scheduler.get_last_lr()[0]
                with torch.no_grad():
                    for p, m in masked_params:
                        p.sub_(p * m * (lr * cfg.weight_decay))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if world > 1:  # log the global batch's numbers, as one process would
                acc_logs = _mean_over_processes(accelerator, acc_logs)
            if step == 1 or micro == total_micro:
                _check_replicas(accelerator, model)
            last_loss = acc_logs["loss"]
            record = {"step": step, "epoch": round(micro / per_epoch, 4), "lr": scheduler.get_last_lr()[0],
                      "seconds": round(time.time() - t0, 3), **{k: round(v, 6) for k, v in acc_logs.items()}}
            acc_logs = {}
            history.append(record)
            if run is not None and accelerator.is_main_process:
                run.log(record)
            if trackers:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            bar.update(step, loss=last_loss)
            if run is not None and cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                _save_state(accelerator, run, step)
            if on_eval is not None and cfg.eval_every and step % cfg.eval_every == 0:
                on_eval(accelerator.unwrap_model(model), step)
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


def _optimizer(cfg: TrainConfig, groups: list[dict], sharded: bool) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        # One fused kernel per step when every weight is on a GPU (not under FSDP/DeepSpeed, which
        # own the parameters); torch's default implementation elsewhere.
        fused = not sharded and all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError(f"optimizer {cfg.optimizer} needs bitsandbytes (pip install bitsandbytes)") from None
    if cfg.optimizer == "paged_adamw8bit" and not torch.cuda.is_available():
        raise ValueError("paged_adamw8bit pages optimiser state between GPU and CPU memory: it needs CUDA "
                         "(use adamw8bit)")
    cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, lr=cfg.lr)


def _tracking_kwargs(trackers: list[str], run: RunDir | None) -> dict:
    """Accelerate's own TensorBoard / MLflow trackers, writing under ``RUN/tracking`` (MLflow: a local
    file store there unless MLFLOW_TRACKING_URI says otherwise)."""
    if not trackers:
        return {}
    import os

    from accelerate.utils import is_mlflow_available, is_tensorboard_available

    missing = [t for t, ok in (("tensorboard", is_tensorboard_available), ("mlflow", is_mlflow_available))
               if t in trackers and not ok()]
    if missing:
        raise ValueError(f"log_with={','.join(missing)} needs the package installed "
                         f"(pip install {' '.join('mlflow-skinny' if m == 'mlflow' else 'tensorboard' for m in missing)})")
    root = run.file("tracking")
    if "mlflow" in trackers and "MLFLOW_TRACKING_URI" not in os.environ:
        import mlflow

        # The local file store the issue asks for; MLflow 3 wants this opt-in for it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((root / "mlruns").resolve().as_uri())
    return {"log_with": trackers, "project_dir": str(root)}


def _sharded(accelerator) -> bool:
    """FSDP or DeepSpeed: the engine owns the parameters, and no process holds whole ones."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _check_sharded_setup(accelerator, cfg: TrainConfig, masks: dict) -> None:
    """What FSDP / DeepSpeed need before ``prepare``, and what the loop cannot do under them."""
    from accelerate.utils import DistributedType

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
    from accelerate.utils import DistributedType

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


def _save_state(accelerator, run: RunDir, step: int) -> None:
    """Resumable state, written beside and renamed, so a crash never leaves a half checkpoint."""
    accelerator.wait_for_everyone()
    root = run.path / "checkpoints"
    tmp = root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()  # no process writes into tmp before it is cleared
    accelerator.save_state(str(tmp))  # every process writes its own RNG state file
    accelerator.wait_for_everyone()  # all of them are in tmp before it is renamed
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", {"step": step})
        final = root / f"step-{step}"
        tmp.rename(final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


class _progress:
    """A rich progress bar for steps (a no-op when disabled, e.g. on non-main processes)."""

    def __init__(self, enabled: bool, description: str, total: int, done: int):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
