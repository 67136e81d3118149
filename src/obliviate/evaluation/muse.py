"""MUSE's memorisation metrics: VerbMem (verbatim continuation) and KnowMem (answers to questions).

Shi et al., "MUSE: Machine Unlearning Six-Way Evaluation for Language Models", 2024,
arXiv 2407.06460. VerbMem prompts the model with the start of a forget-set text, decodes greedily
(up to 128 new tokens) and scores the continuation against the true one with ROUGE-L F1; KnowMem
scores the model's answers to questions about the corpus with ROUGE-L recall (MUSE's code; some
ports use F1). ROUGE-L (Lin 2004) comes from the ``rouge-score`` package with its Porter stemmer;
its tokenizer keeps ASCII letters and digits only, so texts in other scripts score 0.

Forget texts are plain text: no chat template. ``data.text.prefix_continuations`` cuts documents
into (prompt, true continuation) pairs; continuations come from the same greedy decoder as TOFU's
answers (``evaluation.generation.greedy_many``) run on raw token ids. KnowMem prompts are plain text
too, as MUSE's code writes them: few-shot examples, then ``Question: ...\nAnswer: `` (greedy, up to
32 new tokens, cut where the model starts another example).

On a MUSE benchmark (``data.muse``), :func:`evaluate_muse` gives VerbMem on the forget texts, KnowMem
on the forget and retain QA, and PrivLeak: the Min-K% 40 AUC of the PrivLeak forget vs holdout texts
(their token scores computed once, in a ``ModelScores``) against the retain model's AUC
(``evaluation.mia.privleak``). Definitions: docs/metrics.md (MUSE).
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from obliviate.data.chat import ChatFormat
from obliviate.data.muse import EVAL_OPTIONAL_ROLES, EVAL_ROLES, MuseBenchmark, load_muse
from obliviate.data.qa import DataError
from obliviate.evaluation.generation import greedy_many
from obliviate.evaluation.mia import DEFAULT_K, mia_report, mia_scores, privleak
from obliviate.evaluation.scores import ModelScores, Pair
from obliviate.models.loading import check_model_spec, load_model, load_tokenizer
from obliviate.processes import processes
from obliviate.runs import RunDir, RunError, safe_name

VERBMEM_MAX_NEW_TOKENS = 128
# Tokens that end a plain text: the tokenizer's end of sequence, and the pretraining document end
# and chat end-of-turn markers of chat models.
_END_TOKENS = ("<|endoftext|>", "<|im_end|>")


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer  # about 2 s to import (nltk, absl); only generation metrics need it

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, generated: str):
    """ROUGE-L of ``generated`` against ``reference``: a Score with precision, recall, fmeasure."""
    return _scorer().score(reference, generated)["rougeL"]


def _check_pairs(generations: Sequence[str], references: Sequence[str]) -> None:
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations but {len(references)} references")
    if not references:
        raise ValueError("no samples to score")


def verbmem_scores(generations: Sequence[str], continuations: Sequence[str]) -> dict:
    """VerbMem from texts: ROUGE-L F1 of each generation against its true continuation.

    Returns ``{"verbmem": mean, "per_sample": [...]}``.
    """
    _check_pairs(generations, continuations)
    values = [rouge_l(ref, gen).fmeasure for gen, ref in zip(generations, continuations)]
    return {"verbmem": float(np.mean(values)), "per_sample": values}


def knowmem_scores(generations: Sequence[str], answers: Sequence[str]) -> dict:
    """KnowMem from texts: ROUGE-L recall of each generated answer against the reference answer.

    Returns ``{"knowmem": mean, "per_sample": [...]}``.
    """
    _check_pairs(generations, answers)
    values = [rouge_l(ref, gen).recall for gen, ref in zip(generations, answers)]
    return {"knowmem": float(np.mean(values)), "per_sample": values}


def knowmem(generate: Callable[[list[str]], list[str]], questions: Sequence[str],
            answers: Sequence[str]) -> dict:
    """KnowMem with any answer generator (e.g. ``lambda qs: generate_answers(model, fmt, qs)``).

    Adds the generations to the result as ``"generation"``.
    """
    generations = list(generate(list(questions)))
    result = knowmem_scores(generations, answers)
    result["generation"] = generations
    return result


def text_stop_ids(tokenizer) -> list[int]:
    """Ids that end a plain-text continuation: end of sequence plus any end-of-text markers."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in _END_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def document_prompt_ids(tokenizer, text: str) -> list[int]:
    """A text laid out as training lays out a document (``ChatFormat.encode`` with an empty question):
    the tokenizer's BOS token when it has one, then the text's tokens without other special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def continue_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
                   batch_size: int = 16, as_document: bool = False) -> list[str]:
    """Greedy continuations of plain-text prompts, in input order (left-padded batches by length).

    Prompts are tokenised as the tokenizer does for plain text (its own special tokens, e.g. a BOS,
    included), or with ``as_document`` as training lays out a document (:func:`document_prompt_ids`),
    so that a text is continued from the context it was trained in (SmolLM2's tokenizer, for one, adds
    no BOS of its own, while training documents start with it). Each continuation stops at an
    end-of-text token or after ``max_new_tokens``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids = [document_prompt_ids(tokenizer, p) if as_document else tokenizer(p, add_special_tokens=True)["input_ids"]
           for p in prompts]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} is empty after tokenisation")
    stops = text_stop_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    return [tokenizer.decode(new, skip_special_tokens=True)
            for new in greedy_many(model, ids, stops, pad_id, max_new_tokens, batch_size)]


