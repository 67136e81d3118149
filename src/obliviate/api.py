"""The Python API; the CLI is a thin layer over these functions.

    import obliviate
    target = obliviate.finetune("smollm2-135m", "data/bench:full", "runs/target")
    oracle = obliviate.finetune("smollm2-135m", "data/bench:retain", "runs/oracle")
    obliviate.unlearn(target, "data/bench:forget", "data/bench:retain", "runs/npo", method="npo")
    obliviate.evaluate("runs/npo/model", "data/bench", "runs/npo", label="unlearned",
                       oracle_eval="runs/oracle/eval/oracle.json")

Every call writes a run directory (obliviate.runs) and refuses to overwrite one unless
``overwrite=True``; ``resume=True`` continues an interrupted run (a finished one is returned as is).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable

import torch

from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat
from obliviate.data.qa import QADataset, load_qa
from obliviate.models.loading import load_model, load_tokenizer, save_checkpoint
from obliviate.processes import processes
from obliviate.runs import RunDir
from obliviate.training.config import TrainConfig

DataSpec = str | Path | QADataset


def as_dataset(data: DataSpec, skip_bad: bool = False) -> QADataset:
    """QA rows from a spec (file, DIR:split, HUB_ID:split); a plain-text corpus (.txt file, directory
    of .txt files, .jsonl with a ``text`` field) becomes document rows (``data.text.documents_as_qa``)."""
    if isinstance(data, QADataset):
        return data
    from obliviate.data.text import documents_as_qa, is_text_corpus, load_text_corpus

    if is_text_corpus(data):
        return documents_as_qa(load_text_corpus(data, skip_bad=skip_bad))
    return load_qa(data, skip_bad=skip_bad)


def fingerprint(ds: QADataset) -> dict[str, Any]:
    """sha256 of the rows' canonical JSON (content, not file bytes, so any format gives one value)."""
    import json

    h = hashlib.sha256()
    for ex in ds.examples:
        row = {k: v for k, v in ex.to_json().items() if k != "row"}
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return {"source": ds.source, "n": len(ds), "skipped": ds.skipped, "sha256": h.hexdigest()}


def _train_config(train: TrainConfig | dict | None, defaults: dict[str, Any]) -> TrainConfig:
    if isinstance(train, TrainConfig):
        return train
    return TrainConfig.from_dict({**defaults, **(train or {})})


def _open(out: str | Path, overwrite: bool, resume: bool) -> RunDir:
    """The run directory. Under several processes every one checks it (so all raise alike), the main
    one creates it, and the others get a view that does not write."""
    resume = resume and Path(out).exists()
    state = processes()
    if state.num_processes == 1:
        return RunDir.create(out, overwrite=overwrite, resume=resume)
    RunDir.check(out, overwrite=overwrite, resume=resume)
    state.wait_for_everyone()  # nobody reads the directory while the main process replaces it
    run = RunDir.create(out, overwrite=overwrite, resume=resume) if state.is_main_process else RunDir(Path(out), writer=False)
    state.wait_for_everyone()
    return run


FINETUNE_DEFAULTS: dict[str, Any] = {"epochs": 10, "lr": 2e-4, "batch_size": 8, "warmup_ratio": 0.1}
UNLEARN_DEFAULTS: dict[str, Any] = {"epochs": 5, "lr": 1e-5, "batch_size": 8, "warmup_ratio": 0.0,
                                    "scheduler": "constant"}


def _device(device: str | None) -> str:
    return device or str(processes().device)  # this process's GPU under accelerate launch


class RunRecorder:
    """Records a run in the run registry (obliviate.reporting.registry) from start to finish.

    ``OBLIVIATE_REGISTRY=off`` disables it. A registry problem is reported, never fatal: it must
    not cost anyone a finished training run."""

    def __init__(self, run: RunDir, kind: str, resume: bool, parent_id: str | None = None):
        import warnings

        self.registry, self.run_id = None, None
        if not run.writer:
            return  # a non-main process: the main one records the run
        self.registry = _registry()
        if self.registry is None:
            return
        try:
            self.run_id = self.registry.record_start(run.path, kind=kind, parent_id=parent_id, resume=resume)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            warnings.warn(f"run registry unavailable: {exc}")
            self.registry = None

    def finish(self, status: str, children: tuple[Path, ...] = ()) -> None:
        """Record the end of the run, and register finished sub-runs as its children."""
        if self.registry is None:
            return
        try:
            self.registry.record_finish(self.run_id, status=status)
            for child in children:
                self.registry.add_run(child, parent_id=self.run_id)
        except Exception as exc:  # noqa: BLE001
            import warnings

            warnings.warn(f"run registry: could not record the end of the run: {exc}")


def _registry():
    """The run registry, or None when ``OBLIVIATE_REGISTRY=off`` or it cannot be opened (warned)."""
    import os
    import warnings

    if os.environ.get("OBLIVIATE_REGISTRY", "").lower() == "off":
        return None
    try:
        from obliviate.reporting.registry import Registry

        return Registry()
    except Exception as exc:  # noqa: BLE001 - a registry problem must not cost a finished run
        warnings.warn(f"run registry unavailable: {exc}")
        return None


