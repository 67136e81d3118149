"""Deletion requests end to end (``obliviate forget``): unlearn, measure, attack, judge, record.

    model + forget rows + holdout rows (+ retain rows)
      -> calibrated unlearning (api.unlearn: stop where the forget rows look like holdout rows)
      -> oracle-free evaluation of the model before ("target") and after ("unlearned"):
         forget, holdout (and retain) sets, per-sample membership scores (privacy.json)
      -> the relearning, quantisation and probe attacks on the unlearned model (attacks/)
      -> the two-sided verdict (evaluation.verdict), and every earlier request of the lineage
         re-checked on the new model (earlier/request-K/)
      -> the audit record (reporting.audit, linked to the previous request's), ledger.json, the report

Someone who receives a deletion request has no oracle (retraining without the data is what they
cannot afford), but they can have a **holdout**: records of the same kind the model never saw. A
record is forgotten when the model treats it like a holdout record: not better (under-unlearned),
not worse (over-unlearned, which marks it as deleted), and not after a little relearning either.
That is why a holdout is required.

Sequential requests: ``model`` may be a previous request's run directory. The new request then
starts from that run's unlearned model, copies the earlier requests' data and their "before"
evaluations into ``earlier/request-K/`` (the chain stays self-contained when the original files are
gone, as deleted data should be), re-checks each earlier request's criteria on the new model
("forgetting request 2 must not bring back request 1"), passes the earlier forget sets to UniErase
(whose new edit must preserve them), links its audit record to the previous record's head hash and
extends the lineage's ``ledger.json``.

Every stage writes its result into the run directory and is skipped on ``resume=True`` when that
result exists, so an interrupted request continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from obliviate import api
from obliviate.attacks.relearn import RelearnConfig
from obliviate.attacks.run import PROBES, AttackRun, run_probes, run_quantise, run_relearn
from obliviate.data.benchmark import Benchmark
from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT
from obliviate.data.qa import QADataset, write_qa_jsonl
from obliviate.data.sources import DataSpec, as_dataset
from obliviate.errors import UserError
from obliviate.evaluation.evaluate import eval_sets_from_benchmark, load_eval, save_eval, summary_row
from obliviate.evaluation.privacy import privacy_of_models, privacy_pairs, privacy_rows
from obliviate.evaluation.scores import ModelScores
from obliviate.evaluation.verdict import (
    NOT_MEASURED,
    SAME,
    Settings,
    log_prob_pairs,
    run_evidence,
    run_verdict,
)
from obliviate.methods import Procedure, build_method
from obliviate.models.fingerprint import model_sha256
from obliviate.models.loading import check_model_spec
from obliviate.reporting import audit, signing
from obliviate.reporting.report import write_report
from obliviate.reporting.tables import SUMMARY, format_number, markdown_table, verdict_summary
from obliviate.runs import RunDir, RunError, atomic_write_json, atomic_write_text, json_default, read_json
from obliviate.runs.fingerprint import dataset_fingerprint
from obliviate.training import presets

LEDGER = "ledger.json"
LEDGER_FORMAT = "obliviate.ledger/1"
ROLES = ("forget", "holdout", "retain")  # the request's data, copied to data/<role>.jsonl
LABELS = ("target", "unlearned")  # the model before the request and after it

HOLDOUT_HELP = ("forgotten means treated like records of the same kind that the model never saw, so the forget "
                "rows are compared with such records: give --holdout with some (records collected after the "
                "model's training cut-off, TOFU's holdout split such as DIR:holdout10, or the synthetic "
                "benchmark's holdout, data/bench:holdout)")


class HoldoutRequired(UserError):
    """A deletion request without a holdout set: nothing to compare the forget rows with."""


@dataclass
class ForgetConfig:
    """How a deletion request is carried out and judged.

    ``method``/``method_options``: any method of ``obliviate methods`` (gradient methods and
    UniErase); ``train``: TrainConfig fields over ``training.presets.UNLEARN``; ``calibrate``: stop
    where the forget rows look like holdout rows (gradient methods; ``calibrate_alpha`` the level of
    each criterion, ``gate`` per-sample gating); the attacks' options (``relearn_steps``: optimizer
    step counts at which the held-out forget rows are measured, on ``relearn_fraction`` of the forget
    rows; ``quantise_bits``; ``probes``); the verdict's (``alpha``: family-wise error rate,
    ``auc_band``: a fixed band for every membership AUC, ``utility_tolerance``); ``recheck_attacks``:
    run the relearning and quantisation attacks for earlier requests too."""

    method: str = "npo"
    method_options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    calibrate: bool = True
    calibrate_alpha: float = 0.05
    gate: bool = True
    dtype: str = "float32"
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    max_length: int = 512
    eval_batch_size: int = 32
    max_new_tokens: int = 200
    relearn_steps: tuple[int, ...] = (0, 10, 25, 50)
    relearn_lr: float = 1e-5
    relearn_fraction: float = 0.15
    quantise_bits: tuple[int, ...] = (4,)
    quantise_backend: str = "auto"
    probes: tuple[str, ...] = PROBES
    alpha: float = 0.05
    auc_band: tuple[float, float] | None = None
    utility_tolerance: float = 0.1
    recheck_attacks: bool = True
    skip_bad: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        self.relearn_steps = tuple(int(s) for s in self.relearn_steps)
        self.quantise_bits = tuple(int(b) for b in self.quantise_bits)
        self.probes = tuple(self.probes)
        if self.auc_band is not None:
            self.auc_band = (float(self.auc_band[0]), float(self.auc_band[1]))
        unknown = [p for p in self.probes if p not in PROBES]
        if unknown:
            raise ValueError(f"unknown probe(s) {', '.join(unknown)} (choose from {', '.join(PROBES)})")
        if not 0 < self.relearn_fraction < 1:
            raise ValueError(f"relearn_fraction must be between 0 and 1, got {self.relearn_fraction}")
        if self.quantise_backend not in ("auto", "rtn", "bnb"):
            raise ValueError(f"quantise_backend must be auto, rtn or bnb, got {self.quantise_backend!r}")
        self.settings()  # alpha, band and tolerance checked now, before anything runs
        self.relearn_config()

    def settings(self) -> Settings:
        return Settings(alpha=self.alpha, auc_band=self.auc_band, utility_tolerance=self.utility_tolerance)

    def relearn_config(self) -> RelearnConfig:
        return RelearnConfig(steps=self.relearn_steps, lr=self.relearn_lr, max_new_tokens=min(self.max_new_tokens, 64),
                             eval_batch_size=self.eval_batch_size, mixed_precision=self.train.get("mixed_precision",
                                                                                                  "no"))

    def is_procedure(self) -> bool:
        return isinstance(build_method(self.method, **self.method_options), Procedure)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (tuples become lists), as config.yaml and the fingerprint hold it."""
    return json.loads(json.dumps(obj, default=json_default))


