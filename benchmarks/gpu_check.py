"""One GPU check, one JSON: the TOFU forget10 stages, a 1B-class MFU probe and an 8B LoRA memory probe.

    benchmarks/gpu_check.sh --tofu DIR --out benchmarks/results/gpu-check-h100.json   # one H100/H200, < 8 min
    benchmarks/gpu_check.sh --smoke --out /tmp/gpu-check-smoke.json                   # CPU, < 2 min (CI)

Parts (``--parts``, all by default), each timed and written to the JSON as soon as it ends (a part
that fails records its error, the others still run, and the exit code is 1):

* ``stages``: the TOFU forget10 pipeline on ``--model`` (default the embedded ``smollm2-135m``; a
  ``.gguf`` file is converted once to safetensors beside it): finetune on the train (``full``) split
  for 5 epochs, NPO unlearning of forget10 (retain90 as retain) for 10 epochs starting from the
  finetuned checkpoint, and a full evaluation (every TOFU evaluation set with generation) of the
  unlearned model. Built from the public layers: ``models.loading`` (load, save),
  ``training.loop.train`` and ``api.evaluate``; each stage loads its input from disk and saves its
  output, so its wall time includes loading and saving. Per stage: wall seconds, loop seconds,
  tokens and tokens/s, MFU, peak memory, and for the evaluation the metrics' summary row.
* ``mfu``: a Llama-3.2-1B-shaped model (1.24B parameters) built from a config with random weights in
  bf16: forward + backward + fused AdamW step at ``--mfu-batch`` x ``--mfu-seq`` random tokens, and
  forward only at the same batch. Achieved FLOP/s = 6 x matmul parameters x tokens/s (``mfu``), and
  with attention (PaLM's 6N + 12 x layers x hidden x seq, ``mfu_with_attention``), over the GPU's
  dense bf16 peak (H100/H200 detected by name; ``--peak-flops`` overrides).
* ``lora``: a Llama-3-8B-shaped model (8.03B parameters) created on the meta device, materialised
  in bf16 on the GPU with random weights, LoRA rank 16 on every linear layer (peft, through
  ``models.loading.apply_lora``), one forward + backward + AdamW step at ``--lora-batch`` x
  ``--lora-seq`` (1 x 512): peak memory by ``torch.cuda.max_memory_allocated``.

``--smoke``: CPU, a tiny random model (``models.tiny``) on a few synthetic rows, 1 epoch each, and
the same two probes at a few layers and a small width: proves the script works end to end.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import eval_tokens, load_data, measured, peak_flops  # noqa: E402  (benchmarks/ helpers)

from obliviate.api import evaluate  # noqa: E402
from obliviate.data.chat import ChatFormat  # noqa: E402
from obliviate.evaluation.engines import ENGINES  # noqa: E402
from obliviate.evaluation.evaluate import summary_row  # noqa: E402
from obliviate.methods import build_method  # noqa: E402
from obliviate.models.loading import apply_lora, load_model, load_tokenizer, save_checkpoint  # noqa: E402
from obliviate.runs import atomic_write_json, environment  # noqa: E402
from obliviate.training.config import TrainConfig  # noqa: E402
from obliviate.training.loop import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Llama-3.2-1B and Llama-3-8B shapes; the smoke versions keep the layout at a few layers and a small width.
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=8192)
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0,
                max_position_embeddings=8192)
SMOKE_1B = dict(LLAMA_1B, vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1)
SMOKE_8B = dict(LLAMA_8B, vocab_size=512, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1)
PARTS = ("stages", "mfu", "lora")


# ----------------------------------------------------------------------------------------------
# helpers

def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, mixed_precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if mixed_precision == "bf16" else nullcontext()


def device_info(device: torch.device, peak: float | None, override: float | None) -> dict:
    info: dict = {"type": device.type, "name": None, "peak_bf16_flops": peak,
                  "peak_source": "--peak-flops" if override else ("device name" if peak else None),
                  "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=gib(props.total_memory), capability=f"{props.major}.{props.minor}",
                    count=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


def resolve_model(spec: str, smoke: bool, scratch: Path) -> str:
    """'tiny' (built here), a ``.gguf`` file (converted once, beside it), or any obliviate model spec."""
    if spec == "tiny":
        from obliviate.models.tiny import build_tiny_model

        return str(build_tiny_model(scratch / "tiny", hidden=64, layers=2))
    if spec.endswith(".gguf") and Path(spec).is_file():
        return gguf_to_safetensors(Path(spec))
    return spec


def gguf_to_safetensors(gguf: Path) -> str:
    """The GPU machine has the embedded model's GGUF file but not its package: dequantise it once into
    ``<file>.safetensors/`` (as ``models.loading`` does for the embedded model), then reuse that."""
    target = gguf.with_name(gguf.name + ".safetensors")
    if (target / "config.json").exists():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return str(target)


def attn_of(model) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


# ----------------------------------------------------------------------------------------------
# stages: finetune -> NPO -> evaluate

def load_for_stage(spec: str, args, device: torch.device):
    model = load_model(spec, dtype=args.dtype, device=device, attn_implementation=args.attn or "sdpa")
    if args.attn and attn_of(model) != args.attn:  # load_model falls back when an attention kind is unavailable
        raise RuntimeError(f"--attn {args.attn} is not available here (the model loaded with {attn_of(model)})")
    if args.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay as they are
    return model


def train_stage(name: str, spec: str, out: Path, args, data, device: torch.device, params: int,
                peak: float | None) -> dict:
    finetune = name == "finetune"
    primary, retain = (data.train, None) if finetune else (data.forget, data.retain)
    cfg = TrainConfig(epochs=args.epochs if finetune else args.unlearn_epochs, batch_size=args.batch_size,
                      lr=args.lr if finetune else args.unlearn_lr, warmup_ratio=0.1 if finetune else 0.0,
                      scheduler="linear" if finetune else "constant", mixed_precision=args.mixed_precision,
                      seed=args.seed)
    method = build_method("sft" if finetune else args.method)
    with measured(device) as record:
        tok = load_tokenizer(spec)
        model = load_for_stage(spec, args, device)
        fmt = ChatFormat(tok)
        result = train(model, tok, method, primary, cfg, retain=retain, fmt=fmt, progress=False,
                       description=name)
        save_checkpoint(result.model, tok, out)
        sync(device)
    wall = record["wall_seconds"]
    record.update(method="sft" if finetune else args.method, rows=len(primary),
                  retain_rows=len(retain) if retain is not None else 0, epochs=cfg.epochs,
                  batch_size=cfg.batch_size, lr=cfg.lr, steps=result.steps, tokens=result.tokens,
                  loop_seconds=round(result.seconds, 3), tokens_per_second=round(result.tokens / wall, 2),
                  loop_tokens_per_second=round(result.tokens_per_second, 2),
                  mfu=round(6 * params * result.tokens / wall / peak, 5) if peak else None,
                  loop_mfu=round(6 * params * result.tokens_per_second / peak, 5) if peak else None,
                  last_loss=result.last_loss, attn_implementation=attn_of(model),
                  checkpoint=str(out) if args.work_dir else None)
    return record


def eval_stage(spec: str, args, data, device: torch.device, params: int, peak: float | None) -> dict:
    with measured(device) as record:
        tok = load_tokenizer(spec)
        model = load_for_stage(spec, args, device)
        with autocast(device, args.mixed_precision):
            result = evaluate(spec, data.eval_sets, None, label="unlearned", batch_size=args.eval_batch_size,
                              max_new_tokens=args.max_new_tokens, progress=False, model_obj=model, tokenizer=tok,
                              engine=args.engine)
        sync(device)
    tokens = eval_tokens(ChatFormat(tok), data.eval_sets, result)
    wall = record["wall_seconds"]
    record.update(rows={name: len(ds) for name, ds in data.eval_sets.items()}, batch_size=args.eval_batch_size,
                  max_new_tokens=args.max_new_tokens, tokens=tokens, tokens_per_second=round(tokens / wall, 2),
                  evaluate_seconds=result.get("seconds"),
                  mfu=round(2 * params * tokens / wall / peak, 5) if peak else None,
                  attn_implementation=attn_of(model), engine=args.engine, metrics=summary_row(result))
    return record


def run_stages(args, spec: str, work: Path, device: torch.device, peak: float | None, report: dict, save) -> None:
    t0 = time.perf_counter()
    data = load_data(argparse.Namespace(tofu=args.tofu, forget_split=args.forget_split, entities=args.entities,
                                        facts=args.facts, seed=args.seed, rows=args.rows))
    params = sum(p.numel() for p in load_model(spec, dtype=args.dtype).parameters())
    report["model"] = {"spec": args.model, "path": spec, "parameters": params, "dtype": args.dtype,
                       "mixed_precision": args.mixed_precision, "attn": args.attn, "compile": args.compile}
    report["data"] = {"source": data.source, "train": len(data.train), "forget": len(data.forget),
                      "retain": len(data.retain), "eval": {k: len(v) for k, v in data.eval_sets.items()}}
    report["data"]["setup_seconds"] = round(time.perf_counter() - t0, 3)  # data + parameter count
    save()
    stages = report["stages"]
    free(device)
    stages["finetune"] = train_stage("finetune", spec, work / "target", args, data, device, params, peak)
    print(_line("finetune", stages["finetune"]), flush=True)
    save()
    free(device)
    stages["unlearn"] = train_stage("unlearn", str(work / "target"), work / "unlearned", args, data, device,
                                    params, peak)
    print(_line("unlearn", stages["unlearn"]), flush=True)
    save()
    free(device)
    stages["evaluate"] = eval_stage(str(work / "unlearned"), args, data, device, params, peak)
    print(_line("evaluate", stages["evaluate"]), flush=True)


# ----------------------------------------------------------------------------------------------
# probes

def llama_from_config(shape: dict, attn: str | None, device: torch.device, meta: bool = False):
    """A Llama model from ``shape`` with random weights in bf16: built directly on ``device``, or
    (``meta``) on the meta device and then materialised there, initialised by hand (normal(0, 0.02)
    matrices, unit norms, rotary frequencies recomputed)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape)
    kwargs = {"dtype": torch.bfloat16, **({"attn_implementation": attn} if attn else {})}
    with torch.device("meta" if meta else device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if meta:
        model.to_empty(device=device)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.fill_(1.0)  # RMSNorm weights
                else:
                    p.normal_(0.0, 0.02)
        for name, module in list(model.named_modules()):
            if name.endswith("rotary_emb"):  # its buffers were left uninitialised by to_empty
                parent, _, child = name.rpartition(".")
                fresh = type(module)(config=model.config).to(device)
                setattr(model.get_submodule(parent) if parent else model, child, fresh)
    return model


def matmul_params(model) -> int:
    """Parameters that multiply activations: all, less an untied input embedding (a lookup)."""
    total = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if emb is head else total - emb.numel()


def run_mfu_probe(args, device: torch.device, peak: float | None) -> dict:
    shape = SMOKE_1B if args.smoke else LLAMA_1B
    torch.manual_seed(args.seed)
    model = llama_from_config(shape, args.attn, device)
    model.train()
    if args.compile:
        model.compile()
    total, n_mm = sum(p.numel() for p in model.parameters()), matmul_params(model)
    batch, seq = args.mfu_batch, args.mfu_seq
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.mfu_warmup):
        step()
    with measured(device) as record:
        for _ in range(args.mfu_steps):
            loss = step()
        sync(device)
    seconds = record["wall_seconds"]
    tokens = batch * seq * args.mfu_steps
    flops_token = 6 * n_mm
    flops_token_attn = flops_token + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq
    tps = tokens / seconds
    with torch.inference_mode():
        model(input_ids=ids)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.mfu_steps):
            model(input_ids=ids)
        sync(device)
        fwd_seconds = time.perf_counter() - t0
    record.update(shape=shape, parameters=total, matmul_parameters=n_mm, dtype="bfloat16", optimizer="AdamW",
                  attn_implementation=attn_of(model), compile=args.compile, batch=batch, seq=seq,
                  warmup_steps=args.mfu_warmup, steps=args.mfu_steps, tokens=tokens,
                  tokens_per_second=round(tps, 2), seconds_per_step=round(seconds / args.mfu_steps, 5),
                  flops_per_token=flops_token, flops_per_token_with_attention=flops_token_attn,
                  achieved_flops=round(flops_token * tps, 1),
                  achieved_flops_with_attention=round(flops_token_attn * tps, 1),
                  mfu=round(flops_token * tps / peak, 5) if peak else None,
                  mfu_with_attention=round(flops_token_attn * tps / peak, 5) if peak else None,
                  forward_tokens_per_second=round(tokens / fwd_seconds, 2),
                  forward_mfu=round(2 * n_mm * tokens / fwd_seconds / peak, 5) if peak else None,
                  loss=round(float(loss.detach()), 5))
    return record


