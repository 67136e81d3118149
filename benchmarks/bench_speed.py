"""Speed of each stage (finetune, unlearn, evaluate), against a naive baseline run in the same script.

    python benchmarks/bench_speed.py                          # tiny random model, synthetic data, CPU: ~1 min
    python benchmarks/bench_speed.py --model smollm2-135m --entities 4 --facts 2 --max-new-tokens 8
    python benchmarks/bench_speed.py --model smollm2-135m --tofu ../shared/benchmarks/tofu --name tofu-h100
    python benchmarks/bench_speed.py --preset issue12-eval        # the issue-12 evaluation, one stage (below)

Stages: ``sft`` (finetune on the train split), one per unlearning method (``npo``, ``graddiff``, ...:
forget + retain) and ``evaluate`` (TOFU metrics on the evaluation sets). Each runs in up to three modes:

* ``fast``: the library path: ``training.loop.train`` (length-grouped batches, Accelerate, reference
  log-probs precomputed once) and ``evaluate_model`` (pairs deduplicated, batched scoring and
  batched greedy generation).
* ``naive``: a plain per-sample loop: batch size 1, rows in file order (no length grouping), for
  methods with a reference a live reference model that recomputes the reference log-probs at every
  step, and evaluation one pair and one question at a time. Same losses (the same method objects),
  same data, same optimiser.
* ``floor``: the hardware floor on the same rows and the same model, with no obliviate machinery:
  plain PyTorch/transformers ``model(input_ids, attention_mask, labels).loss.backward()`` + AdamW
  step (fused on a CPU or GPU) at full batches (``--batch-size`` rows sorted by length, so padding is minimal), one pass
  over the stage's rows (the forget views the method trains on plus as many retain rows, for
  unlearning); for ``evaluate`` a forward pass only (no grad) at ``--eval-batch-size`` over every
  unique scored (question, answer) pair and every question's prompt followed by its true answer
  (a stand-in for its generation). Each other mode is reported as a fraction of it:
  ``fraction_of_floor`` = tokens/s of the mode / tokens/s of the floor (1.0: the stage runs as
  fast as the bare model; generation's sequential decoding cannot reach a forward-only floor).

Each stage starts from a freshly loaded model (loading is timed apart, not inside the stage).
Reported per stage and mode: wall seconds, steps/s, tokens/s (non-padding tokens the stage exists to
process: training rows' tokens incl. retain rows; for evaluation the scored pairs, the prompts and the
generated answers), peak memory (``torch.cuda.max_memory_allocated`` on GPU; peak RSS of the process,
reset before each stage through /proc/self/clear_refs, on CPU) and MFU on GPU (6 x parameters x
tokens / seconds / the device's dense bf16 peak for training, 2 x for evaluation; null on CPU or an
unknown GPU). The speed-up is fast tokens/s over naive tokens/s, so it holds on any machine. The
naive stages can be capped to fewer rows (``--naive-rows``): throughputs are compared, not totals.

    python benchmarks/bench_speed.py --modes fast,floor       # fraction of the floor only

The ``evaluate`` stage records its numbers too (per set: probability, truth ratio, ROUGE-L recall;
model utility). ``--preset issue12-eval`` is the evaluation issue 12 times: the base SmolLM2-135M-
Instruct on the first 40 / 100 / 50 / 50 rows of forget01_perturbed / retain_perturbed /
real_authors_perturbed / world_facts_perturbed (``--tofu``, default ../shared/benchmarks/tofu), 200
new tokens, batch 32, the ``fast`` mode only, at torch's default thread count (as ``obliviate
evaluate`` runs); the stage's record then also holds ``reference_check``: each number against the
field's reference framework's (tests/test_reference_numbers.py), with the largest difference and
whether all are within 1e-3 (+ half a unit of the reference's last digit). Explicit flags beat the
preset's.

Writes ``benchmarks/results/<name>.json`` atomically, with ``obliviate.runs.environment()``.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from obliviate.data.batches import collate, encode_views, to_device
from obliviate.data.chat import ChatFormat
from obliviate.data.qa import QADataset
from obliviate.evaluation.evaluate import eval_sets_from_benchmark, evaluate_model, summary_row
from obliviate.methods import StepInputs, build_method, reference_logps
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.runs import atomic_write_json, environment
from obliviate.training.config import TrainConfig
from obliviate.training.loop import train

RESULTS = Path(__file__).resolve().parent / "results"
TOFU = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "tofu"

# --preset issue12-eval: the options it sets (explicit flags win) and the reference framework's
# numbers for that evaluation (issue 12; the same as tests/test_reference_numbers.py pins).
PRESETS = {
    "issue12-eval": {"model": "smollm2-135m", "tofu": str(TOFU), "forget_split": "forget01", "stages": "evaluate",
                     "modes": "fast", "eval_rows": "forget=40,retain=100,real_authors=50,world_facts=50",
                     "max_new_tokens": 200, "eval_batch_size": 32, "threads": 0, "name": "issue12-eval"},
}
REFERENCE = {
    "issue12-eval": {
        "forget_probability": 0.1376, "forget_truth_ratio": 0.7834, "forget_rouge": 0.4493,
        "retain_probability": 0.1121, "retain_truth_ratio": 0.1929, "retain_rouge": 0.3798,
        "real_authors_probability": 0.3475, "real_authors_truth_ratio": 0.4925, "real_authors_rouge": 0.51,
        "world_facts_probability": 0.2546, "world_facts_truth_ratio": 0.3386, "world_facts_rouge": 0.5567,
        "model_utility": 0.2788,
    },
}
REFERENCE_TOLERANCE = 1e-3 + 5e-5  # the 1e-3, plus half a unit of the reference's 4th decimal

# Dense bf16 peak FLOP/s by device name (first match wins, so "H100 PCIe" precedes "H100").
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))


@dataclass
class Data:
    source: str
    train: QADataset
    forget: QADataset
    retain: QADataset
    eval_sets: dict[str, QADataset]


# ----------------------------------------------------------------------------------------------
# setup

def load_data(args) -> Data:
    if args.tofu:
        from obliviate.data.benchmark import load_benchmark

        bench = load_benchmark(args.tofu, args.forget_split)
        data = Data(str(args.tofu), bench.split("train"), bench.split("forget"), bench.split("retain"),
                    eval_sets_from_benchmark(bench))
    else:
        from obliviate.data.synthetic import SyntheticConfig, generate_benchmark

        config = SyntheticConfig(n_entities=args.entities, facts_per_entity=args.facts, seed=args.seed)
        splits = generate_benchmark(config)

        def ds(split: str) -> QADataset:
            return QADataset(splits[split], f"synthetic:{split}")

        data = Data(f"synthetic({args.entities} entities x {args.facts} facts)", ds("full"), ds("forget"),
                    ds("retain"), {"forget": ds("forget_perturbed"), "retain": ds("retain_perturbed"),
                                   "real_authors": ds("real_authors_perturbed"),
                                   "world_facts": ds("world_facts_perturbed")})
    if args.rows:
        data = Data(data.source + f" (first {args.rows} rows of each split)", data.train[:args.rows],
                    data.forget[:args.rows], data.retain[:args.rows],
                    {name: ds[:args.rows] for name, ds in data.eval_sets.items()})
    if getattr(args, "eval_rows", None):  # gpu_check.py passes a Namespace without it
        rows = eval_rows(args.eval_rows, data.eval_sets)
        data.eval_sets = {name: ds[:rows[name]] for name, ds in data.eval_sets.items() if name in rows}
        data.source += f" (evaluation: the first {', '.join(f'{n} of {name}' for name, n in rows.items())})"
    return data


def eval_rows(spec: str, sets: dict[str, QADataset]) -> dict[str, int]:
    """``forget=40,retain=100`` -> {set: rows}; only the sets named are evaluated."""
    rows = {}
    for part in spec.split(","):
        name, _, n = part.partition("=")
        if name.strip() not in sets or not n.strip().isdigit() or int(n) < 1:
            raise SystemExit(f"--eval-rows: {part!r} is not SET=N with SET one of {', '.join(sets)} and N >= 1")
        rows[name.strip()] = int(n)
    return rows


def model_dir(args, scratch: Path) -> str:
    if args.model != "tiny":
        return args.model
    from obliviate.models.tiny import build_tiny_model

    return str(build_tiny_model(scratch / "tiny", hidden=args.tiny_hidden, layers=args.tiny_layers, seed=args.seed))


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


# ----------------------------------------------------------------------------------------------
# measuring

def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM) that getrusage reports
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@contextmanager
def measured(device: torch.device):
    """Yields a dict that gets ``wall_seconds`` and ``peak_memory_mib`` when the block ends."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        out["peak_rss_reset"] = _reset_peak_rss()
    start = time.perf_counter()
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        out["peak_memory_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["wall_seconds"] = round(time.perf_counter() - start, 4)


def _rates(record: dict, params: int, flops_per_token_param: int, peak: float | None) -> dict:
    wall = record["wall_seconds"]
    record["tokens_per_second"] = round(record["tokens"] / wall, 2)
    record["steps_per_second"] = round(record["steps"] / wall, 4) if record.get("steps") is not None else None
    record["mfu"] = (round(flops_per_token_param * params * record["tokens"] / wall / peak, 5)
                     if peak else None)
    return record


def eval_pairs(sets: dict[str, QADataset]) -> list[tuple[str, str]]:
    """Every unique (question, answer) pair TOFU evaluation scores, in first-seen order: each row's
    answer and, on rows with perturbed answers, its paraphrased answer (or the answer) and each
    perturbed answer."""
    pairs: dict[tuple[str, str], None] = {}
    for ds in sets.values():
        for ex in ds.examples:
            pairs[(ex.question, ex.answer)] = None
            if ex.perturbed_answers:
                base = ex.paraphrased_answer if ex.paraphrased_answer is not None else ex.answer
                pairs[(ex.question, base)] = None
                for p in ex.perturbed_answers:
                    pairs[(ex.question, p)] = None
    return list(pairs)


def eval_tokens(fmt: ChatFormat, sets: dict[str, QADataset], result: dict) -> int:
    """Non-padding tokens evaluation exists to process: every unique scored pair (as
    ``evaluate_model`` plans them), every unique question's prompt, every generated answer."""
    scored = sum(len(fmt.encode_scored(q, a)) for q, a in eval_pairs(sets))
    answers = {q: g for s in result["sets"].values()
               for q, g in zip(s["per_sample"]["question"], s["per_sample"]["generation"])}
    prompts = sum(len(fmt.prompt_ids(q)) for q in answers)
    generated = sum(len(fmt.answer_ids(g)) for g in answers.values() if g)
    return scored + prompts + generated


# ----------------------------------------------------------------------------------------------
# the naive baseline

def naive_train(model, fmt: ChatFormat, method, primary: QADataset, retain: QADataset | None,
                cfg: TrainConfig, device: torch.device) -> dict:
    """Batch size 1, rows in order, and (for methods with a reference) a live reference model
    queried at every step."""
    method.bind(model)
    for name, p in model.named_parameters():
        p.requires_grad_(bool(method.trainable(name)))
    model.to(device).train()
    ref = (copy.deepcopy(model).eval().requires_grad_(False)
           if method.needs_ref_logps or method.needs_ref_model else None)
    rows = encode_views(fmt, primary, tuple(method.views))
    retain_rows = encode_views(fmt, retain, ("answer",)) if method.uses_retain else None
    pad_id = fmt.tokenizer.pad_token_id
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.mixed_precision == "bf16"
                else nullcontext())
    steps = tokens = 0
    for _ in range(max(1, round(cfg.epochs))):
        for i, row in enumerate(rows):
            batch = to_device(collate([row], [i], pad_id), device)
            rbatch = None
            tokens += sum(len(v) for v in row.values())
            if retain_rows:
                j = steps % len(retain_rows)
                rbatch = to_device(collate([retain_rows[j]], [j], pad_id), device)
                tokens += len(retain_rows[j]["answer"])
            with autocast:
                if method.needs_ref_logps:
                    batch["ref_logp"] = {v: x.to(device) for v, x in
                                         reference_logps(ref, {v: batch[v] for v in method.views}).items()}
                loss, _ = method(StepInputs(model=model, forget=batch, retain=rbatch, ref_model=ref, step=steps))
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    return {"steps": steps, "tokens": tokens}