@torch.no_grad()
def verbmem(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
            max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS, batch_size: int = 16, as_document: bool = False) -> dict:
    """MUSE VerbMem: greedy continuation of each prompt, ROUGE-L F1 against the true continuation
    (``as_document``: prompts laid out as training documents, see :func:`continue_texts`).

    Returns ``{"verbmem": mean, "per_sample": [...], "generation": [...]}``.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    generations = continue_texts(model, tokenizer, prompts, max_new_tokens, batch_size, as_document)
    result = verbmem_scores(generations, continuations)
    result["generation"] = generations
    return result


# ----------------------------------------------------------------------------------------------
# KnowMem prompts, as MUSE's code builds them

KNOWMEM_MAX_NEW_TOKENS = 32
# MUSE's KnowMem prompt: plain text (no chat template), each few-shot example then the question.
KNOWMEM_QUESTION = "Question: {question}\nAnswer: "
KNOWMEM_SHOT = "Question: {question}\nAnswer: {answer}\n\n"
# MUSE keeps a generated answer up to the first of these (the model starting the next example).
KNOWMEM_ANSWER_ENDS = ("\n\n", "\nQuestion", "Question:")


def knowmem_prompt(question: str, shots: Sequence[tuple[str, str]] = ()) -> str:
    """The few-shot examples (question, answer), then ``Question: {question}\\nAnswer: ``."""
    return "".join(KNOWMEM_SHOT.format(question=q, answer=a) for q, a in shots) + \
        KNOWMEM_QUESTION.format(question=question)


def cut_answer(text: str) -> str:
    """A generated answer up to the first of ``KNOWMEM_ANSWER_ENDS`` (all of it when none occurs)."""
    for end in KNOWMEM_ANSWER_ENDS:
        text = text.split(end)[0]
    return text


def knowmem_answers(model, tokenizer, questions: Sequence[str], shots: Sequence[tuple[str, str]] = (),
                    max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS, batch_size: int = 16) -> list[str]:
    """Greedy answers to plain-text few-shot KnowMem prompts (:func:`knowmem_prompt`, laid out as
    training documents: :func:`document_prompt_ids`), each cut by :func:`cut_answer`."""
    prompts = [knowmem_prompt(q, shots) for q in questions]
    return [cut_answer(t) for t in continue_texts(model, tokenizer, prompts, max_new_tokens, batch_size,
                                                  as_document=True)]


# ----------------------------------------------------------------------------------------------
# One model on a MUSE benchmark: VerbMem (forget), KnowMem (forget, retain), PrivLeak

MUSE_ROW_KEYS = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak", "privleak_auc")
PRIVLEAK_NEEDS_RETAIN = ("PrivLeak needs the retain model (--retain-model: the model trained without the forget "
                         "corpus); only this model's Min-K% AUC is reported")


def document_pairs(docs: Sequence[str]) -> list[Pair]:
    """Texts as the (question, answer) pairs scores are kept by: an empty question marks a plain-text
    document (``ChatFormat.encode``: no template, every token after the first scored)."""
    return [("", d) for d in docs]


def _privleak_texts(bench: MuseBenchmark, fmt: ChatFormat) -> dict[str, list[str]]:
    """The PrivLeak forget (members) and holdout (non-members) texts, each checked to fit the length limit."""
    texts = {}
    for name in ("forget", "holdout"):
        corpus = bench.texts(f"privleak_{name}")
        for i, doc in enumerate(corpus.docs):
            try:
                fmt.encode_scored("", doc)
            except ValueError as exc:
                raise DataError(corpus.source, None, str(exc), row=i + 1) from None
        texts[name] = list(corpus.docs)
    return texts


def privleak_aucs(model, bench: MuseBenchmark, fmt: ChatFormat, scores: ModelScores | None = None,
                  batch_size: int = 16, k: float = DEFAULT_K) -> tuple[dict[str, float], dict[str, dict], ModelScores]:
    """MIA AUCs of forget (members) vs holdout (non-members) PrivLeak texts, from the texts' token
    scores (scored once, kept in ``scores``): ``(auc per attack, per-attack scores per set, scores)``.
    PrivLeak reads the ``min_k`` AUC (Min-K%, k = 40% in MUSE)."""
    texts = _privleak_texts(bench, fmt)
    scores = scores if scores is not None else ModelScores.empty(fmt)
    per_set = {name: mia_scores(scores.ensure(model, fmt, document_pairs(docs), batch_size), docs, k)
               for name, docs in texts.items()}
    return mia_report(per_set["forget"], per_set["holdout"]), per_set, scores


def _shots(bench: MuseBenchmark, role: str) -> list[tuple[str, str]]:
    return [(e.question, e.answer) for e in bench.qa(role)] if bench.has(role) else []


def evaluate_muse(model, tokenizer, bench: MuseBenchmark, fmt: ChatFormat | None = None, *,
                  retain_auc: float | None = None, label: str = "model", batch_size: int = 16,
                  verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
                  knowmem_max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS, k: float = DEFAULT_K,
                  scores: ModelScores | None = None) -> dict[str, Any]:
    """MUSE's memorisation and privacy numbers of one model (Shi et al. 2024, arXiv 2407.06460).

    ``verbmem_forget``: VerbMem on verbmem/forget; ``knowmem_forget`` / ``knowmem_retain``: KnowMem
    on the forget / retain QA (few-shot prompts from the ``*_icl`` splits when there are);
    ``privleak``: (AUC_u - AUC_r) / AUC_r x 100 in MUSE's orientation (``mia.privleak``) from the
    Min-K% 40 AUC of privleak/forget vs privleak/holdout, against ``retain_auc`` (the retain model's
    AUC, :func:`privleak_aucs`); without it ``privleak`` is null and ``note`` says why. ``scores``
    (this model's, if kept) spare scoring texts twice. The result is ``muse/<label>.json``.
    """
    bench.require(EVAL_ROLES, "MUSE evaluation")
    start = time.perf_counter()
    fmt = fmt or ChatFormat(tokenizer, system_prompt=None)
    auc, mia, scores = privleak_aucs(model, bench, fmt, scores, batch_size, k)
    vm = bench.verbmem()
    verb = verbmem(model, tokenizer, vm.prompts, vm.continuations, verbmem_max_new_tokens, batch_size,
                   as_document=True)
    know, shots = {}, {}
    for side in ("forget", "retain"):
        qa = bench.qa(f"knowmem_{side}")
        questions, answers = [e.question for e in qa], [e.answer for e in qa]
        shots[side] = _shots(bench, f"knowmem_{side}_icl")
        generations = knowmem_answers(model, tokenizer, questions, shots[side], knowmem_max_new_tokens, batch_size)
        know[side] = {**knowmem_scores(generations, answers), "question": questions, "answer": answers,
                      "generation": generations}
    leak, note = None, None
    if retain_auc is None:
        note = PRIVLEAK_NEEDS_RETAIN
    else:
        try:
            leak = privleak(auc["min_k"], retain_auc)
        except ValueError as exc:  # the retain model's AUC is 1: no reference to compare with
            note = f"PrivLeak undefined: {exc}"
    return {
        "model": label, "benchmark": bench.source,
        "verbmem_forget": verb["verbmem"], "knowmem_forget": know["forget"]["knowmem"],
        "knowmem_retain": know["retain"]["knowmem"],
        "privleak": leak, "privleak_auc": auc["min_k"], "privleak_auc_retain": retain_auc, "mia_auc": auc,
        "k": k, "note": note,
        "n": {"verbmem": len(vm), "knowmem_forget": len(know["forget"]["answer"]),
              "knowmem_retain": len(know["retain"]["answer"]), "privleak_forget": len(mia["forget"]["min_k"]),
              "privleak_holdout": len(mia["holdout"]["min_k"])},
        "settings": {"verbmem_max_new_tokens": verbmem_max_new_tokens,
                     "knowmem_max_new_tokens": knowmem_max_new_tokens,
                     "knowmem_shots": {side: len(s) for side, s in shots.items()}},
        "per_sample": {
            "verbmem": {"continuation": vm.continuations, "generation": verb["generation"],
                        "rouge_f1": verb["per_sample"]},
            **{f"knowmem_{side}": {"question": r["question"], "answer": r["answer"], "generation": r["generation"],
                                   "rouge_recall": r["per_sample"]} for side, r in know.items()},
            "privleak": {"forget_min_k": mia["forget"]["min_k"], "holdout_min_k": mia["holdout"]["min_k"]},
        },
        "seconds": round(time.perf_counter() - start, 3),
    }


def muse_row(result: Mapping[str, Any]) -> dict[str, float | None]:
    """Flat numbers for tables and the run registry: ``MUSE_ROW_KEYS``."""
    return {key: result.get(key) for key in MUSE_ROW_KEYS}


def save_muse(result: Mapping[str, Any], out: str | Path, label: str, model: str | None = None) -> Path:
    """Write ``out/muse/<label>.json`` (beside an evaluation's ``eval/``) and record it in the run registry."""
    run = RunDir(out, writer=processes().is_main_process)  # one process writes, under accelerate launch
    path = run.write_json(f"muse/{safe_name(label, '--label')}.json", result)
    run.record_result(path, "muse", model=model, metrics={"models": {label: muse_row(result)}})
    return path


def retain_model_auc(retain_model: str | Path, bench: MuseBenchmark, *, dtype: str = "float32",
                     max_length: int = 512, batch_size: int = 16, k: float = DEFAULT_K,
                     trust_remote_code: bool = False) -> float:
    """The retain model's Min-K% AUC on the PrivLeak texts (what PrivLeak compares with); the model
    is loaded, scores the texts, and is let go."""
    tokenizer = load_tokenizer(str(retain_model), trust_remote_code=trust_remote_code)
    model = load_model(str(retain_model), dtype=dtype, device=processes().device, trust_remote_code=trust_remote_code)
    fmt = ChatFormat(tokenizer, system_prompt=None, max_length=max_length)
    auc, _, _ = privleak_aucs(model, bench, fmt, batch_size=batch_size, k=k)
    return auc["min_k"]


def evaluate_muse_model(model: str | Path, muse: str | Path | MuseBenchmark, out: str | Path | None = None, *,
                        label: str = "model", retain_model: str | Path | None = None,
                        retain_auc: float | None = None, dtype: str = "float32", max_length: int = 512,
                        batch_size: int = 16, verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
                        knowmem_max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
                        trust_remote_code: bool = False) -> dict[str, Any]:
    """:func:`evaluate_muse` of a saved model on a MUSE benchmark (directory or hub id); with
    ``retain_model`` (or its ``retain_auc``) PrivLeak too. With ``out``, writes ``out/muse/<label>.json``.
    Bad input (a missing split, a bad row, a mistyped model path) fails before the model is loaded."""
    label = safe_name(label, "--label")
    bench = muse if isinstance(muse, MuseBenchmark) else load_muse(muse)
    bench.require(EVAL_ROLES, "MUSE evaluation")
    bench.read_all(EVAL_ROLES + EVAL_OPTIONAL_ROLES)
    check_model_spec(str(model))
    if retain_model is not None:
        check_model_spec(str(retain_model))
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise RunError(f"{out} is a file, not a directory: give --out a directory")
    if retain_model is not None and retain_auc is None:
        retain_auc = retain_model_auc(retain_model, bench, dtype=dtype, max_length=max_length, batch_size=batch_size,
                                      trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(str(model), trust_remote_code=trust_remote_code)
    net = load_model(str(model), dtype=dtype, device=processes().device, trust_remote_code=trust_remote_code)
    result = evaluate_muse(net, tokenizer, bench, ChatFormat(tokenizer, system_prompt=None, max_length=max_length),
                           retain_auc=retain_auc, label=label, batch_size=batch_size,
                           verbmem_max_new_tokens=verbmem_max_new_tokens,
                           knowmem_max_new_tokens=knowmem_max_new_tokens)
    if retain_model is not None:
        result["retain_model"] = str(retain_model)
    if out is not None:
        save_muse(result, out, label, model=str(model))
    return result
