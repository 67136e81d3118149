"""The shared training loop: finetuning learns, unlearning moves the right way, masks freeze weights,
checkpoints resume to the same result, logs and configs are written."""

from __future__ import annotations

import inspect

import pytest
import torch
from accelerate.utils import set_seed

from obliviate.data.batches import collate, encode_views, view_lengths
from obliviate.data.benchmark import load_benchmark
from obliviate.data.chat import ChatFormat, length_grouped_batches, num_batches, pad_batch
from obliviate.errors import UserError
from obliviate.evaluation.logprobs import score_pairs
from obliviate.methods import Composite, StepInputs, build_method, reference_logps_for_rows, sequence_logps
from obliviate.methods.common import target_logps, token_logps
from obliviate.methods.nll import NLL
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.runs import RunDir
from obliviate.training.config import TrainConfig
from obliviate.training.divergence import TrainingDiverged
from obliviate.training.loop import LENGTH_GROUPS, train
from obliviate.training.optim import build_optimizer, build_scheduler, param_groups


def mean_nll(model, tok, ds):
    return sum(s.nll for s in score_pairs(model, ChatFormat(tok), [(e.question, e.answer) for e in ds])) / len(ds)


@pytest.fixture()
def parts(tiny_model_dir, small_bench):
    bench = load_benchmark(small_bench)
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), bench


def test_finetune_lowers_loss_and_logs(parts, tmp_path):
    model, tok, bench = parts
    data = bench.split("train")
    before = mean_nll(model, tok, data)
    run = RunDir.open(tmp_path / "run", kind="train")
    res = train(model, tok, build_method("sft"), data, TrainConfig(epochs=3, lr=3e-3, batch_size=4), run=run,
                progress=False)
    assert mean_nll(res.model, tok, data) < before - 0.5
    log = run.read_log()
    assert [r["step"] for r in log] == list(range(1, res.steps + 1))
    assert res.tokens > 0 and all("loss" in r and "lr" in r for r in log)


def test_gradient_ascent_raises_forget_loss_more_than_retain(parts):
    model, tok, bench = parts
    forget, retain = bench.split("forget"), bench.split("retain")
    f0, r0 = mean_nll(model, tok, forget), mean_nll(model, tok, retain)
    res = train(model, tok, build_method("graddiff"), forget, TrainConfig(epochs=3, lr=2e-3, batch_size=2,
                warmup_ratio=0, scheduler="constant"), retain=retain, progress=False)
    f1, r1 = mean_nll(res.model, tok, forget), mean_nll(res.model, tok, retain)
    assert f1 > f0 + 0.1
    assert (f1 - f0) > (r1 - r0)


def test_retain_required(parts):
    model, tok, bench = parts
    with pytest.raises(ValueError, match="retain"):
        train(model, tok, build_method("graddiff"), bench.split("forget"), TrainConfig(), progress=False)


def test_weight_mask_freezes_weights_bit_exactly_with_weight_decay(parts):
    model, tok, bench = parts
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.3
             for i, (n, p) in enumerate(model.named_parameters())}
    res = train(model, tok, build_method("npo"), bench.split("forget"),
                TrainConfig(epochs=2, lr=1e-2, weight_decay=0.1, batch_size=2), retain=bench.split("retain"),
                param_masks=masks, progress=False)
    moved = 0
    for n, p in res.model.named_parameters():
        frozen = ~masks[n]
        assert torch.equal(p.detach()[frozen], before[n][frozen]), n
        moved += int((p.detach()[masks[n]] != before[n][masks[n]]).sum())
    assert moved > 0


def test_mask_shape_errors(parts):
    model, tok, bench = parts
    name = next(iter(dict(model.named_parameters())))
    with pytest.raises(ValueError, match="shape"):
        train(model, tok, build_method("ga"), bench.split("forget"), TrainConfig(),
              param_masks={name: torch.ones(3, dtype=torch.bool)}, progress=False)
    with pytest.raises(ValueError, match="unknown parameter"):
        train(model, tok, build_method("ga"), bench.split("forget"), TrainConfig(),
              param_masks={"nope": torch.ones(3, dtype=torch.bool)}, progress=False)


