"""Several processes compute what one process computes.

Training: 2 CPU processes (gloo, torchrun on 127.0.0.1) with batch size B each must end with the
weights of 1 process with batch size 2B whose every batch is the union of the two processes' batches
of that step. Why they should: DDP averages the two processes' gradients, and each process's loss is a
mean over its B samples, so the average is the 2B-sample mean of the one-process run, as long as every
mean in the loss is a per-sample mean (the rows here all have the same number of tokens, so the retain
NLL's token mean is one too). The one-process run gets that batch composition by replacing the loop's
batcher with one that joins consecutive pairs of B-batches: process r of 2 takes batches r, r+2, ...
NPO with retain NLL, gradient accumulation 2, AdamW, clipping, weight decay and a decaying learning
rate are all in play; a schedule stepped twice per step on 2 processes (Accelerate's prepared
scheduler does that) or unsynchronised gradients move the weights by far more than the tolerance.

Evaluation: ``evaluate_model(..., distributed=True)`` on 2 processes returns, on each process, exactly
the result of one process (same batches, same padding, so bitwise the same numbers and generations).

The worker is this file run as a script (``python tests/test_distributed.py worker ...``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from obliviate.data.qa import QADataset, QAExample
from obliviate.evaluation.distributed import merge_in_order, process_share

B = 2  # per-process batch size
N = 16  # rows per training set: 8 batches of 2, 4 steps of 2 micro-batches per epoch per process
TIMEOUT = 150


def training_sets() -> tuple[QADataset, QADataset]:
    """Forget and retain rows whose questions and answers all have the same length (byte tokenizer)."""
    def rows(tag: str, n: int) -> QADataset:
        return QADataset([QAExample(f"{tag} question number {i:03d}?", f"Answer {tag} {i:03d}, no more.")
                          for i in range(n)], f"{tag}.jsonl")
    return rows("forget", N), rows("retain", N)


def eval_sets() -> dict[str, QADataset]:
    from obliviate.data.synthetic import SyntheticConfig, generate_benchmark

    splits = generate_benchmark(SyntheticConfig(n_entities=5, facts_per_entity=3, n_perturbed=3,
                                                id_facts_per_entity=0, ood_facts_per_entity=0))
    return {"forget": QADataset(splits["forget_perturbed"], "forget"),
            "retain": QADataset(splits["retain_perturbed"], "retain"),
            "holdout": QADataset(splits["holdout"], "holdout")}


# ----------------------------------------------------------------------------------------------
# worker (one per process)

def _joined_batches(original):
    """A batcher whose batch k is batches 2k and 2k+1 of ``original`` at half the batch size."""
    def batches(lengths, batch_size, shuffle=True, seed=0, group_factor=16):
        b = original(lengths, batch_size // 2, shuffle=shuffle, seed=seed, group_factor=group_factor)
        return [b[i] + b[i + 1] for i in range(0, len(b) - 1, 2)]
    return batches


class _BypassDDP:
    """Gradient ascent computed on the module inside the DDP wrapper: DDP never syncs its gradients."""

    def __init__(self):
        from obliviate.methods import build_method

        self.inner = build_method("ga")

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, inp):
        from dataclasses import replace

        return self.inner(replace(inp, model=getattr(inp.model, "module", inp.model)))


def _run_dir(acc, path: Path):
    from obliviate.runs import RunDir

    return RunDir.open(path, kind="train")  # on every process: the main one writes


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.named_parameters()}


def worker(model_dir: str, out_dir: str) -> None:
    from accelerate import Accelerator
    from safetensors.torch import save_file

    import obliviate.training.loop as loop
    from obliviate.evaluation.evaluate import evaluate_model
    from obliviate.methods import build_method
    from obliviate.models.loading import load_model, load_tokenizer
    from obliviate.training.config import TrainConfig

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)  # a fresh one per train(): an Accelerator checkpoints every model it prepared
    rank, world = acc.process_index, acc.num_processes
    out = Path(out_dir)
    tok = load_tokenizer(model_dir)
    forget, retain = training_sets()
    if world == 1:
        loop.length_grouped_batches = _joined_batches(loop.length_grouped_batches)
    cfg = TrainConfig(epochs=2, batch_size=B * (2 // world), grad_accum=2, lr=2e-3, warmup_ratio=0.25,
                      scheduler="linear", weight_decay=0.01, max_grad_norm=1.0, save_every=1)
    res = loop.train(load_model(model_dir), tok, build_method("npo"), forget, cfg, retain=retain,
                     run=_run_dir(acc, out / f"world{world}-run"), accelerator=acc, progress=False)
    save_file(_weights(res.model), str(out / f"world{world}-rank{rank}.safetensors"))
    report = {"steps": res.steps, "tokens": res.tokens, "losses": [h["loss"] for h in res.history]}
    # RMU reads hidden states through a hook; under DDP the forward must still complete.
    rmu = loop.train(load_model(model_dir), tok, build_method("rmu"), forget,
                     TrainConfig(max_steps=2, batch_size=B * (2 // world), lr=2e-3, warmup_ratio=0.0),
                     retain=retain, accelerator=Accelerator(cpu=True), progress=False)
    save_file(_weights(rmu.model), str(out / f"rmu-world{world}-rank{rank}.safetensors"))

    if world > 1:
        # Interrupted after step 3 (a checkpoint at every step), then resumed: the same weights.
        run = _run_dir(acc, out / "resumed-run")

        def stop(model, step):
            raise KeyboardInterrupt

        try:
            loop.train(load_model(model_dir), tok, build_method("npo"), forget,
                       TrainConfig(**{**cfg.to_dict(), "eval_every": 3}), retain=retain, run=run, on_eval=stop,
                       accelerator=Accelerator(cpu=True), progress=False)
        except KeyboardInterrupt:
            pass
        resumed = loop.train(load_model(model_dir), tok, build_method("npo"), forget, cfg, retain=retain, run=run,
                             resume=True, accelerator=Accelerator(cpu=True), progress=False)
        save_file(_weights(resumed.model), str(out / f"resumed-rank{rank}.safetensors"))

        try:
            loop.train(load_model(model_dir), tok, _BypassDDP(), forget, TrainConfig(max_steps=1, batch_size=B),
                       accelerator=Accelerator(cpu=True), progress=False)
            report["bypass_error"] = None
        except RuntimeError as exc:
            report["bypass_error"] = str(exc)

        model, sets = load_model(model_dir), eval_sets()
        kwargs = dict(batch_size=3, max_new_tokens=6, progress=False)
        report["eval_distributed"] = _comparable(evaluate_model(model, tok, sets, distributed=True, **kwargs))
        if rank == 0:
            report["eval_single"] = _comparable(evaluate_model(model, tok, sets, **kwargs))
    (out / f"world{world}-rank{rank}.json").write_text(json.dumps(report))


def _comparable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


# ----------------------------------------------------------------------------------------------
# tests

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], tmp: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *args], env=env, cwd=tmp, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from obliviate.models.tiny import build_tiny_model

    tmp = tmp_path_factory.mktemp("distributed")
    model_dir = build_tiny_model(tmp / "model", hidden=32, seed=3)
    script = str(Path(__file__).resolve())
    _launch(["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
             "127.0.0.1", "--master_port", str(_free_port()), script, "worker", str(model_dir), str(tmp)], tmp)
    _launch([script, "worker", str(model_dir), str(tmp)], tmp)
    return tmp, model_dir


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_two_processes_train_like_one_with_the_joined_batches(runs):
    from obliviate.models.loading import load_model

    tmp, model_dir = runs
    two = [_load(tmp / f"world2-rank{r}.safetensors") for r in (0, 1)]
    one = _load(tmp / "world1-rank0.safetensors")
    start = dict(load_model(str(model_dir)).named_parameters())
    for name in one:
        assert torch.equal(two[0][name], two[1][name]), f"{name}: the replicas differ"
    moved = max(float((one[n] - start[n].detach()).abs().max()) for n in one)
    diff = max(float((one[n] - two[0][n]).abs().max()) for n in one)
    assert moved > 1e-3  # learning rate 2e-3, 4 steps: the weights moved
    assert diff < 2e-6, f"2 processes differ from 1 process by {diff} (weights moved by {moved})"

    reports = [json.loads((tmp / f"world{w}-rank0.json").read_text()) for w in (1, 2)]
    assert reports[0]["steps"] == reports[1]["steps"] == 4
    assert reports[0]["tokens"] == reports[1]["tokens"]  # tokens of all processes, not of rank 0
    # logged losses are the global batch's, as in one process (not rank 0's half)
    assert reports[1]["losses"] == pytest.approx(reports[0]["losses"], rel=1e-5, abs=1e-6)


def test_rmu_on_two_processes_equals_one(runs):
    tmp, model_dir = runs
    one = _load(tmp / "rmu-world1-rank0.safetensors")
    two = _load(tmp / "rmu-world2-rank0.safetensors")
    from obliviate.models.loading import load_model

    start = {k: v.detach() for k, v in load_model(str(model_dir)).named_parameters()}
    moved = max(float((one[n] - start[n]).abs().max()) for n in one)
    diff = max(float((one[n] - two[n]).abs().max()) for n in one)
    assert moved > 1e-4 and diff < 2e-6, (moved, diff)


def test_checkpoints_on_two_processes_resume_to_the_same_weights(runs):
    tmp, _ = runs
    ckpts = list((tmp / "world2-run" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-3"]  # saved at every step but the last, only the latest kept
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= {f.name for f in ckpts[0].iterdir()}
    full = _load(tmp / "world2-rank0.safetensors")
    for rank in (0, 1):
        resumed = _load(tmp / f"resumed-rank{rank}.safetensors")
        for name in full:
            assert torch.allclose(resumed[name], full[name], atol=1e-6, rtol=0), name


def test_unsynchronised_replicas_are_an_error(runs):
    tmp, _ = runs
    for rank in (0, 1):
        error = json.loads((tmp / f"world2-rank{rank}.json").read_text())["bypass_error"]
        assert error is not None and "replicas diverged" in error


def test_data_parallel_evaluation_equals_one_process(runs):
    tmp, _ = runs
    r0, r1 = (json.loads((tmp / f"world2-rank{r}.json").read_text()) for r in (0, 1))
    single = r0["eval_single"]
    assert set(single["sets"]) == {"forget", "retain", "holdout"}
    assert len(single["sets"]["retain"]["per_sample"]["generation"]) == len(eval_sets()["retain"])
    assert r0["eval_distributed"] == single
    assert r1["eval_distributed"] == single


def test_unlearn_and_evaluate_commands_under_two_processes(tmp_path, tiny_model_dir, small_bench):
    """``obliviate unlearn`` / ``evaluate`` launched on 2 processes: one run directory written once,
    one checkpoint, one registry entry, and the evaluation of every example."""
    from obliviate.data.benchmark import load_benchmark
    from obliviate.runs.registry import Registry

    torchrun = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()), "-m", "obliviate.cli.main"]
    out = tmp_path / "run"
    _launch([*torchrun, "unlearn", "--model", str(tiny_model_dir), "--forget", f"{small_bench}:forget",
             "--retain", f"{small_bench}:retain", "--method", "graddiff", "--out", str(out),
             "--max-steps", "2", "--batch-size", str(B), "--no-progress"], tmp_path)
    assert json.loads((out / "status.json").read_text())["status"] == "done"
    assert (out / "model" / "model.safetensors").exists() and not (out / "model.tmp").exists()
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [1, 2]
    assert [r.kind for r in Registry().list_runs()] == ["unlearn"]

    _launch([*torchrun, "evaluate", "--model", str(out / "model"), "--benchmark", str(small_bench), "--label", "u",
             "--out", str(out), "--max-new-tokens", "4", "--batch-size", "3", "--no-progress"], tmp_path)
    result = json.loads((out / "eval" / "u.json").read_text())
    n = len(load_benchmark(small_bench).split("forget"))
    assert len(result["sets"]["forget"]["per_sample"]["generation"]) == n


def test_process_share_and_merge_in_order():
    batches = [[0, 3], [1], [2, 5], [4]]
    shares = [process_share(batches, r, 3) for r in range(3)]
    assert shares == [[[0, 3], [4]], [[1]], [[2, 5]]]
    parts = [(i, f"v{i}") for share in reversed(shares) for b in share for i in b]
    assert merge_in_order(parts, 6) == [f"v{i}" for i in range(6)]
    with pytest.raises(ValueError, match="came back twice"):
        merge_in_order([(0, "a"), (0, "b")], 2)
    with pytest.raises(ValueError, match="1 of 2 items came back from no process"):
        merge_in_order([(1, "b")], 2)
    with pytest.raises(ValueError, match="rank 3"):
        process_share(batches, 3, 3)


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"] or len(sys.argv) != 4:
        sys.exit("usage: test_distributed.py worker MODEL_DIR OUT_DIR")
    worker(sys.argv[2], sys.argv[3])