def record_result(result_file: Path, kind: str, **fields: Any) -> None:
    """Record an evaluation or attack (a result file in a run directory) in the run registry;
    like RunRecorder, off with ``OBLIVIATE_REGISTRY=off`` and never fatal."""
    import warnings

    registry = _registry()
    if registry is None:
        return
    try:
        registry.record_result(result_file, kind, **fields)
    except Exception as exc:  # noqa: BLE001 - a result on disk matters more than its registry row
        warnings.warn(f"run registry: could not record {result_file}: {exc}")


def model_sha256(spec: str) -> str | None:
    """Fingerprint of a local model directory (None for a hub id that is not downloaded)."""
    from obliviate.models.loading import resolve_model_path
    from obliviate.reporting.registry import model_fingerprint

    try:
        path = Path(resolve_model_path(spec))
    except (OSError, ValueError):
        return None
    return model_fingerprint(path) if path.is_dir() else None


def _run_training(run: RunDir, config: dict, model_spec: str, method, primary: QADataset, train: TrainConfig, *,
                  retain: QADataset | None, dtype: str, system_prompt: str | None, max_length: int,
                  trust_remote_code: bool, progress: bool, resume: bool, description: str,
                  sample_weights=None, param_masks=None, on_eval=None, model=None) -> Path:
    from obliviate.training.loop import train as train_loop

    config = {**config, "model_sha256": model_sha256(model_spec)}
    run.write_config(config, seed=train.seed)
    data = {"train" if description == "finetune" else "forget": fingerprint(primary)}
    if retain is not None:
        data["retain"] = fingerprint(retain)
    run.write_json("data.json", data)
    run.set_status("running")
    registered = RunRecorder(run, config["command"], resume)
    try:
        tokenizer = load_tokenizer(model_spec, trust_remote_code=trust_remote_code)
        if model is None:
            model = load_model(model_spec, dtype=dtype, trust_remote_code=trust_remote_code)
        fmt = ChatFormat(tokenizer, system_prompt=system_prompt, max_length=max_length)
        result = train_loop(model, tokenizer, method, primary, train, retain=retain, fmt=fmt, run=run,
                            resume=resume, sample_weights=sample_weights, param_masks=param_masks,
                            on_eval=on_eval, progress=progress, description=description)
        out = run.file("model")
        if run.writer:  # under FSDP/DeepSpeed the loop gathered the full state dict for this process
            save_checkpoint(result.model, tokenizer, out, merge_lora=train.merge_lora, state_dict=result.state_dict)
        processes().wait_for_everyone()  # every process returns a checkpoint that exists
        run.write_json("train_stats.json", {"steps": result.steps, "seconds": round(result.seconds, 3),
                                            "tokens": result.tokens,
                                            "tokens_per_second": round(result.tokens_per_second, 2),
                                            "last_loss": result.last_loss})
        if config["command"] == "unlearn" and run.writer:
            from obliviate.reporting.model_card import model_card_info, write_model_card

            write_model_card(out, model_card_info(run.path))
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        registered.finish("failed")
        raise
    run.set_status("done")
    registered.finish("done")
    return out


def finetune(model: str, data: DataSpec, out: str | Path, train: TrainConfig | dict | None = None, *,
             dtype: str = "float32", system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_length: int = 512,
             skip_bad: bool = False, overwrite: bool = False, resume: bool = False, progress: bool = True,
             trust_remote_code: bool = False) -> Path:
    """Finetune ``model`` on a QA set (to plant knowledge: the target; on retain only: the oracle).
    Returns the directory of the finetuned checkpoint."""
    from obliviate.methods import build_method

    train = _train_config(train, FINETUNE_DEFAULTS)
    ds = as_dataset(data, skip_bad)  # bad data fails before any run directory is made
    run = _open(out, overwrite, resume)
    if run.status() == "done":
        return run.file("model")
    config = {"command": "finetune", "model": str(model), "data": ds.source, "dtype": dtype,
              "system_prompt": system_prompt, "max_length": max_length, "train": train.to_dict()}
    return _run_training(run, config, str(model), build_method("sft"), ds, train, retain=None, dtype=dtype,
                         system_prompt=system_prompt, max_length=max_length, trust_remote_code=trust_remote_code,
                         progress=progress, resume=resume, description="finetune")