def test_resume_from_checkpoint_matches_uninterrupted(tiny_model_dir, small_bench, tmp_path):
    bench = load_benchmark(small_bench)
    tok = load_tokenizer(str(tiny_model_dir))
    cfg = TrainConfig(epochs=2, lr=3e-3, batch_size=4, save_every=2, seed=3)
    data = bench.split("train")

    full = train(load_model(str(tiny_model_dir)), tok, build_method("sft"), data, cfg,
                 run=RunDir.open(tmp_path / "a", kind="train"), progress=False).model

    class Interrupt(Exception):
        pass

    def stop_at(model, step):
        if step == 3:
            raise Interrupt

    run_b = RunDir.open(tmp_path / "b", kind="train")
    with pytest.raises(Interrupt):
        train(load_model(str(tiny_model_dir)), tok, build_method("sft"), data,
              TrainConfig(**{**cfg.to_dict(), "eval_every": 3}), run=run_b, on_eval=stop_at, progress=False)
    assert (tmp_path / "b" / "checkpoints" / "step-2" / "trainer_state.json").exists()
    resumed = train(load_model(str(tiny_model_dir)), tok, build_method("sft"), data, cfg, run=run_b,
                    resume=True, progress=False)
    assert [r["step"] for r in run_b.read_log()] == list(range(1, resumed.steps + 1))
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_lora_trains_adapters_and_merges(parts):
    model, tok, bench = parts
    data = bench.split("train")
    before = mean_nll(model, tok, data)
    res = train(model, tok, build_method("sft"), data, TrainConfig(epochs=2, lr=1e-2, batch_size=4, lora=True,
                lora_r=4), progress=False)
    assert not any("lora" in n for n, _ in res.model.named_parameters())  # merged back
    assert mean_nll(res.model, tok, data) < before


def test_train_config_validation():
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="unknown training options: nope"):
        TrainConfig.from_dict({"nope": 1})


def test_steps_reach_tensorboard_and_mlflow(parts, tmp_path, monkeypatch):
    """``log_with`` sends the same per-step numbers as log.jsonl to Accelerate's trackers, as local files."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model, tok, bench = parts
    run = RunDir.open(tmp_path / "run", kind="train")
    train(model, tok, build_method("sft"), bench.split("train"),
          TrainConfig(max_steps=3, lr=1e-3, batch_size=4, log_with="tensorboard, mlflow"), run=run, progress=False,
          description="finetune")
    losses = {r["step"]: r["loss"] for r in run.read_log()}
    assert sorted(losses) == [1, 2, 3]

    events = list((run.path / "tracking").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("loss")} == pytest.approx(losses, rel=1e-6)

    client = MlflowClient((run.path / "tracking" / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "finetune"]
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "loss")} == pytest.approx(losses)
    assert mlrun.data.params["lr"] == "0.001"


def test_unknown_tracker_is_refused():
    with pytest.raises(ValueError, match="unknown tracker wandb"):
        TrainConfig(log_with="tensorboard,wandb")


def test_eight_bit_adamw_trains_with_8_bit_states(parts, monkeypatch):
    """``optimizer=adamw8bit`` builds bitsandbytes' AdamW8bit (its moments are uint8) and still learns."""
    import bitsandbytes as bnb

    made = []

    class Spy(bnb.optim.AdamW8bit):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(bnb.optim, "AdamW8bit", Spy)
    model, tok, bench = parts
    data = bench.split("train")
    before = mean_nll(model, tok, data)
    res = train(model, tok, build_method("sft"), data, TrainConfig(epochs=3, lr=3e-3, batch_size=4,
                optimizer="adamw8bit"), progress=False)
    assert mean_nll(res.model, tok, data) < before - 0.5
    (opt,) = made
    states = [s for s in opt.state.values() if "state1" in s]
    assert states and any(s["state1"].dtype == torch.uint8 for s in states)  # big tensors: 8-bit moments
    with pytest.raises(ValueError, match="paged_adamw8bit .* needs CUDA"):
        train(model, tok, build_method("sft"), data, TrainConfig(max_steps=1, optimizer="paged_adamw8bit"),
              progress=False)


def test_a_diverging_loss_stops_training_naming_the_step(parts):
    """lr=1e30 leaves finite but huge weights after step 1; the next forward overflows and the loss is
    NaN. Training stops there with a user error naming the step and the fix, not a NaN model marked done."""
    model, tok, bench = parts
    with pytest.raises(TrainingDiverged, match=r"at step [2-9]\d*: the loss is (nan|inf|-inf); lower the "
                       "learning rate") as exc:
        train(model, tok, build_method("sft"), bench.split("train"),
              TrainConfig(max_steps=6, lr=1e30, batch_size=4, warmup_ratio=0), progress=False)
    assert isinstance(exc.value, UserError)
    assert "lr=1e+30" in str(exc.value)


class _NaNGradientNLL(NLL):
    """The finetuning NLL plus a term that is 0 but has a NaN gradient (d sqrt(x)/dx at 0 is inf,
    times 0): each step's loss is finite, the weights turn NaN at the update."""

    def __call__(self, inp):
        first = next(inp.model.parameters())
        return super().__call__(inp) + (first.sum() * 0).sqrt()