def free(device: torch.device) -> None:
    """Drop what the previous part left (models hold reference cycles), so each part's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_lora_probe(args, device: torch.device) -> dict:
    shape = SMOKE_8B if args.smoke else LLAMA_8B
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    model = llama_from_config(shape, args.attn, device, meta=True)
    total = sum(p.numel() for p in model.parameters())
    model = apply_lora(model, r=args.lora_rank, alpha=2 * args.lora_rank)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    materialise_seconds = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else None
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch, seq = args.lora_batch, args.lora_seq
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)
    model.train()
    with measured(device) as record:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
    record.update(shape=shape, parameters=total, trainable_parameters=sum(p.numel() for p in trainable),
                  lora_rank=args.lora_rank, lora_targets="all-linear", dtype="bfloat16",
                  attn_implementation=attn_of(model), gradient_checkpointing=args.gradient_checkpointing,
                  batch=batch, seq=seq, materialise_seconds=round(materialise_seconds, 3),
                  step_seconds=record["wall_seconds"], loss=round(float(loss.detach()), 5))
    if device.type == "cuda":
        record.update(memory_source="torch.cuda.max_memory_allocated (reset before materialising)",
                      weights_gib=gib(weights), peak_gib=gib(torch.cuda.max_memory_allocated(device) - before),
                      reserved_gib=gib(torch.cuda.max_memory_reserved(device)))
    else:
        record.update(memory_source="peak RSS of the process (CPU)", weights_gib=None,
                      peak_gib=gib(record["peak_memory_mib"] * 2**20))
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU end-to-end check: tiny model, a few synthetic rows, "
                   "1 epoch, tiny probes (under 2 minutes on 2 cores)")
    p.add_argument("--out", default=None, help="the JSON to write (default benchmarks/results/gpu-check-<device>.json)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: stages, mfu, lora")
    p.add_argument("--tofu", default=None, help="a TOFU directory (full, forget10, retain90, *_perturbed, holdout10); "
                   "required for the stages except with --smoke, where it defaults to synthetic rows")
    p.add_argument("--forget-split", default="forget10")
    p.add_argument("--rows", type=int, default=None, help="keep the first N rows of every split (default: all; "
                   "8 with --smoke)")
    p.add_argument("--entities", type=int, default=4, help="synthetic rows (no --tofu): entities")
    p.add_argument("--facts", type=int, default=2, help="synthetic rows (no --tofu): facts per entity")
    p.add_argument("--model", default=None, help="model spec, a directory or a .gguf file (default smollm2-135m; "
                   "tiny with --smoke)")
    p.add_argument("--dtype", default="float32", help="weights' dtype for the stages (bf16 comes from autocast)")
    p.add_argument("--mixed-precision", default=None, help="no | bf16 (default bf16 on GPU, no on CPU)")
    p.add_argument("--attn", default=None, help="sdpa | flash_attention_2 | eager (default: obliviate's, sdpa); "
                   "refused when the installed transformers cannot provide it; flash_attention_2 wants "
                   "--dtype bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (stages and MFU probe)")
    p.add_argument("--engine", default="obliviate", choices=ENGINES,
                   help="who makes the evaluation's greedy answers: obliviate, or vllm (pip install vllm)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--peak-flops", type=float, default=None, help="the device's dense bf16 peak FLOP/s for MFU "
                   "(default: from the device name, H100/H200)")
    p.add_argument("--epochs", type=float, default=None, help="finetuning epochs (default 5; 1 with --smoke)")
    p.add_argument("--unlearn-epochs", type=float, default=None, help="NPO epochs (default 10; 1 with --smoke)")
    p.add_argument("--method", default="npo")
    p.add_argument("--lr", type=float, default=2e-4, help="finetuning learning rate")
    p.add_argument("--unlearn-lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 32; 4 with --smoke)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default 128; 8 with --smoke")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default 200; 4 with --smoke)")
    p.add_argument("--mfu-batch", type=int, default=None, help="default 16 (2 with --smoke)")
    p.add_argument("--mfu-seq", type=int, default=None, help="default 512 (32 with --smoke)")
    p.add_argument("--mfu-steps", type=int, default=None, help="timed steps (default 10; 2 with --smoke)")
    p.add_argument("--mfu-warmup", type=int, default=None, help="untimed steps first (default 3; 1 with --smoke)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-batch", type=int, default=1)
    p.add_argument("--lora-seq", type=int, default=None, help="default 512 (32 with --smoke)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="LoRA probe with gradient checkpointing")
    p.add_argument("--work-dir", default=None, help="where the stages' checkpoints go (default: a temporary "
                   "directory, removed at the end)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(model="tiny" if smoke else "smollm2-135m", rows=8 if smoke else 0, epochs=1 if smoke else 5,
                    unlearn_epochs=1 if smoke else 10, batch_size=4 if smoke else 32,
                    eval_batch_size=8 if smoke else 128, max_new_tokens=4 if smoke else 200,
                    mfu_batch=2 if smoke else 16, mfu_seq=32 if smoke else 512, mfu_steps=2 if smoke else 10,
                    mfu_warmup=1 if smoke else 3, lora_seq=32 if smoke else 512)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        p.error(f"--parts takes {', '.join(PARTS)}")
    if "stages" in args.parts and not smoke and not args.tofu:
        p.error("the stages need --tofu DIR (TOFU as JSON Lines: full, forget10, retain90, *_perturbed, ...); "
                "or --parts mfu,lora")
    if args.tofu and not Path(args.tofu).is_dir():
        p.error(f"--tofu {args.tofu}: not a directory")
    if args.peak_flops is not None and not (math.isfinite(args.peak_flops) and args.peak_flops > 0):
        p.error("--peak-flops must be a positive number of FLOP/s, e.g. 989e12")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    args.mixed_precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    peak = peak_flops(device, args.peak_flops)
    out = Path(args.out) if args.out else RESULTS / f"gpu-check-{'smoke' if args.smoke else device.type}.json"
    started = time.perf_counter()
    report: dict = {"name": out.stem, "smoke": args.smoke, "device": device_info(device, peak, args.peak_flops),
                    "options": dict(vars(args)), "model": None, "data": None, "stages": {}, "probes": {}, "errors": {},
                    "environment": environment(args.seed)}

    def save() -> None:
        report["total_seconds"] = round(time.perf_counter() - started, 3)
        atomic_write_json(out, report)

    save()
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work = Path(args.work_dir) if args.work_dir else scratch
    parts = {"stages": lambda: run_stages(args, resolve_model(args.model, args.smoke, scratch), work, device, peak,
                                          report, save),
             "mfu": lambda: report["probes"].__setitem__("mfu_1b", run_mfu_probe(args, device, peak)),
             "lora": lambda: report["probes"].__setitem__("lora_8b", run_lora_probe(args, device))}
    try:
        for part in args.parts:
            free(device)
            t0 = time.perf_counter()
            try:
                parts[part]()
            except Exception as exc:  # a failed part is recorded; the others still run
                traceback.print_exc()
                report["errors"][part] = f"{type(exc).__name__}: {exc}"
            report.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t0, 3)
            if part != "stages" and part not in report["errors"]:
                key = "mfu_1b" if part == "mfu" else "lora_8b"
                print(_line(key, report["probes"][key]), flush=True)
            save()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["ok"] = not report["errors"]
    save()
    print(f"{'ok' if report['ok'] else 'FAILED: ' + ', '.join(report['errors'])} in {report['total_seconds']:.1f} s; "
          f"wrote {out}")
    return 0 if report["ok"] else 1


def _line(name: str, r: dict) -> str:
    bits = [f"{name:>9}: {r['wall_seconds']:8.2f} s"]
    if r.get("tokens_per_second") is not None:
        bits.append(f"{r['tokens_per_second']:10.0f} tok/s")
    if r.get("mfu") is not None:
        bits.append(f"MFU {r['mfu']:.1%}")
    if r.get("peak_gib") is not None:
        bits.append(f"peak {r['peak_gib']:.2f} GiB")
    elif r.get("peak_memory_mib") is not None:
        bits.append(f"peak {r['peak_memory_mib']:.0f} MiB")
    if r.get("metrics"):
        m = r["metrics"]
        bits.append(f"forget ROUGE {m.get('forget_rouge')} utility {m.get('model_utility')}")
    return "  ".join(bits)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    sys.exit(main(sys.argv[1:]))
