"""Privacy evaluation of one model: membership inference, memorisation and exposure in one call.

The forget set plays the members (it was in the target's training data) and a holdout set the
non-members (never trained on). The MIA AUCs (``evaluation.mia``), EM / ES
(``evaluation.memorisation``) and exposure (``evaluation.exposure``) are pure functions of the
model's per-token scores (:func:`privacy_from_scores`), so a model that was just evaluated is not run
again: its :class:`~obliviate.evaluation.scores.ModelScores` already hold every forget and holdout
answer. Exposure needs its own candidate answers and runs by default only when every forget row has
``meta["candidates"]``: answers in the trained form. TOFU-style perturbed answers are rewrites of the
*paraphrased* answer, so ranking the trained answer among them measures the form as much as the fact.

PrivLeak (MUSE, Shi et al. 2024, arXiv 2407.06460) compares this model's Min-K% 40 AUC with the
oracle's (the model retrained without the forget set): :func:`privleak_vs`. Definitions:
docs/attacks-and-privacy.md and ../shared/docs/metrics-reference.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat
from obliviate.data.qa import DataError, QADataset
from obliviate.evaluation.exposure import exposure_from_scores, exposure_pairs
from obliviate.evaluation.memorisation import memorisation_report
from obliviate.evaluation.mia import DEFAULT_K, mia_report, mia_scores, privleak
from obliviate.evaluation.scores import ModelScores, Pair
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.processes import processes

# Flat metric names (metrics.json rows) for each attack's AUC.
AUC_KEYS = {"loss": "mia_auc_loss", "zlib": "mia_auc_zlib", "min_k": "mia_auc_mink",
            "min_k_plus_plus": "mia_auc_minkpp", "reference": "mia_auc_ref"}


def has_candidates(ds: QADataset) -> bool:
    """Whether every row has exposure candidates of its own (``meta["candidates"]``)."""
    return len(ds) > 0 and all(e.meta.get("candidates") for e in ds)


def _pairs(ds: QADataset, name: str) -> list[Pair]:
    if len(ds) == 0:
        raise DataError(ds.source, None, f"the {name} set is empty")
    return [(e.question, e.answer) for e in ds]


def _with_exposure(forget: QADataset, exposure: bool | None) -> bool:
    return has_candidates(forget) if exposure is None else exposure


def privacy_pairs(forget: QADataset, holdout: QADataset, exposure: bool | None = None) -> list[Pair]:
    """Every (question, answer) pair :func:`privacy_from_scores` reads from the model's scores:
    forget and holdout answers, and the exposure candidates when exposure is computed."""
    pairs = _pairs(forget, "forget") + _pairs(holdout, "holdout")
    if _with_exposure(forget, exposure):
        pairs += exposure_pairs(list(forget), forget.source)
    return pairs


def reference_scores(ref_model, fmt: ChatFormat, forget: QADataset, holdout: QADataset,
                     batch_size: int = 32) -> ModelScores:
    """The reference model's scores of the forget and holdout answers (one call per set)."""
    ref = ModelScores.empty(fmt, "reference")
    for name, ds in (("forget", forget), ("holdout", holdout)):
        ref.ensure(ref_model, fmt, _pairs(ds, name), batch_size)
    return ref


def privacy_from_scores(scores: ModelScores, forget: QADataset, holdout: QADataset,
                        ref: ModelScores | None = None, k: float = DEFAULT_K,
                        exposure: bool | None = None) -> dict[str, Any]:
    """MIA AUCs (forget = members, holdout = non-members), EM/ES and exposure from a model's scores
    (:func:`privacy_pairs` must all be there; ``ref``: a reference model's, adding the reference
    attack). The result is :func:`privacy_eval`'s."""
    mia, mem = {}, {}
    for name, ds in (("forget", forget), ("holdout", holdout)):
        pairs = _pairs(ds, name)
        own = scores.get(pairs)
        mia[name] = mia_scores(own, [a for _, a in pairs], k, ref.get(pairs) if ref is not None else None)
        mem[name] = memorisation_report(own)
    exp = None
    if _with_exposure(forget, exposure):
        examples = list(forget)
        exp = exposure_from_scores(examples, scores.get(exposure_pairs(examples, forget.source)), forget.source)
    return {
        "k": k,
        "n_forget": len(forget),
        "n_holdout": len(holdout),
        "auc": mia_report(mia["forget"], mia["holdout"]),
        "forget_em": mem["forget"]["em"],
        "forget_es": mem["forget"]["es"],
        "holdout_em": mem["holdout"]["em"],
        "holdout_es": mem["holdout"]["es"],
        "forget_exposure": None if exp is None else exp["exposure"],
        "per_sample": {
            "mia": mia,
            "forget_em": mem["forget"]["per_sample"]["em"],
            "forget_es": mem["forget"]["per_sample"]["es"],
            "forget_exposure": None if exp is None else exp["per_sample"]["exposure"],
        },
    }