# ----------------------------------------------------------------------------------------------
# the floor: plain PyTorch at full batch, no obliviate machinery

def full_batches(seqs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> list[tuple]:
    """(input_ids, labels) sequences -> padded batches of ``batch_size``, longest first (minimal padding):
    (input_ids, attention_mask, labels) tensors, labels -100 on padding."""
    order = sorted(seqs, key=lambda s: -len(s[0]))
    out = []
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        width = len(chunk[0][0])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for j, (x, y) in enumerate(chunk):
            ids[j, :len(x)] = torch.tensor(x)
            mask[j, :len(x)] = 1
            labels[j, :len(y)] = torch.tensor(y)
        out.append((ids, mask, labels))
    return out


def floor_train(model, batches: list[list[tuple]], lr: float, mixed_precision: str, device: torch.device) -> dict:
    """One optimizer step per group of batches (a forget batch and its retain batch): forward,
    backward, AdamW. The first group runs once untimed (kernel selection, allocator warm-up)."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # torch's fused AdamW where it has one, as the library's loop uses it
    optimizer = torch.optim.AdamW(params, lr=lr, **({"fused": True} if device.type in ("cuda", "cpu") else {}))
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if mixed_precision == "bf16" else nullcontext())
    on_device = [[tuple(t.to(device) for t in b) for b in group] for group in batches]

    def step(group) -> None:
        for ids, mask, labels in group:
            with autocast:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(on_device[0])
    return _timed(device, lambda: [step(g) for g in on_device],
                  steps=len(on_device), tokens=sum(int(b[1].sum()) for g in batches for b in g))


def floor_forward(model, batches: list[tuple], mixed_precision: str, device: torch.device) -> dict:
    """Forward passes only (no grad) over ``batches``; the first runs once untimed."""
    model.to(device).eval()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if mixed_precision == "bf16" else nullcontext())
    on_device = [tuple(t.to(device) for t in b) for b in batches]

    def forward(b) -> None:
        with torch.inference_mode(), autocast:
            model(input_ids=b[0], attention_mask=b[1])

    forward(on_device[0])
    return _timed(device, lambda: [forward(b) for b in on_device],
                  steps=len(on_device), tokens=sum(int(b[1].sum()) for b in batches))


def _timed(device: torch.device, fn, **record) -> dict:
    with measured(device) as out:
        fn()
    return {**record, **out}


def run_floor_stage(name: str, args, spec: str, tok, fmt: ChatFormat, data: Data, device: torch.device) -> dict:
    """The floor of stage ``name`` on the rows the fast mode uses (see the module docstring)."""
    pad_id = tok.pad_token_id
    model = load_model(spec, dtype=args.dtype, device=device)
    if name == "evaluate":
        sets = data.eval_sets
        seqs = [(e.input_ids, e.labels) for e in (fmt.encode_scored(q, a) for q, a in eval_pairs(sets))]
        questions = {ex.question: ex.answer for ds in sets.values() for ex in ds.examples}
        seqs += [(fmt.prompt_ids(q) + fmt.answer_ids(a), []) for q, a in questions.items()]
        record = floor_forward(model, full_batches(seqs, args.eval_batch_size, pad_id), args.mixed_precision, device)
        record.update(stage=name, mode="floor", rows=sum(len(ds) for ds in sets.values()),
                      batch_size=args.eval_batch_size)
        return record
    finetune = name == "sft"
    views = ("answer",) if finetune else tuple(build_method(name).views)
    uses_retain = not finetune and build_method(name).uses_retain
    primary = data.train if finetune else data.forget
    rows = [(e.input_ids, e.labels) for r in encode_views(fmt, primary, views) for e in r.values()]
    groups = [[b] for b in full_batches(rows, args.batch_size, pad_id)]
    if uses_retain:  # one retain batch of the same size per forget batch, as the loop draws them
        encoded = [r["answer"] for r in encode_views(fmt, data.retain, ("answer",))]
        retain = [(encoded[i % len(encoded)].input_ids, encoded[i % len(encoded)].labels) for i in range(len(primary))]
        for group, b in zip(groups, full_batches(retain, args.batch_size, pad_id)):
            group.append(b)
    record = floor_train(model, groups, 2e-4 if finetune else 1e-5, args.mixed_precision, device)
    record.update(stage=name, mode="floor", rows=len(primary), epochs=1, batch_size=args.batch_size)
    return record


# ----------------------------------------------------------------------------------------------
# stages

def run_train_stage(name: str, mode: str, args, spec: str, tok, fmt: ChatFormat, data: Data,
                    device: torch.device) -> dict:
    finetune = name == "sft"
    primary, retain = (data.train, None) if finetune else (data.forget, data.retain)
    if mode == "naive" and args.naive_rows:
        primary = primary[:args.naive_rows]
    cfg = TrainConfig(epochs=args.epochs if finetune else args.unlearn_epochs, batch_size=args.batch_size,
                      lr=2e-4 if finetune else 1e-5, warmup_ratio=0.1 if finetune else 0.0,
                      mixed_precision=args.mixed_precision, seed=args.seed)
    method = build_method(name)
    model = load_model(spec, dtype=args.dtype, device=device)
    with measured(device) as record:
        if mode == "fast":
            result = train(model, tok, method, primary, cfg, retain=retain, fmt=fmt, progress=False)
            record.update(steps=result.steps, tokens=result.tokens, loop_seconds=round(result.seconds, 4))
        else:
            record.update(naive_train(model, fmt, method, primary, retain, cfg, device))
    record.update(stage=name, mode=mode, rows=len(primary), epochs=cfg.epochs,
                  batch_size=cfg.batch_size if mode == "fast" else 1)
    return record


def run_eval_stage(mode: str, args, spec: str, tok, fmt: ChatFormat, data: Data, device: torch.device) -> dict:
    sets = data.eval_sets
    if mode == "naive" and args.naive_rows:
        sets = {name: ds[:args.naive_rows] for name, ds in sets.items()}
    batch = args.eval_batch_size if mode == "fast" else 1
    model = load_model(spec, dtype=args.dtype, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if args.mixed_precision == "bf16" and device.type == "cuda" else nullcontext())
    with measured(device) as record, autocast:
        result = evaluate_model(model, tok, sets, fmt=fmt, batch_size=batch, max_new_tokens=args.max_new_tokens,
                                progress=False, length_budget=args.length_budget)
    numbers = {k: v for k, v in summary_row(result).items() if v is not None}
    record.update(stage="evaluate", mode=mode, rows=sum(len(ds) for ds in sets.values()), steps=None,
                  batch_size=batch, tokens=eval_tokens(fmt, sets, result), max_new_tokens=args.max_new_tokens,
                  length_budget=args.length_budget, metrics=numbers)
    reference = REFERENCE.get(args.preset or "")
    if reference and mode == "fast":
        record["reference_check"] = reference_check(numbers, reference)
    return record


def reference_check(numbers: dict[str, float], reference: dict[str, float]) -> dict:
    """Each reference number next to this run's, the largest difference, and whether all are within
    the tolerance (a number the run lacks counts as a failure)."""
    diffs = {k: (None if numbers.get(k) is None else round(abs(numbers[k] - ref), 6)) for k, ref in reference.items()}
    known = [d for d in diffs.values() if d is not None]
    return {"reference": reference, "abs_diff": diffs, "max_abs_diff": max(known) if known else None,
            "tolerance": REFERENCE_TOLERANCE,
            "within_tolerance": len(known) == len(diffs) and max(known) <= REFERENCE_TOLERANCE}


def warm_up(spec: str, args, tok, fmt: ChatFormat, data: Data, device: torch.device) -> None:
    """One short step of each kind the stages run, so one-time start-up costs land in no stage."""
    model = load_model(spec, dtype=args.dtype, device=device)
    if any(s != "evaluate" for s in args.stages.split(",")):
        cfg = TrainConfig(max_steps=1, batch_size=2, mixed_precision=args.mixed_precision)
        train(model, tok, build_method("sft"), data.train[:2], cfg, fmt=fmt, progress=False)
    name, ds = next(iter(data.eval_sets.items()))
    evaluate_model(model, tok, {name: ds[:1]}, fmt=fmt, max_new_tokens=2, progress=False)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="issue12-eval: the issue-12 evaluation as one stage, checked against the reference numbers")
    p.add_argument("--model", default="tiny", help="'tiny' (random, built here), 'smollm2-135m', a directory or hub id")
    p.add_argument("--tofu", help="a TOFU directory (full.jsonl, forget10.jsonl, ...); default: synthetic data")
    p.add_argument("--forget-split", default="forget10")
    p.add_argument("--entities", type=int, default=40, help="synthetic: entities (full = entities x facts rows)")
    p.add_argument("--facts", type=int, default=4, help="synthetic: facts per entity")
    p.add_argument("--rows", type=int, default=0, help="keep only the first N rows of every split (0: all)")
    p.add_argument("--eval-rows", default=None,
                   help="evaluate only the sets named, on their first rows: forget=40,retain=100,...")
    p.add_argument("--length-budget", type=float, default=None,
                   help="evaluation: bound each set's generations to this factor times its longest answer "
                        "(obliviate evaluate --length-budget); default: --max-new-tokens for every set")
    p.add_argument("--stages", default="sft,npo,graddiff,evaluate",
                   help="comma-separated: sft, evaluate, and unlearning method names")
    p.add_argument("--modes", default="fast,naive,floor",
                   help="comma-separated: fast (the library), naive (per-sample baseline), floor (plain PyTorch)")
    p.add_argument("--naive-rows", type=int, default=12, help="cap the naive stages to N rows per split (0: all)")
    p.add_argument("--epochs", type=float, default=3.0, help="finetuning epochs")
    p.add_argument("--unlearn-epochs", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", default="float32", help="weights' dtype (never bfloat16 on a CPU: it is very slow)")
    p.add_argument("--mixed-precision", default=None, help="no | bf16 (default: bf16 on GPU, no on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1; small matrices gain little from more, and on "
                        "shared cores OpenMP threads spin-wait for each other; 0: torch's default)")
    p.add_argument("--peak-flops", type=float, default=None, help="override the device's peak FLOP/s for MFU")
    p.add_argument("--tiny-hidden", type=int, default=64)
    p.add_argument("--tiny-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results/<name>.json (default: from model and device)")
    p.add_argument("--out-dir", default=str(RESULTS))
    if argv is None:
        argv = sys.argv[1:]
    args = p.parse_args(argv)
    if args.preset:  # the preset's values, except where a flag was given
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        for key, value in PRESETS[args.preset].items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.mixed_precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"fast", "naive", "floor"}:
        p.error("--modes takes fast, naive and/or floor")
    name = args.name or f"{Path(args.model).name}-{device.type}"

    with tempfile.TemporaryDirectory() as scratch:
        spec = model_dir(args, Path(scratch))
        t0 = time.perf_counter()
        tok = load_tokenizer(spec)
        params = sum(p.numel() for p in load_model(spec, dtype=args.dtype).parameters())
        load_seconds = round(time.perf_counter() - t0, 3)
        fmt = ChatFormat(tok)
        data = load_data(args)
        peak = peak_flops(device, args.peak_flops)
        warm_up(spec, args, tok, fmt, data, device)
        records = []
        for stage in stages:
            for mode in modes:
                if mode == "floor":
                    record = _rates(run_floor_stage(stage, args, spec, tok, fmt, data, device), params,
                                    2 if stage == "evaluate" else 6, peak)
                elif stage == "evaluate":
                    record = _rates(run_eval_stage(mode, args, spec, tok, fmt, data, device), params, 2, peak)
                else:
                    record = _rates(run_train_stage(stage, mode, args, spec, tok, fmt, data, device), params, 6, peak)
                records.append(record)
                print(_line(record), flush=True)

    speedup: dict[str, float] = {}
    of_floor: dict[str, dict[str, float]] = {}
    for stage in stages:
        by_mode = {r["mode"]: r for r in records if r["stage"] == stage}
        if {"fast", "naive"} <= set(by_mode):
            speedup[stage] = round(by_mode["fast"]["tokens_per_second"] / by_mode["naive"]["tokens_per_second"], 2)
        if "floor" in by_mode:
            floor = by_mode["floor"]["tokens_per_second"]
            for mode, r in by_mode.items():
                r["fraction_of_floor"] = round(r["tokens_per_second"] / floor, 4)
                if mode != "floor":
                    of_floor.setdefault(stage, {})[mode] = r["fraction_of_floor"]
    report = {
        "name": name,
        "model": {"spec": args.model, "parameters": params, "dtype": args.dtype, "load_seconds": load_seconds},
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   "peak_flops": peak, "threads": torch.get_num_threads()},
        "mixed_precision": args.mixed_precision,
        "data": {"source": data.source, "train": len(data.train), "forget": len(data.forget),
                 "retain": len(data.retain), "eval": {k: len(v) for k, v in data.eval_sets.items()}},
        "options": vars(args),
        "stages": records,
        "speedup_fast_over_naive": speedup,
        "fraction_of_floor": of_floor,
        "environment": environment(args.seed),
    }
    path = atomic_write_json(Path(args.out_dir) / f"{name}.json", report)
    print(f"speed-up (tokens/s, fast / naive): {speedup}\nfraction of the floor (tokens/s): {of_floor}\n"
          f"wrote {path}")
    return report


def _line(r: dict) -> str:
    mfu = f"{r['mfu']:.2%}" if r["mfu"] is not None else "-"
    steps = f"{r['steps_per_second']:.2f} steps/s" if r["steps_per_second"] is not None else ""
    return (f"{r['stage']:>9} {r['mode']:>5}: {r['wall_seconds']:8.2f} s  {r['tokens_per_second']:10.0f} tok/s  "
            f"{steps:>14}  peak {r['peak_memory_mib']:8.0f} MiB  MFU {mfu}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars, once per stage
    main(sys.argv[1:])