# ----------------------------------------------------------------------------------------------
# The lineage: a previous request's run as the model


@dataclass
class Previous:
    """A previous ``obliviate forget`` run given as the model: its unlearned model, its ledger, and
    where each earlier request's copied data and "before" evidence lie in it."""

    path: Path
    ledger: dict[str, Any]

    @property
    def model(self) -> Path:
        return self.path / "unlearn" / "model"

    def request_dirs(self) -> list[tuple[int, Path]]:
        """(request number, folder with data/, eval/target.json, privacy.json) of every request so far."""
        requests = self.ledger["requests"]
        out = [(int(r["request"]), self.path / "earlier" / f"request-{r['request']}") for r in requests[:-1]]
        return out + [(int(requests[-1]["request"]), self.path)]


def previous_request(model: str | Path) -> Previous | None:
    """The previous request when ``model`` is an ``obliviate forget`` run directory (or its
    ``unlearn/model``), else None; a run that has not finished is a RunError."""
    path = Path(model)
    if path.name == "model" and path.parent.name == "unlearn" and (path.parent.parent / LEDGER).is_file():
        path = path.parent.parent  # the run's unlearned model: the run continues the lineage
    if not (path / LEDGER).is_file():
        return None
    status = RunDir(path).status()
    if status != "done" or not (path / "unlearn" / "model").is_dir():
        raise RunError(f"--model {path} is a deletion request that has not finished (status: {status}): finish it "
                       f"with `obliviate forget ... --out {path} --resume` first")
    try:
        ledger = read_json(path / LEDGER)
    except (OSError, ValueError) as exc:
        raise RunError(f"{path / LEDGER}: unreadable ({exc})") from None
    if not isinstance(ledger, dict) or ledger.get("format") != LEDGER_FORMAT or not ledger.get("requests"):
        raise RunError(f"{path / LEDGER}: not an obliviate ledger (format {LEDGER_FORMAT})")
    return Previous(path, ledger)


# ----------------------------------------------------------------------------------------------
# The request


