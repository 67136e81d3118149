"""``obliviate attack relearn|quantise|probe|privacy`` and ``obliviate study id-ood``.

Thin wrappers over ``obliviate.attacks.run`` and ``obliviate.studies.id_ood``; ``register(app)``
adds both sub-apps to the main command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from obliviate.attacks.relearn import RelearnConfig
from obliviate.attacks.run import MODEL_LABELS, PROBES, open_run, run_privacy, run_probes, run_quantise, run_relearn
from obliviate.cli.errors import user_errors
from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT
from obliviate.data.synthetic import SyntheticConfig, generate_benchmark, write_benchmark
from obliviate.models.loading import DEFAULT_MODEL
from obliviate.studies.id_ood import METHODS, IdOodConfig, run_id_ood

attack_app = typer.Typer(help="Attacks on a finished run: is it really forgotten?", no_args_is_help=True,
                         pretty_exceptions_enable=False)
study_app = typer.Typer(help="Studies that need several runs.", no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(highlight=False)

RunArg = Annotated[Path, typer.Argument(help="A finished pipeline run directory (obliviate demo).")]
Benchmark = Annotated[Optional[str], typer.Option(help="Benchmark directory (default: the run's config.yaml).")]
Unlearned = Annotated[Optional[Path], typer.Option(help="Unlearned model directory (default: RUN/unlearn/model).")]
Oracle = Annotated[Optional[Path], typer.Option(help="Oracle model directory (default: RUN/oracle/model).")]
Target = Annotated[Optional[Path], typer.Option(help="Target model directory (default: RUN/target/model).")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]


def register(app: typer.Typer) -> None:
    app.add_typer(attack_app, name="attack")
    app.add_typer(study_app, name="study")


def _open(run_dir: Path, benchmark, unlearned, oracle, target):
    return open_run(run_dir, benchmark=benchmark, unlearned=unlearned, oracle=oracle, target=target)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _int_list(values: list[str], name: str) -> list[int]:
    """Integers from repeated options and/or comma-separated lists: ``--steps 0,5 --steps 10``."""
    try:
        return [int(v) for item in values for v in str(item).split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected integers, got {values}", param_hint=name) from None


@attack_app.command("relearn")
@user_errors
def relearn(
    run_dir: RunArg,
    source: Annotated[str, typer.Option(help="Relearn set: forget_subset, attributes, retain_neighbours or file.")]
    = "forget_subset",
    fraction: Annotated[float, typer.Option(help="forget_subset: share of forget rows to relearn on.")] = 0.15,
    attribute: Annotated[Optional[list[str]], typer.Option(help="attributes: relearn on forget rows about these "
                                                           "(meta 'attribute'); repeatable.")] = None,
    file: Annotated[Optional[Path], typer.Option(help="file: a QA file or plain text (.txt, .jsonl 'text').")] = None,
    max_rows: Annotated[Optional[int], typer.Option(help="retain_neighbours: at most this many rows.")] = None,
    steps: Annotated[list[str], typer.Option(help="Step counts to measure at, e.g. 0,5,10,25,50,100.")]
    = ["0,5,10,25,50,100"],  # noqa: B006 - typer reads the default
    lr: Annotated[float, typer.Option(help="Relearning learning rate (constant).")] = 1e-5,
    batch_size: Annotated[int, typer.Option(help="Relearning batch size.")] = 4,
    lora: Annotated[bool, typer.Option("--lora/--full", help="LoRA adapters instead of all weights.")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed for the subset and the batches.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy answer length for ROUGE and keyword hits.")] = 64,
    benchmark: Benchmark = None, unlearned: Unlearned = None, oracle: Oracle = None, target: Target = None,
    no_progress: NoProgress = False,
) -> None:
    """Benign relearning (Hu et al. 2025, arXiv 2406.13356): finetune a few steps on a small related set
    and measure how much of the held-out forget set comes back; the oracle is the baseline."""
    run = _open(run_dir, benchmark, unlearned, oracle, target)
    cfg = RelearnConfig(steps=tuple(_int_list(steps, "--steps")), lr=lr, batch_size=batch_size, lora=lora,
                        lora_r=lora_r, seed=seed, max_new_tokens=max_new_tokens)
    result = run_relearn(run, cfg, source, progress=not no_progress, fraction=fraction,
                         attributes=attribute or (), file=file, max_rows=max_rows, seed=seed)
    table = Table(title=f"Relearning ({result['relearn_set']['kind']}, {result['relearn_set']['n_relearn']} rows; "
                        f"{result['relearn_set']['n_heldout']} held-out forget rows)")
    for col in ("step", "ROUGE", "probability", "keyword hit", "oracle ROUGE"):
        table.add_column(col, justify="right")
    oracle_rouge = (result.get("oracle") or {}).get("forget_rouge") or [None] * len(result["steps"])
    for i, step in enumerate(result["steps"]):
        table.add_row(str(step), _fmt(result["forget_rouge"][i]), _fmt(result["forget_probability"][i]),
                      _fmt(result["keyword_hit"][i]), _fmt(oracle_rouge[i]))
    console.print(table)
    s = result["summary"]
    console.print(f"recovery ({s['metric']}, step {s['at_step']}): {_fmt(s['recovery'])}   "
                  f"oracle gain: {_fmt(s['oracle_gain'])}   written: {run.path / 'attacks' / 'relearn.json'}")


@attack_app.command("quantise")
@user_errors
def quantise(
    run_dir: RunArg,
    bits: Annotated[list[str], typer.Option(help="Bit widths, e.g. 8,4.")] = ["8,4"],  # noqa: B006
    backend: Annotated[str, typer.Option(help="auto (bitsandbytes on a GPU if installed, else RTN), rtn or bnb.")]
    = "auto",
    group_size: Annotated[int, typer.Option(help="RTN: input columns per scale (0: one per output channel).")] = 128,
    benchmark: Benchmark = None, unlearned: Unlearned = None, oracle: Oracle = None, target: Target = None,
    no_progress: NoProgress = False,
) -> None:
    """Quantisation attack (Zhang et al. 2024, arXiv 2410.16454): evaluate the unlearned model after
    8- and 4-bit quantisation."""
    run = _open(run_dir, benchmark, unlearned, oracle, target)
    result = run_quantise(run, _int_list(bits, "--bits"), backend, group_size or None, progress=not no_progress)
    for label, row in result.items():
        console.print(f"{label:>5}: forget ROUGE {_fmt(row.get('forget_rouge'))}  forget prob "
                      f"{_fmt(row.get('forget_probability'))}  forget quality {_fmt(row.get('forget_quality'))}  "
                      f"utility {_fmt(row.get('model_utility'))}")
    console.print(f"written: {run.path / 'attacks' / 'quantise.json'}")


@attack_app.command("probe")
@user_errors
def probe(
    run_dir: RunArg,
    probe_name: Annotated[Optional[list[str]], typer.Option("--probe", help="paraphrase, few_shot, context; "
                                                            "repeatable (default: all).")] = None,
    model: Annotated[Optional[list[str]], typer.Option(help="Models to probe: unlearned, oracle, target "
                                                       "(default: all present).")] = None,
    shots: Annotated[int, typer.Option(help="few_shot: retain QA pairs before each question.")] = 3,
    seed: Annotated[int, typer.Option(help="few_shot: seed for drawing shots.")] = 0,
    benchmark: Benchmark = None, unlearned: Unlearned = None, oracle: Oracle = None, target: Target = None,
    no_progress: NoProgress = False,
) -> None:
    """Paraphrase / few-shot / context probes of the forget set, evaluated with the TOFU metrics."""
    run = _open(run_dir, benchmark, unlearned, oracle, target)
    result = run_probes(run, tuple(probe_name or PROBES), tuple(model or MODEL_LABELS), shots, seed,
                        progress=not no_progress)
    for name, rows in result["probes"].items():
        for label, row in rows.items():
            console.print(f"{name:>10} {label:>9}: forget ROUGE {_fmt(row.get('forget_rouge'))}  prob "
                          f"{_fmt(row.get('forget_probability'))}  forget quality {_fmt(row.get('forget_quality'))}")
    for name, why in result["skipped"].items():
        console.print(f"[yellow]skipped {name}[/yellow]: {why}")
    console.print(f"written: {run.path / 'attacks' / 'probes.json'}")


@attack_app.command("privacy")
@user_errors
def privacy(
    run_dir: RunArg,
    reference: Annotated[bool, typer.Option("--reference/--no-reference",
                                            help="Reference attack with the run's base model.")] = True,
    benchmark: Benchmark = None, unlearned: Unlearned = None, oracle: Oracle = None, target: Target = None,
) -> None:
    """Membership inference (LOSS, zlib, Min-K%, Min-K%++, reference), PrivLeak vs the oracle, EM/ES,
    exposure: forget set vs holdout, for every model of the run."""
    run = _open(run_dir, benchmark, unlearned, oracle, target)
    result = run_privacy(run, reference=reference)
    for label, row in result["rows"].items():
        console.print(f"{label:>9}: " + "  ".join(f"{k} {_fmt(v)}" for k, v in row.items()))
    console.print(f"written: {run.path / 'attacks' / 'privacy.json'}")


@study_app.command("id-ood")
@user_errors
def id_ood(
    out: Annotated[Path, typer.Option("--out", "-o", help="Study directory to write.")],
    benchmark: Annotated[Optional[str], typer.Option(help="Synthetic benchmark directory with id_forget and "
                                                     "ood_forget (default: generate one).")] = None,
    model: Annotated[str, typer.Option(help="Model to start from.")] = DEFAULT_MODEL,
    n_entities: Annotated[int, typer.Option(help="Generated benchmark: entities.")] = 12,
    facts_per_entity: Annotated[int, typer.Option(help="Generated benchmark: regular facts per entity.")] = 4,
    forget_fraction: Annotated[float, typer.Option(help="Generated benchmark: share of entities with ID/OOD "
                                                   "facts.")] = 0.5,
    id_facts: Annotated[int, typer.Option(help="Generated benchmark: ID facts per forget entity.")] = 2,
    ood_facts: Annotated[int, typer.Option(help="Generated benchmark: OOD canaries per forget entity.")] = 2,
    candidates: Annotated[int, typer.Option(help="Generated benchmark: exposure candidates per row.")] = 20,
    method: Annotated[Optional[list[str]], typer.Option(help="Unlearning methods (default: ga, graddiff).")] = None,
    finetune_epochs: Annotated[float, typer.Option(help="Target/oracle finetuning epochs.")] = 10,
    finetune_lr: Annotated[float, typer.Option(help="Target/oracle finetuning learning rate.")] = 3e-4,
    finetune_batch_size: Annotated[int, typer.Option(help="Target/oracle finetuning batch size.")] = 8,
    unlearn_lr: Annotated[float, typer.Option(help="Unlearning learning rate (constant).")] = 2e-5,
    unlearn_steps: Annotated[int, typer.Option(help="Unlearning steps per run.")] = 40,
    eval_every: Annotated[int, typer.Option(help="Measure every N unlearning steps.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Unlearning batch size.")] = 4,
    retain_eval: Annotated[int, typer.Option(help="Retain rows measuring utility.")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy answer length for ROUGE.")] = 32,
    shared_oracle: Annotated[bool, typer.Option("--shared-oracle", help="One oracle finetuned on full only.")]
    = False,
    mixed_precision: Annotated[str, typer.Option(help="no, bf16 or fp16 (GPU).")] = "no",
    seed: Annotated[int, typer.Option(help="Benchmark and training seed.")] = 0,
    dtype: Annotated[str, typer.Option(help="Weights dtype.")] = "float32",
    system_prompt: Annotated[str, typer.Option(help="System prompt ('' for none).")] = DEFAULT_SYSTEM_PROMPT,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing study directory.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted study.")] = False,
    no_progress: NoProgress = False,
) -> None:
    """In- vs out-of-distribution unlearning (Baluta et al. 2024, arXiv 2411.04388): steps until each
    example's exposure reaches the oracle's, and the utility left at that point, ID vs OOD.

    Defaults are CPU-sized; on a GPU raise --n-entities, --id-facts/--ood-facts and --unlearn-steps."""
    if benchmark is None:
        bench_dir = out.parent / f"{out.name}-benchmark"
        scfg = SyntheticConfig(n_entities=n_entities, facts_per_entity=facts_per_entity,
                               forget_fraction=forget_fraction, id_facts_per_entity=id_facts,
                               ood_facts_per_entity=ood_facts, n_candidates=candidates, seed=seed,
                               name="synthetic-id-ood")
        if not (bench_dir / "benchmark.json").exists() or overwrite:
            write_benchmark(generate_benchmark(scfg), bench_dir, scfg, overwrite=True)
        benchmark = str(bench_dir)
    cfg = IdOodConfig(model=model, methods=tuple(method or METHODS),
                      finetune={"epochs": finetune_epochs, "lr": finetune_lr, "batch_size": finetune_batch_size,
                                "warmup_ratio": 0.1, "seed": seed, "mixed_precision": mixed_precision},
                      unlearn_lr=unlearn_lr, unlearn_steps=unlearn_steps, eval_every=eval_every,
                      batch_size=batch_size, retain_eval=retain_eval, max_new_tokens=max_new_tokens,
                      shared_oracle=shared_oracle, mixed_precision=mixed_precision, seed=seed, dtype=dtype,
                      system_prompt=system_prompt or None)
    result = run_id_ood(benchmark, out, cfg, overwrite=overwrite, resume=resume, progress=not no_progress,
                        echo=console.print)
    for method_name, f in result["finding"].items():
        console.print(f"[bold]{method_name}[/bold]: median steps to forget {f['median_steps_to_forget']}, "
                      f"retain probability at forget {f['retain_probability_at_forget']}")
        console.print(f"    OOD takes more steps: {f['ood_takes_more_steps']}   OOD costs less utility: "
                      f"{f['ood_costs_less_utility']}   ID utility decays faster: {f['id_utility_decays_faster']}")
    console.print(f"study directory: {out}")