def unlearn(model: str | Path, forget: DataSpec, retain: DataSpec | None, out: str | Path, method: str = "npo",
            method_options: dict[str, Any] | None = None, train: TrainConfig | dict | None = None, *,
            dtype: str = "float32", system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_length: int = 512,
            skip_bad: bool = False, overwrite: bool = False, resume: bool = False, progress: bool = True,
            trust_remote_code: bool = False, sample_weights: torch.Tensor | None = None,
            param_masks: dict[str, torch.Tensor] | None = None,
            on_eval: Callable[[torch.nn.Module, int], None] | None = None,
            extra_config: dict[str, Any] | None = None, wagle: Any = None, guard: Any = None) -> Path:
    """Unlearn ``forget`` from ``model`` with a method from ``obliviate.methods`` (see
    ``list_methods()``), keeping ``retain``. Returns the directory of the unlearned checkpoint.

    ``wagle``: a WAGLE mask file, or options to compute one (``{"rho": 0.2, "gamma": 1e-6, ...}``,
    ``attribution.WagleConfig``); ``guard``: a GUARD weights file, or options (``{"tau": 1.0, ...}``,
    ``attribution.GuardConfig``). Computed ones are saved in the run (docs/attribution.md)."""
    from obliviate.attribution import parse_guard, parse_wagle, prepare_attribution
    from obliviate.methods import build_method

    train = _train_config(train, UNLEARN_DEFAULTS)
    method_options = dict(method_options or {})
    built = build_method(method, **dict(method_options))
    wagle, guard = parse_wagle(wagle), parse_guard(guard)  # bad options fail before the run directory
    if wagle is not None and train.lora:
        raise ValueError("WAGLE masks the model's own weights; it cannot be combined with LoRA (set lora off)")
    forget_ds = as_dataset(forget, skip_bad)  # bad input fails before any run directory is made
    retain_ds = as_dataset(retain, skip_bad) if retain is not None else None
    run = _open(out, overwrite, resume)
    if run.status() == "done":
        return run.file("model")
    model_obj = None
    if wagle is not None or guard is not None:
        try:
            tokenizer = load_tokenizer(str(model), trust_remote_code=trust_remote_code)
            model_obj = load_model(str(model), dtype=dtype, device=_device(None), trust_remote_code=trust_remote_code)
            fmt = ChatFormat(tokenizer, system_prompt=system_prompt, max_length=max_length)
            param_masks, sample_weights, attribution_config = prepare_attribution(
                run, model_obj, fmt, built, forget_ds, retain_ds, lora=train.lora, wagle=wagle, guard=guard,
                param_masks=param_masks, sample_weights=sample_weights, resume=resume)
        except BaseException as exc:
            run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        extra_config = {**(extra_config or {}), **attribution_config}
    config = {"command": "unlearn", "model": str(model), "method": method, "method_options": method_options,
              "forget": forget_ds.source, "retain": retain_ds.source if retain_ds else None, "dtype": dtype,
              "system_prompt": system_prompt, "max_length": max_length, "train": train.to_dict(),
              **(extra_config or {})}
    return _run_training(run, config, str(model), built, forget_ds, train, retain=retain_ds, dtype=dtype,
                         system_prompt=system_prompt, max_length=max_length, trust_remote_code=trust_remote_code,
                         progress=progress, resume=resume, description=f"unlearn ({method})",
                         sample_weights=sample_weights, param_masks=param_masks, on_eval=on_eval, model=model_obj)


def evaluate(model: str | Path, benchmark: str | Path | dict[str, QADataset], out: str | Path | None = None, *,
             label: str = "model", forget_split: str = "forget10", oracle_eval: str | Path | dict | None = None,
             batch_size: int = 32, max_new_tokens: int = 200, dtype: str = "float32",
             system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_length: int = 512, progress: bool = True,
             trust_remote_code: bool = False, model_obj=None, tokenizer=None) -> dict:
    """TOFU evaluation of ``model`` on a benchmark (directory, TOFU directory or hub id) or on given
    sets. With ``out``, writes ``out/eval/<label>.json``. ``oracle_eval`` (the oracle's eval result
    or its path) gives forget quality."""
    from obliviate.data.benchmark import load_benchmark
    from obliviate.evaluation.evaluate import eval_sets_from_benchmark, evaluate_model, load_eval, save_eval

    sets = benchmark if isinstance(benchmark, dict) else eval_sets_from_benchmark(load_benchmark(benchmark, forget_split))
    oracle = load_eval(oracle_eval) if isinstance(oracle_eval, (str, Path)) else oracle_eval
    if tokenizer is None:
        tokenizer = load_tokenizer(str(model), trust_remote_code=trust_remote_code)
    if model_obj is None:
        model_obj = load_model(str(model), dtype=dtype, device=_device(None), trust_remote_code=trust_remote_code)
    fmt = ChatFormat(tokenizer, system_prompt=system_prompt, max_length=max_length)
    start = time.time()
    state = processes()  # under accelerate launch: batches split across processes, merged in order
    result = evaluate_model(model_obj, tokenizer, sets, fmt=fmt, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            oracle=oracle, progress=progress and state.is_main_process, label=label,
                            distributed=state.num_processes > 1)
    result["seconds"] = round(time.time() - start, 3)
    if out is not None and state.is_main_process:
        from obliviate.evaluation.evaluate import summary_row

        path = save_eval(result, Path(out) / "eval" / f"{label}.json")
        record_result(path, "eval", model=str(model), metrics={"models": {label: summary_row(result)}},
                      parent_dir=out)
    state.wait_for_everyone()
    return result