def run_forget(model: str | Path, forget: DataSpec, holdout: DataSpec | None, out: str | Path,
               cfg: ForgetConfig | None = None, retain: DataSpec | None = None, *, overwrite: bool = False,
               resume: bool = False, progress: bool = True, sign_key: str | Path | None = None,
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Carry out one deletion request (module doc) and return ``metrics.json``: ``{"request",
    "models": {label: row}, "verdict", "earlier": [{request, then, now, forgotten_now, ...}],
    "audit": {"head", "previous"}, "method"}``. ``sign_key``: an Ed25519 private key (PEM) that signs
    the audit record."""
    cfg = cfg or ForgetConfig()
    if holdout is None:
        raise HoldoutRequired(f"obliviate forget needs a holdout set: {HOLDOUT_HELP}")
    built = build_method(cfg.method, **cfg.method_options)
    if retain is None and getattr(built, "uses_retain", False):
        raise UserError(f"method '{cfg.method}' keeps the retain rows with its retain term: give --retain (records to "
                        "keep), or choose a method without one (e.g. npo_only, ga)")
    previous = previous_request(model)
    model_spec = str(previous.model if previous is not None else model)
    check_model_spec(model_spec)
    key = signing.load_private_key(sign_key) if sign_key is not None else None  # a bad key fails now
    datasets = {"forget": as_dataset(forget, cfg.skip_bad), "holdout": as_dataset(holdout, cfg.skip_bad)}
    if retain is not None:
        datasets["retain"] = as_dataset(retain, cfg.skip_bad)
    train = presets.train_config(cfg.train, presets.UNLEARN)  # bad training options fail before the run
    config = {"command": "forget", "model": str(model), "model_sha256": model_sha256(model_spec),
              **{role: ds.source for role, ds in datasets.items()}, **jsonable(asdict(cfg)), "train": train.to_dict(),
              "previous": None if previous is None else {"run": str(previous.path.resolve()),
                                                          "head": previous.ledger.get("head")}}
    # The rows as copied into the run (data/<role>.jsonl): what the record hashes, so it can be checked after
    # the originals are deleted, as deleted data should be.
    data = {role: {**dataset_fingerprint(ds), "source": str((Path(out) / "data" / f"{role}.jsonl").resolve()),
                   "original": ds.source} for role, ds in datasets.items()}
    run = RunDir.open(out, kind="forget", fingerprint={"config": config, "data": data}, overwrite=overwrite,
                      resume=resume, inputs=(model, forget, holdout, retain))
    if run.status() == "done":
        return run.read_json("metrics.json")
    run.write_config(config, seed=train.seed)
    run.write_json("data.json", data)
    request = 1 if previous is None else int(previous.ledger["requests"][-1]["request"]) + 1
    steps = _Steps(echo, 5 + bool(previous))
    with run.running("forget", resume=resume) as life:
        files = _copy_inputs(run, datasets, previous)
        steps(f"request {request}: unlearning with {cfg.method}"
              + (" (calibrated against the holdout)" if cfg.calibrate and not cfg.is_procedure() else ""))
        unlearned = _unlearn(run, model_spec, files, cfg, resume, progress, echo)
        steps("evaluating the model before and after (forget, holdout" + (", retain)" if "retain" in files else ")"))
        bench = _benchmark(run.path / "data", files)
        models = {"target": Path(model_spec), "unlearned": unlearned}
        scores = _evaluate(run.path, bench, models, cfg, resume, progress)
        _privacy(run.path, bench, models, cfg, resume, scores)
        steps("attacks on the unlearned model: relearning, quantisation, probes")
        _attacks(run.path, bench, {"unlearned": unlearned, "target": Path(model_spec)}, cfg, resume, progress,
                 probes=True)
        steps("the two-sided verdict: forget rows against never-seen holdout rows")
        verdict = run_verdict(run_evidence(run.path, LABELS), cfg.settings(), LABELS)
        earlier = []
        if previous is not None:
            steps(f"re-checking the {request - 1} earlier request(s) on the new model")
            calls = {int(r["request"]): r.get("call") for r in previous.ledger["requests"]}
            earlier = [_recheck(run.path / "earlier" / f"request-{k}", k, calls.get(k), unlearned, cfg, resume,
                                progress) for k, _ in previous.request_dirs()]
        privacy = run.read_json("privacy.json")
        rows = {label: {**summary_row(load_eval(run.file("eval", f"{label}.json"))), **extra}
                for label, extra in privacy_rows(privacy, None).items()}
        result: dict[str, Any] = {"request": request, "method": cfg.method, "models": rows, "verdict": verdict,
                                  "earlier": earlier}
        steps("audit record, ledger and report")
        run.write_json("metrics.json", result)  # what the record's metrics entry holds
        head, previous_head = _record(run, previous, request, cfg, result, key)
        result["audit"] = {"head": head, "previous": previous_head}
        run.write_json("metrics.json", result)
        atomic_write_text(run.file("summary.md"), summary_markdown(result))
        write_report([run.path] + [run.path / "earlier" / f"request-{e['request']}" for e in earlier],
                     run.file("report"), title=f"Deletion request {request}")
        life.children = [run.file("unlearn")]
    return result


class _Steps:
    """Numbered stage messages: "[obliviate forget 2/6] ..."."""

    def __init__(self, echo: Callable[[str], None], total: int):
        self.echo, self.total, self.done = echo, total, 0

    def __call__(self, message: str) -> None:
        self.done += 1
        self.echo(f"[obliviate forget {self.done}/{self.total}] {message}")


def _copy_inputs(run: RunDir, datasets: dict[str, QADataset], previous: Previous | None) -> dict[str, Path]:
    """The request's rows as data/<role>.jsonl, and every earlier request's data and "before"
    evidence as earlier/request-K/ (the chain is self-contained). Returns role -> copied file."""
    files = {role: write_qa_jsonl(ds.examples, run.file("data", f"{role}.jsonl")) for role, ds in datasets.items()}
    if previous is not None:
        for k, source in previous.request_dirs():
            target = run.file("earlier", f"request-{k}")
            for role in ROLES:
                if (source / "data" / f"{role}.jsonl").is_file():
                    _copy_file(source / "data" / f"{role}.jsonl", target / "data" / f"{role}.jsonl")
            _copy_file(source / "eval" / "target.json", target / "eval" / "target.json")
            before = read_json(source / "privacy.json")
            atomic_write_json(target / "privacy.json", {"target": before["target"]})
    return files


def _copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())


def _unlearn(run: RunDir, model: str, files: dict[str, Path], cfg: ForgetConfig, resume: bool, progress: bool,
             echo: Callable[[str], None]) -> Path:
    options = dict(cfg.method_options)
    procedure = cfg.is_procedure()
    extra: dict[str, Any] = {}
    if procedure and cfg.method == "unierase":
        # The earlier requests' forget rows: a new UniErase edit must preserve their keys.
        earlier = sorted(run.path.glob("earlier/request-*/data/forget.jsonl"),
                         key=lambda p: int(p.parent.parent.name.split("-")[1]))
        options["earlier"] = [*options.get("earlier", []), *(str(p) for p in earlier)]
    elif not procedure and cfg.calibrate:
        extra = {"holdout": files["holdout"],
                 "calibrate": {"alpha": cfg.calibrate_alpha, "gate": cfg.gate, "batch_size": cfg.eval_batch_size,
                               **({"auc_band": list(cfg.auc_band)} if cfg.auc_band is not None else {})}}
    return api.unlearn(model, files["forget"], files.get("retain"), run.file("unlearn"), method=cfg.method,
                       method_options=options, train=cfg.train, dtype=cfg.dtype, system_prompt=cfg.system_prompt,
                       max_length=cfg.max_length, resume=resume, progress=progress,
                       trust_remote_code=cfg.trust_remote_code, log=echo if procedure else None, **extra)


def _benchmark(data_dir: Path, files: dict[str, Path]) -> Benchmark:
    """The request's rows as a benchmark: forget (also evaluated as such), holdout, retain."""
    roles = {"forget": "forget", "eval_forget": "forget", "holdout": "holdout"}
    if "retain" in files:
        roles.update(retain="retain", eval_retain="retain")
    return Benchmark(name="deletion-request", source=str(data_dir), roles=roles,
                     files={split: files[split] for split in set(roles.values())})


def _request_files(folder: Path) -> dict[str, Path]:
    return {role: folder / "data" / f"{role}.jsonl" for role in ROLES if (folder / "data" / f"{role}.jsonl").is_file()}


def _evaluate(folder: Path, bench: Benchmark, models: dict[str, Path], cfg: ForgetConfig, resume: bool,
              progress: bool) -> dict[str, ModelScores]:
    """eval/<label>.json of each model on the request's sets (kept on resume); the scores of those
    evaluated now, which hold every pair the membership scores need."""
    sets = eval_sets_from_benchmark(bench)
    holdout = bench.split("holdout")
    # The holdout's paraphrased and perturbed answers too: its truth ratios come from the same scores.
    needs = privacy_pairs(bench.split("forget"), holdout) + log_prob_pairs(holdout)
    scores = {}
    for label, model in models.items():
        path = folder / "eval" / f"{label}.json"
        if resume and path.is_file():
            continue
        evaluation = api.evaluate_scored(model, sets, None, label=label, extra_pairs=needs,
                                         batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                                         dtype=cfg.dtype, system_prompt=cfg.system_prompt, max_length=cfg.max_length,
                                         progress=progress, trust_remote_code=cfg.trust_remote_code)
        save_eval(evaluation.result, path)
        scores[label] = evaluation.scores
    return scores


def _privacy(folder: Path, bench: Benchmark, models: dict[str, Path], cfg: ForgetConfig, resume: bool,
             scores: dict[str, ModelScores]) -> None:
    """privacy.json: per-sample membership scores (LOSS, zlib, Min-K%, Min-K%++) of each model, forget
    as members and holdout as non-members; a label already there is kept (on resume, and the copied
    "before" of an earlier request)."""
    path = folder / "privacy.json"
    done = read_json(path) if path.is_file() else {}
    todo = {label: model for label, model in models.items() if not (resume and label in done)}
    if not todo:
        return
    results = privacy_of_models(todo, bench.split("forget"), bench.split("holdout"), dtype=cfg.dtype,
                                system_prompt=cfg.system_prompt, max_length=cfg.max_length,
                                batch_size=cfg.eval_batch_size, scores=scores)
    atomic_write_json(path, {**done, **results})


def _attacks(folder: Path, bench: Benchmark, models: dict[str, Path], cfg: ForgetConfig, resume: bool,
             progress: bool, probes: bool) -> None:
    """attacks/relearn.json (with the holdout control), quantise.json and (``probes``) probes.json."""
    attack = AttackRun(path=folder, benchmark=bench, models=dict(models), system_prompt=cfg.system_prompt,
                       max_length=cfg.max_length, dtype=cfg.dtype, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.eval_batch_size)

    def pending(name: str) -> bool:
        return not (resume and (folder / "attacks" / f"{name}.json").is_file())

    if pending("relearn"):
        run_relearn(attack, cfg.relearn_config(), "forget_subset", progress=progress, fraction=cfg.relearn_fraction)
    if pending("quantise") and cfg.quantise_bits:
        run_quantise(attack, bits=cfg.quantise_bits, backend=cfg.quantise_backend, progress=progress)
    if probes and pending("probes") and cfg.probes:
        run_probes(attack, cfg.probes, progress=progress)


def _recheck(folder: Path, request: int, then: str | None, model: Path, cfg: ForgetConfig, resume: bool,
             progress: bool) -> dict[str, Any]:
    """An earlier request judged on the new model: its sets evaluated (eval/unlearned.json), its
    membership scores, the relearning and quantisation attacks (``cfg.recheck_attacks``), and the
    verdict against its own "before" (eval/target.json, copied). ``then``: its call when it was
    carried out (the ledger's). Returns its summary."""
    files = _request_files(folder)
    bench = _benchmark(folder / "data", files)
    models = {"unlearned": model}
    scores = _evaluate(folder, bench, models, cfg, resume, progress)
    _privacy(folder, bench, models, cfg, resume, scores)
    if cfg.recheck_attacks:
        _attacks(folder, bench, models, cfg, resume, progress, probes=False)
    atomic_write_text(folder / "config.yaml", f"command: forget-recheck\nrequest: {request}\nmodel: {model}\n")
    verdict = run_verdict(run_evidence(folder, LABELS), cfg.settings(), LABELS)
    atomic_write_json(folder / "verdict.json", verdict)
    return {"request": request, "n_forget": len(bench.split("forget")), "n_holdout": len(bench.split("holdout")),
            "then": then, "now": verdict["call"], "forgotten_now": verdict["forgotten"],
            "under_now": verdict["under"], "over_now": verdict["over"],
            "membership_auc_now": _membership_aucs(verdict), "folder": str(folder)}


def _membership_aucs(verdict: dict[str, Any]) -> dict[str, float | None]:
    return {c["name"].split(":", 1)[1]: c.get("value") for c in verdict["criteria"] if c["group"] == "membership"}


# ----------------------------------------------------------------------------------------------
# The audit record and the ledger


def _record(run: RunDir, previous: Previous | None, request: int, cfg: ForgetConfig, result: dict[str, Any],
            key) -> tuple[str, str | None]:
    """Certify the request (linked to the previous request's record), sign it with ``key``, write
    audit.json and the lineage's ledger.json. Returns (head, previous head)."""
    record = audit.certify(run.path, cfg.settings())
    previous_head = None
    if previous is not None:
        previous_head = previous.ledger["head"]
        record = audit.link_previous(record, previous_head, previous.path / "audit.json", request - 1)
    if key is not None:
        record = signing.sign(record, key)
    audit.write_record(record, run.file("audit.json"))
    files = {e["role"]: e for e in record["entries"] if e.get("type") == "file"}
    verdict = result["verdict"]
    entry = {"request": request, "run": str(run.path.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime()),
             "method": cfg.method, "model_before_sha256": (files.get("model_before") or {}).get("sha256"),
             "model_after_sha256": (files.get("model_after") or {}).get("sha256"),
             **{f"{role}_sha256": d["sha256"] for role, d in run.read_json("data.json").items()},
             "n_forget": run.read_json("data.json")["forget"]["n"], "call": verdict["call"],
             "forgotten": verdict["forgotten"], "audit_head": record["head"], "previous_head": previous_head,
             "signed": key is not None}
    requests = ([] if previous is None else list(previous.ledger["requests"])) + [entry]
    lineage = requests[0]["model_before_sha256"]
    run.write_json(LEDGER, {"format": LEDGER_FORMAT, "lineage": lineage, "head": record["head"],
                            "requests": requests})
    return record["head"], previous_head


# ----------------------------------------------------------------------------------------------
# Summary


COLUMNS = [("forget_rouge", "forget ROUGE-L"), ("holdout_rouge", "holdout ROUGE-L"),
           ("forget_truth_ratio", "forget truth ratio"), ("mia_auc_loss", "AUC LOSS"), ("mia_auc_zlib", "AUC zlib"),
           ("mia_auc_mink", "AUC Min-K%"), ("mia_auc_minkpp", "AUC Min-K%++"), ("retain_rouge", "retain ROUGE-L")]


def summary_markdown(result: dict[str, Any]) -> str:
    """summary.md: the models' table, the verdict in words, and the earlier requests re-checked."""
    verdict = result["verdict"]
    header = ["model"] + [title for _, title in COLUMNS] + ["call"]
    calls = verdict.get("by_model") or {}
    rows = [[label] + [format_number(row.get(k), SUMMARY) for k, _ in COLUMNS] + [calls.get(label, "-")]
            for label, row in result["models"].items()]
    lines = [f"# Deletion request {result['request']} ({result['method']})", "",
             "The forget rows were compared with never-seen holdout rows of the same kind, on the model before "
             "the request (target) and after it (unlearned): membership-inference AUCs (0.5 = an attacker cannot "
             "tell them apart), knowledge tests, the relearning and quantisation attacks, and utility on the "
             "retain rows against the model before. No oracle was used.", "",
             markdown_table(header, rows), ""]
    lines += [x for line in verdict_summary(verdict) for x in (line, "")]
    if result["earlier"]:
        lines += ["## Earlier requests, re-checked on this model", "",
                  "Forgetting this request must not bring back an earlier one: each earlier request's forget rows "
                  "are judged again against its own holdout rows.", ""]
        lines.append(markdown_table(
            ["request", "forget rows", "call then", "call now", "AUC LOSS now", "forgotten now"],
            [[str(e["request"]), str(e["n_forget"]), e["then"] or "-", e["now"],
              format_number(e["membership_auc_now"].get("loss"), SUMMARY), "yes" if e["forgotten_now"] else "no"]
             for e in result["earlier"]]))
        back = [e for e in result["earlier"] if e["then"] == SAME and e["now"] != SAME]
        lines += ["", ("Brought back or disturbed: " + ", ".join(f"request {e['request']} ({e['now']})" for e in back)
                       if back else "No earlier request forgotten then is distinguishable now."
                       if any(e["now"] != NOT_MEASURED for e in result["earlier"]) else "")]
    audit_info = result.get("audit") or {}
    lines += ["", f"Audit record head: `{audit_info.get('head')}`"
              + (f"; previous request's record: `{audit_info['previous']}`" if audit_info.get("previous") else "")]
    return "\n".join(lines) + "\n"