def privacy_eval(model, tokenizer, forget: QADataset, holdout: QADataset, fmt: ChatFormat | None = None,
                 ref_model=None, k: float = DEFAULT_K, batch_size: int = 32, exposure: bool | None = None,
                 scores: ModelScores | None = None, ref_scores: ModelScores | None = None) -> dict[str, Any]:
    """MIA AUCs (forget = members, holdout = non-members), EM/ES and exposure of ``model``.

    ``scores`` (this model's, e.g. from its evaluation) are reused and only the pairs they lack are
    scored (and added to them); ``ref_model`` (same tokenizer, e.g. the base model before
    finetuning) or its ``ref_scores`` add the reference attack. ``exposure=None`` computes exposure
    when :func:`has_candidates` holds for the forget set, ``True`` forces it (rows without candidates
    then rank the answer among their perturbed answers; a row with neither is a
    :class:`DataError`), ``False`` skips it.

    Returns ``{"k", "n_forget", "n_holdout", "auc": {attack: AUC}, "forget_em", "forget_es",
    "holdout_em", "holdout_es", "forget_exposure" (None when not computed), "per_sample": {...}}``.
    AUCs follow ``evaluation.mia``: higher = members look more like training data, 0.5 = chance.
    """
    fmt = fmt or ChatFormat(tokenizer)
    scores = scores if scores is not None else ModelScores.empty(fmt)
    # One call per set, as the sets' own batches: the forget answers, the holdout answers, then
    # whatever exposure candidates are not among them.
    scores.ensure(model, fmt, _pairs(forget, "forget"), batch_size)
    scores.ensure(model, fmt, _pairs(holdout, "holdout"), batch_size)
    if _with_exposure(forget, exposure):
        scores.ensure(model, fmt, exposure_pairs(list(forget), forget.source), batch_size)
    if ref_scores is None and ref_model is not None:
        ref_scores = reference_scores(ref_model, fmt, forget, holdout, batch_size)
    return privacy_from_scores(scores, forget, holdout, ref_scores, k, exposure)


def privleak_vs(result: dict[str, Any], oracle_result: dict[str, Any]) -> float | None:
    """MUSE PrivLeak (percent) of ``result`` against the oracle's, from their Min-K% AUCs.

    Both results must use the same k (MUSE uses 0.4). None when PrivLeak is undefined (the
    oracle's AUC is 1, see ``evaluation.mia.privleak``).
    """
    if result["k"] != oracle_result["k"]:
        raise ValueError(f"PrivLeak compares Min-K% AUCs of one k; got k={result['k']} and the oracle's "
                         f"k={oracle_result['k']}")
    try:
        return privleak(result["auc"]["min_k"], oracle_result["auc"]["min_k"])
    except ValueError:
        return None


def privacy_row(result: dict[str, Any], oracle_result: dict[str, Any] | None = None) -> dict[str, float | None]:
    """Flat numbers for tables and metrics.json: ``mia_auc_<attack>``, ``privleak`` (with an oracle),
    ``forget_em``, ``forget_es``, ``holdout_em``, ``forget_exposure``."""
    row: dict[str, float | None] = {AUC_KEYS.get(name, f"mia_auc_{name}"): value
                                    for name, value in result["auc"].items()}
    if oracle_result is not None:
        row["privleak"] = privleak_vs(result, oracle_result)
    for key in ("forget_em", "forget_es", "holdout_em", "forget_exposure"):
        row[key] = result[key]
    return row


def privacy_of_models(models: Mapping[str, str | Path], forget: QADataset, holdout: QADataset, *,
                      reference: str | Path | None = None, dtype: str = "float32",
                      system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_length: int = 512,
                      batch_size: int = 32, k: float = DEFAULT_K, device: str | None = None,
                      scores: Mapping[str, ModelScores] | None = None) -> dict[str, dict]:
    """:func:`privacy_eval` of each saved model (label -> model directory), one model in memory at a
    time. ``reference`` (a model spec sharing the tokenizer, e.g. the base model) adds the reference
    attack to every model; it is scored once. ``scores`` (label -> that model's scores, e.g. from
    its evaluation) spare loading and running a model whose scores hold every pair needed."""
    device = device or str(processes().device)  # this process's accelerator under accelerate launch
    needed = privacy_pairs(forget, holdout)
    ref_model = load_model(str(reference), dtype=dtype, device=device) if reference is not None else None
    ref_scores = None
    results = {}
    for label, path in models.items():
        fmt = ChatFormat(load_tokenizer(str(path)), system_prompt=system_prompt, max_length=max_length)
        if ref_model is not None:  # the tokenizer is shared, so the first model's layout serves all
            ref_scores, ref_model = reference_scores(ref_model, fmt, forget, holdout, batch_size), None
        own = (scores or {}).get(label)
        if own is not None and not own.missing(needed, distribution=True):  # Min-K%++ reads the statistics
            results[label] = privacy_from_scores(own, forget, holdout, ref_scores, k)
            continue
        model = load_model(str(path), dtype=dtype, device=device)
        results[label] = privacy_eval(model, fmt.tokenizer, forget, holdout, fmt, k=k, batch_size=batch_size,
                                      scores=own, ref_scores=ref_scores)
        del model
    return results


def privacy_rows(results: Mapping[str, dict], oracle: str | None = "oracle") -> dict[str, dict]:
    """:func:`privacy_row` of each result, PrivLeak against ``results[oracle]`` when it is there."""
    reference = results.get(oracle) if oracle is not None else None
    return {label: privacy_row(result, reference) for label, result in results.items()}
