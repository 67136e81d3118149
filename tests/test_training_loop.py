"""The shared training loop: finetuning learns, unlearning moves the right way, masks freeze weights,
checkpoints resume to the same result, logs and configs are written."""

from __future__ import annotations

import pytest
import torch

from obliviate.data.benchmark import load_benchmark
from obliviate.data.chat import ChatFormat
from obliviate.errors import UserError
from obliviate.evaluation.logprobs import score_pairs
from obliviate.methods import Composite, build_method
from obliviate.methods.nll import NLL
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.runs import RunDir
from obliviate.training.config import TrainConfig
from obliviate.training.divergence import TrainingDiverged
from obliviate.training.loop import train


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