def test_non_finite_weights_stop_training_and_are_never_checkpointed(parts, tmp_path):
    model, tok, bench = parts
    run = RunDir.open(tmp_path / "run", kind="train")
    with pytest.raises(TrainingDiverged, match=r"by step 1: weights \(.+\) hold NaN or infinite values; lower"):
        train(model, tok, Composite(_NaNGradientNLL(), name="nan-grad"), bench.split("train"),
              TrainConfig(max_steps=3, lr=1e-3, batch_size=4, save_every=1), run=run, progress=False)
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [r["step"] for r in run.read_log()] == [1]  # the step's loss was finite and logged


def test_non_finite_weights_at_the_end_stop_training(parts):
    model, tok, bench = parts
    with pytest.raises(TrainingDiverged, match="by step 1: weights"):
        train(model, tok, Composite(_NaNGradientNLL(), name="nan-grad"), bench.split("train"),
              TrainConfig(max_steps=1, lr=1e-3, batch_size=4), progress=False)


def test_a_procedure_is_not_trained_by_the_loop(parts):
    model, tok, bench = parts
    with pytest.raises(TypeError, match="'unierase' is not trained by the loop: it is a procedure"):
        train(model, tok, build_method("unierase"), bench.split("forget"), TrainConfig(), progress=False)


# ---------------------------------------------------------------- training near the floor


def test_adamw_is_one_fused_kernel_on_a_cpu_with_the_per_tensor_loops_numbers():
    """On a CPU the optimizer runs torch's fused AdamW (one pass over the weights per step, not one
    per element-wise operation): the same updates as torch's per-tensor loop, up to float rounding."""
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32), torch.randn(7, 5)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(4)]
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)

    def stepped(make):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = make(param_groups([(f"w{i}", p) for i, p in enumerate(params)], set(), cfg.weight_decay))
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        return optimizer, params

    fused, got = stepped(lambda groups: build_optimizer(cfg, groups, False))
    assert fused.defaults["fused"] is True
    _, want = stepped(lambda groups: torch.optim.AdamW(groups, lr=cfg.lr, foreach=False))
    for g, w, start in zip(got, want, weights):
        assert not torch.equal(g, start)
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    sharded, _ = stepped(lambda groups: build_optimizer(cfg, groups, True))  # FSDP/DeepSpeed own the weights
    assert not sharded.defaults["fused"]


def _reference_history(model, tok, method, data, retain, cfg):
    """The per-step log of a plain loop, obviously correct: the batches the loop draws (length-grouped
    per epoch and per retain cycle), the method called as a whole (its logs read as floats at every
    micro-batch), float sums, backward, clipping, the optimizer and schedule of ``training.optim``."""
    set_seed(cfg.seed)
    fmt, pad = ChatFormat(tok), tok.pad_token_id
    method.bind(model)
    rows = encode_views(fmt, data, tuple(method.views))
    rrows = encode_views(fmt, retain, ("answer",)) if method.uses_retain else None
    ref = reference_logps_for_rows(model, rows, pad, cfg.batch_size) if method.needs_ref_logps else None
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, param_groups(trainable, set(), cfg.weight_decay), False)
    per_epoch = num_batches(len(rows), cfg.batch_size)
    total_micro = cfg.max_steps * cfg.grad_accum
    scheduler = build_scheduler(optimizer, cfg, cfg.max_steps)
    lengths = view_lengths(rows)
    rlengths = view_lengths(rrows) if rrows else []
    history, acc, step = [], {}, 0
    for micro in range(total_micro):
        epoch, pos = divmod(micro, per_epoch)
        idx = length_grouped_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch, group_factor=LENGTH_GROUPS)[pos]
        rbatch = None
        if rrows:
            cycle, rpos = divmod(micro, num_batches(len(rrows), cfg.batch_size))
            ridx = length_grouped_batches(rlengths, cfg.batch_size, seed=cfg.seed + 10_000 + cycle,
                                          group_factor=LENGTH_GROUPS)[rpos]
            rbatch = collate([rrows[i] for i in ridx], ridx, pad)
        batch = collate([rows[i] for i in idx], idx, pad, None, ref)
        loss, logs = method(StepInputs(model=model, forget=batch, retain=rbatch, step=step))
        (loss / cfg.grad_accum).backward()
        for k, v in logs.items():
            acc[k] = acc.get(k, 0.0) + float(v) / cfg.grad_accum
        if (micro + 1) % cfg.grad_accum == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, **{k: round(v, 6) for k, v in acc.items()}})
            acc = {}
    return history


@pytest.mark.parametrize("name", ["graddiff", "npo"])
def test_logged_losses_equal_a_plain_loop_read_every_step(tiny_model_dir, small_bench, name):
    """Logged values read from the device every ``sync_every`` steps, label positions found on the host,
    logits only at label positions: the same per-step numbers as a plain loop reading every step."""
    bench = load_benchmark(small_bench)
    tok = load_tokenizer(str(tiny_model_dir))
    cfg = TrainConfig(max_steps=5, grad_accum=2, batch_size=2, lr=3e-3, sync_every=3, seed=1)
    forget, retain = bench.split("forget"), bench.split("retain")
    res = train(load_model(str(tiny_model_dir)), tok, build_method(name), forget, cfg, retain=retain, progress=False)
    reference = _reference_history(load_model(str(tiny_model_dir)), tok, build_method(name), forget, retain, cfg)
    logged = [{k: v for k, v in r.items() if k not in ("epoch", "lr", "seconds")} for r in res.history]
    assert logged == reference


class _DeviceTensor(torch.Tensor):
    """A tensor that stands for one on an accelerator: it records every read of its value on the host
    (``.item()``, ``float()``, ``bool()``, ``.tolist()``, ``nonzero``...) made from obliviate's own code.
    Every tensor computed from it is one too, so the losses and logs of a step are tracked."""

    reads: list[str] = []
    others: list[str] = []  # reads made by the model's own code (transformers), not obliviate's
    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero,
             torch.bincount, torch.Tensor.bincount, torch.Tensor.cpu, torch.Tensor.any, torch.Tensor.all}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.READS:  # who asked: the first caller outside torch
            caller = next(f for f in inspect.stack()[1:] if "/torch/" not in f.filename)
            if "/obliviate/" in caller.filename and "/tests/" not in caller.filename:
                cls.reads.append(f"{caller.filename.rsplit('/obliviate/', 1)[1]}:{caller.function}")
            else:
                cls.others.append(f"{caller.filename}:{caller.lineno}:{caller.function}")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_no_host_reads_per_step(tiny_model_dir, small_bench, monkeypatch):
    """Every batch tensor is a _DeviceTensor: the training step of a method reads nothing back on the
    host; the loop reads the logged values once per ``sync_every`` steps."""
    from obliviate.training import loop

    real = loop.to_device

    def to_fake_device(batch, device):
        moved = real(batch, device)
        return {k: to_fake_device(v, device) if isinstance(v, dict) else
                v.as_subclass(_DeviceTensor) if torch.is_tensor(v) else v for k, v in moved.items()} \
            if isinstance(moved, dict) else moved

    monkeypatch.setattr(loop, "to_device", to_fake_device)
    bench = load_benchmark(small_bench)
    tok = load_tokenizer(str(tiny_model_dir))
    for name in ("npo", "graddiff", "idk_dpo", "npo_kl", "wga", "undial", "pdu"):
        _DeviceTensor.reads = []
        res = train(load_model(str(tiny_model_dir)), tok, build_method(name), bench.split("forget"),
                    TrainConfig(max_steps=6, batch_size=2, sync_every=3), retain=bench.split("retain"), progress=False)
        assert len(res.history) == 6
        assert _DeviceTensor.reads == ["training/loop.py:read_logs"] * 2, (name, _DeviceTensor.reads)


def test_label_positions_path_equals_full_logits(tiny_model_dir, small_bench, monkeypatch):
    """Logits computed at the label positions only (``logits_to_keep``) and label positions found on the
    host give the per-sample log-probs and gradients of the full-logits path within 1e-5."""
    from obliviate.methods import common

    bench = load_benchmark(small_bench)
    tok = load_tokenizer(str(tiny_model_dir))
    rows = encode_views(ChatFormat(tok), bench.split("forget"), ("answer",))
    view = pad_batch([r["answer"] for r in rows], tok.pad_token_id)
    model = load_model(str(tiny_model_dir))
    assert common._slices_logits(type(model))

    def run(v):
        model.zero_grad()
        logp, n = sequence_logps(model, v)
        logp.sum().backward()
        return logp.detach(), n, [p.grad.clone() for p in model.parameters()]

    sliced = run(common.index_labels({"answer": view})["answer"])
    monkeypatch.setattr(common, "_slices_logits", lambda cls: False)
    full = run(view)
    torch.testing.assert_close(sliced[0], full[0], rtol=0, atol=1e-5)
    assert torch.equal(sliced[1], full[1])
    for a, b in zip(sliced[2], full[2]):  # sums over many positions: float rounding differs a little
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # per token, against log_softmax over the whole [B, T, V] logits, gathered by hand
    monkeypatch.undo()
    with torch.no_grad():
        tokens, rows = token_logps(model, common.index_labels({"answer": view})["answer"])
        logits = model(input_ids=view["input_ids"], attention_mask=view["attention_mask"]).logits[:, :-1]
        labels = view["labels"][:, 1:]
        mask = labels != -100
        expected = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)[mask]
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)
    assert rows.tolist() == mask.nonzero()[:, 0].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chunked_target_logps_equal_log_softmax(dtype, chunk):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 50, generator=gen) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (7,), generator=gen)
    weights = torch.randn(7, generator=gen)
    got = target_logps(logits, targets, chunk)
    (got * weights).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    plain = logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    (plain * weights).sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad.float(), logits.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
