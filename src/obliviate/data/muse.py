"""MUSE-layout benchmarks: forget / retain / holdout corpora, KnowMem QA, VerbMem prompts, PrivLeak texts.

Shi et al., "MUSE: Machine Unlearning Six-Way Evaluation for Language Models", 2024, arXiv 2407.06460.
The hub datasets ``muse-bench/MUSE-News`` and ``muse-bench/MUSE-Books`` are split into subsets
(``raw``, ``verbmem``, ``knowmem``, ``privleak``, ``scal``, ``sust``, ``train``), each with named splits;
a local MUSE benchmark is a directory with the same subsets as folders and one file per split:

    DIR/
      raw/forget.jsonl          {"text": ...} per document: the forget corpus (what is unlearned)
      raw/retain.jsonl          {"text": ...}: the retain corpus (the hub's retain1 is read when there is no
                                retain; raw/retain2 is optional: more retain data, as MUSE-News has)
      raw/holdout.jsonl         {"text": ...}: never trained on (optional)
      verbmem/forget.jsonl      {"prompt": ..., "gt": ...}: the start of a forget text and its true continuation
      knowmem/forget_qa.jsonl   {"question": ..., "answer": ...}: questions about the forget corpus
      knowmem/retain_qa.jsonl   questions about the retain corpus (MUSE-Books names it retain2_qa)
      knowmem/forget_qa_icl.jsonl, knowmem/retain_qa_icl.jsonl
                                optional few-shot examples put before every KnowMem question
      privleak/forget.jsonl     {"text": ...}: PrivLeak members (forget texts)
      privleak/holdout.jsonl    {"text": ...}: PrivLeak non-members (never trained on)
      muse.json                 optional: name, seed and generator options (``obliviate synth-muse`` writes it)

A split file is ``.jsonl``, ``.json`` (a list of rows, as the MUSE authors' files), ``.parquet`` (as the
hub's) or ``.csv``; a text split may also be a ``.txt`` file with one document per line. Evaluation
(``evaluation.muse``) needs verbmem, both knowmem QA sets and both privleak sets; unlearning and the
``obliviate bench`` MUSE runs need raw forget and retain. The hub's ``scal`` and ``sust`` subsets are not
read: the bench makes its nested (scalability) and disjoint (sustainability) forget sets from raw/forget.

A hub id is read when the hub is reachable, the same splits from its ``SUBSET/SPLIT-*.parquet`` files,
each fetched on first use. :func:`generate_muse` makes a small synthetic benchmark of fictitious people
(seeded, offline) in this layout.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import huggingface_hub  # module attributes, looked up per call (tests replace them)

from obliviate.data.layout import prepare_benchmark_directory, sha256_bytes
from obliviate.data.qa import DataError, QADataset, QAExample, load_qa_file, raw_rows, read_json_file
from obliviate.data.specs import hub_unreachable, looks_like_path, missing_path_reason
from obliviate.data.synthetic import ATTRIBUTES, FULL_NAMES, Attribute
from obliviate.data.text import TextCorpus, load_text_corpus
from obliviate.options import check_fields, options_from_dict
from obliviate.runs import atomic_write_json, atomic_write_text

MANIFEST = "muse.json"
MANIFEST_FORMAT = "obliviate-muse/1"
TEXT, QA, VERBMEM = "text", "qa", "verbmem"
ROW_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

# role -> (subset, split names in the order they are looked for, kind of rows)
ROLES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "forget": ("raw", ("forget",), TEXT),
    "retain": ("raw", ("retain", "retain1"), TEXT),
    "retain2": ("raw", ("retain2",), TEXT),
    "holdout": ("raw", ("holdout",), TEXT),
    "verbmem": ("verbmem", ("forget",), VERBMEM),
    "knowmem_forget": ("knowmem", ("forget_qa",), QA),
    "knowmem_retain": ("knowmem", ("retain_qa", "retain2_qa"), QA),
    "knowmem_forget_icl": ("knowmem", ("forget_qa_icl",), QA),
    "knowmem_retain_icl": ("knowmem", ("retain_qa_icl", "retain2_qa_icl"), QA),
    "privleak_forget": ("privleak", ("forget",), TEXT),
    "privleak_holdout": ("privleak", ("holdout",), TEXT),
}
EVAL_ROLES = ("verbmem", "knowmem_forget", "knowmem_retain", "privleak_forget", "privleak_holdout")
EVAL_OPTIONAL_ROLES = ("knowmem_forget_icl", "knowmem_retain_icl")
TRAIN_ROLES = ("forget", "retain")
LAYOUT_HINT = ("a MUSE benchmark holds raw/, verbmem/, knowmem/ and privleak/ with one file per split "
               "(docs/metrics.md; `obliviate synth-muse --out DIR` writes an example)")
_HUB_SHARD = re.compile(r"^(?P<subset>[^/]+)/(?P<split>[A-Za-z0-9_]+)-\d+-of-\d+\.parquet$")


def expected_file(role: str) -> str:
    """Where a role's split lives in a local MUSE directory, for messages: ``knowmem/forget_qa.jsonl``."""
    subset, names, _ = ROLES[role]
    return f"{subset}/{names[0]}.jsonl"



@dataclass
class VerbMemSet:
    """VerbMem pairs: each prompt is the start of a forget text, each continuation what follows it."""

    prompts: list[str]
    continuations: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class MuseBenchmark:
    """Roles -> split files of one MUSE benchmark; rows are read on first use and kept."""

    name: str
    source: str  # a directory or a hub id
    files: dict[str, list[str]]  # role -> local paths, or the hub's file names (fetched on first use)
    hub: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # seed, config ... from muse.json
    _rows: dict[str, Any] = field(default_factory=dict, repr=False)
    _paths: dict[str, list[Path]] = field(default_factory=dict, repr=False)

    def has(self, role: str) -> bool:
        _check_role(role)
        return role in self.files

    def require(self, roles: Sequence[str], purpose: str) -> None:
        """A :class:`DataError` naming the first role ``purpose`` needs that this benchmark lacks."""
        for role in roles:
            if not self.has(role):
                subset, names, _ = ROLES[role]
                where = (f"no {subset}/{names[0]}-*.parquet in the hub dataset" if self.hub else
                         f"no {expected_file(role)} (or .json, .parquet, .csv"
                         f"{', .txt' if ROLES[role][2] == TEXT else ''})")
                raise DataError(self.source, None, f"{purpose} needs the '{subset}' split "
                                f"'{' or '.join(names)}', but there is {where}; {LAYOUT_HINT}")

    def paths(self, role: str) -> list[Path]:
        """The role's files on disk (a hub file is downloaded on first use)."""
        self.require([role], f"role '{role}'")
        if role not in self._paths:
            self._paths[role] = [self._fetch(f) for f in self.files[role]] if self.hub else \
                [Path(f) for f in self.files[role]]
        return self._paths[role]

    def _fetch(self, name: str) -> Path:
        try:
            return Path(huggingface_hub.hf_hub_download(self.source, name, repo_type="dataset"))
        except Exception as exc:  # network and auth errors
            raise DataError(self.source, None, f"could not fetch {name} from the hub ({type(exc).__name__}: "
                            f"{exc}); download the dataset and give its local copy ({LAYOUT_HINT})") from None

    def texts(self, role: str) -> TextCorpus:
        """A text split (raw/*, privleak/*) as documents."""
        return self._load(role, TEXT)

    def qa(self, role: str) -> QADataset:
        """A QA split (knowmem/*)."""
        return self._load(role, QA)

    def verbmem(self) -> VerbMemSet:
        return self._load("verbmem", VERBMEM)

    def read_all(self, roles: Sequence[str]) -> None:
        """Read every role of ``roles`` this benchmark has, so that a bad row fails before model work."""
        for role in roles:
            if self.has(role):
                self._load(role, ROLES[role][2])

    def _load(self, role: str, kind: str) -> Any:
        if ROLES[role][2] != kind:
            raise ValueError(f"role '{role}' holds {ROLES[role][2]} rows, not {kind}")
        if role not in self._rows:
            self._rows[role] = _read(self.paths(role), kind, self._label(role))
        return self._rows[role]

    def _label(self, role: str) -> str:
        subset, names, _ = ROLES[role]
        if self.hub:
            return f"{self.source}:{subset}/{names[0]}"
        files = self.files[role]
        return files[0] if len(files) == 1 else f"{self.source}:{subset}"

    def describe(self) -> dict[str, Any]:
        """What a run records about its data: name, source and each role's files (nothing loaded)."""
        return {"name": self.name, "source": self.source, "roles": {r: list(f) for r, f in self.files.items()}}


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown MUSE role '{role}' (roles: {', '.join(ROLES)})")


# --------------------------------------------------------------------------------------------
# Loading


def load_muse(spec: str | Path) -> MuseBenchmark:
    """Open a MUSE benchmark: a directory in the layout of the module doc, or a hub id
    (``muse-bench/MUSE-News``) when the hub is reachable. Splits are read on first use."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_dir(path)
    if path.exists():
        raise DataError(text, None, f"a MUSE benchmark is a directory, not a file; {LAYOUT_HINT}")
    if looks_like_path(text) or text.count("/") != 1:
        raise DataError(text, None, f"not found ({missing_path_reason(text)}): give a MUSE-layout directory or "
                        "a hub id such as muse-bench/MUSE-News")
    return _from_hub(text)


def _split_file(directory: Path, names: Sequence[str], kind: str) -> Path | None:
    suffixes = ROW_SUFFIXES + ((".txt",) if kind == TEXT else ())
    for name in names:
        for suffix in suffixes:
            candidate = directory / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _from_dir(directory: Path) -> MuseBenchmark:
    files = {}
    for role, (subset, names, kind) in ROLES.items():
        found = _split_file(directory / subset, names, kind)
        if found is not None:
            files[role] = [str(found)]
    if not files:
        raise DataError(str(directory), None, "not a MUSE-layout directory: no split file in raw/, verbmem/, "
                        f"knowmem/ or privleak/ (a TOFU or synthetic benchmark goes to --benchmark); {LAYOUT_HINT}")
    info = _read_manifest(directory)
    return MuseBenchmark(name=str(info.get("name") or directory.name), source=str(directory), files=files,
                         info={k: info[k] for k in ("seed", "config", "format") if k in info})


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        return {}
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise DataError(str(path), None, f"must be a JSON object (name, seed, config), got {type(data).__name__}")
    return data


def _from_hub(repo_id: str) -> MuseBenchmark:
    unreachable = hub_unreachable()
    if unreachable:
        raise DataError(repo_id, None, f"a hub dataset, but the hub is not reachable ({unreachable}); download it "
                        f"and give a local directory in the MUSE layout instead: {LAYOUT_HINT}")
    try:
        listed = huggingface_hub.list_repo_files(repo_id, repo_type="dataset")
    except Exception as exc:  # network, auth, no such dataset
        raise DataError(repo_id, None, f"could not list the hub dataset ({type(exc).__name__}: {exc}); give a "
                        f"local directory in the MUSE layout instead: {LAYOUT_HINT}") from None
    shards: dict[tuple[str, str], list[str]] = {}
    for name in listed:
        match = _HUB_SHARD.match(name)
        if match:
            shards.setdefault((match["subset"], match["split"]), []).append(name)
    files = {}
    for role, (subset, names, _) in ROLES.items():
        found = next((sorted(shards[(subset, n)]) for n in names if (subset, n) in shards), None)
        if found:
            files[role] = found
    if not files:
        raise DataError(repo_id, None, "no MUSE subsets (raw/, verbmem/, knowmem/, privleak/ Parquet shards) in "
                        "this hub dataset")
    return MuseBenchmark(name=repo_id.split("/")[1], source=repo_id, files=files, hub=True)


def _read(paths: list[Path], kind: str, label: str) -> Any:
    if kind == QA:
        parts = [load_qa_file(p) for p in paths]
        return QADataset([e for p in parts for e in p.examples], label)
    if kind == TEXT:
        docs = [d for p in paths for d in _text_rows(p)]
        return TextCorpus(docs, label)
    prompts, continuations = [], []
    for p in paths:
        for prompt, gt in _verbmem_rows(p):
            prompts.append(prompt)
            continuations.append(gt)
    return VerbMemSet(prompts, continuations, label)


def _field(row: Any, key: str, path: Path, where: tuple[int | None, int | None]) -> str:
    line, row_no = where
    if not isinstance(row, dict):
        raise DataError(str(path), line, f"row must be an object with '{key}', got {type(row).__name__}", row=row_no)
    value = row.get(key)
    if value is None:
        raise DataError(str(path), line, f"missing key '{key}'", row=row_no)
    if not isinstance(value, str):
        raise DataError(str(path), line, f"'{key}' must be text, got {type(value).__name__}", row=row_no)
    if not value.strip():
        raise DataError(str(path), line, f"'{key}' is empty", row=row_no)
    return value


def _rows(path: Path):
    if not path.is_file():
        raise DataError(str(path), None, "split file not found")
    any_row = False
    for where, raw in raw_rows(path):
        if isinstance(raw, DataError):
            raise raw
        any_row = True
        yield where, raw
    if not any_row:
        raise DataError(str(path), None, "no rows (the file is empty)")


def _text_rows(path: Path) -> list[str]:
    if path.suffix.lower() == ".txt":
        return load_text_corpus(path, mode="line").docs
    return [_field(raw, "text", path, where).strip() for where, raw in _rows(path)]


def _verbmem_rows(path: Path) -> list[tuple[str, str]]:
    # The prompt is kept exactly (its trailing space or newline is where the continuation starts).
    return [(_field(raw, "prompt", path, where), _field(raw, "gt", path, where)) for where, raw in _rows(path)]


# --------------------------------------------------------------------------------------------
# Writing


def write_muse_dir(splits: Mapping[str, Sequence[Any]], directory: str | Path, *, name: str,
                   seed: int | None = None, config: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write one JSON Lines file per role (``SUBSET/SPLIT.jsonl``) and then ``muse.json`` (last, so a
    crash leaves no manifest). Rows: texts for text roles, (prompt, continuation) for ``verbmem``,
    :class:`QAExample` for QA roles. A non-empty directory is refused unless ``overwrite=True``, and
    then only one holding a previous ``muse.json`` (its listed files are replaced, others left)."""
    directory = Path(directory)
    for role, rows in splits.items():
        _check_role(role)
        if not rows:
            raise ValueError(f"split for role '{role}' is empty")
    prepare_benchmark_directory(directory, overwrite=overwrite, manifest=MANIFEST, what="MUSE benchmark",
                                listed_files=lambda old: [e["file"] for e in old["files"].values()])
    entries = {}
    for role, rows in splits.items():
        subset, names, kind = ROLES[role]
        if kind == TEXT:
            records = [{"text": t} for t in rows]
        elif kind == VERBMEM:
            records = [{"prompt": p, "gt": c} for p, c in rows]
        else:
            records = [e.to_json() for e in rows]
        rel = f"{subset}/{names[0]}.jsonl"
        file = atomic_write_text(directory / rel, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        entries[role] = {"file": rel, "rows": len(rows), "sha256": sha256_bytes(file.read_bytes())}
    atomic_write_json(directory / MANIFEST, {"format": MANIFEST_FORMAT, "name": name, "seed": seed,
                                             "config": config, "files": entries})
    return directory


# --------------------------------------------------------------------------------------------
# A synthetic MUSE benchmark


@dataclass(frozen=True)
class MuseSyntheticConfig:
    """Sizes of the synthetic MUSE benchmark: one document per fictitious person."""

    n_forget: int = 8  # forget documents
    n_retain: int = 16  # retain documents (MUSE-News has about twice as many retain as forget articles)
    n_holdout: int = 8  # documents never trained on (PrivLeak's non-members)
    facts_per_doc: int = 6  # sentences per document, one fact each
    qa_per_doc: int = 2  # KnowMem questions per forget and retain document
    verbmem_prefix_facts: int = 2  # sentences in a VerbMem prompt; the rest of the document is its continuation
    icl_shots: int = 3  # few-shot examples before each KnowMem question (people in no corpus); 0 for none
    seed: int = 0
    name: str = "synthetic-muse"

    def __post_init__(self) -> None:
        problems = check_fields(self) or _config_problems(self)
        if problems:
            raise ValueError("invalid synthetic MUSE options: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MuseSyntheticConfig":
        return options_from_dict(cls, data, "synthetic MUSE options")


def _config_problems(c: MuseSyntheticConfig) -> list[str]:
    problems = [f"{k} must be at least 1, got {v}" for k, v in
                (("n_forget", c.n_forget), ("n_retain", c.n_retain), ("n_holdout", c.n_holdout),
                 ("qa_per_doc", c.qa_per_doc), ("verbmem_prefix_facts", c.verbmem_prefix_facts)) if v < 1]
    if not 2 <= c.facts_per_doc <= len(ATTRIBUTES):
        problems.append(f"facts_per_doc must be between 2 and {len(ATTRIBUTES)}, got {c.facts_per_doc}")
    if c.qa_per_doc > c.facts_per_doc:
        problems.append(f"qa_per_doc ({c.qa_per_doc}) must not exceed facts_per_doc ({c.facts_per_doc})")
    if c.verbmem_prefix_facts >= c.facts_per_doc:
        problems.append(f"verbmem_prefix_facts ({c.verbmem_prefix_facts}) must be below facts_per_doc "
                        f"({c.facts_per_doc}): the continuation needs a sentence")
    if c.icl_shots < 0:
        problems.append(f"icl_shots must not be negative, got {c.icl_shots}")
    total = c.n_forget + c.n_retain + c.n_holdout + 2 * c.icl_shots
    if total > len(FULL_NAMES):
        problems.append(f"{total} people asked for, but only {len(FULL_NAMES)} names exist")
    return problems


@dataclass
class Person:
    """A fictitious person: their name and facts as (attribute, template index, value)."""

    name: str
    facts: list[tuple[Attribute, int, str]]

    def sentences(self) -> list[str]:
        return [_sentence(a.templates[t].answer.format(name=self.name, value=v)) for a, t, v in self.facts]

    def document(self) -> str:
        return " ".join(self.sentences())

    def qa(self, index: int) -> QAExample:
        """A KnowMem question about fact ``index``; the answer is the fact's value, short as MUSE's are."""
        attr, t, value = self.facts[index]
        return QAExample(attr.templates[t].question.format(name=self.name), value,
                         meta={"person": self.name, "attribute": attr.name})


def _sentence(text: str) -> str:
    # Answer templates reply to a question ("Yes, X won ..."); a document states the fact.
    return text[5].upper() + text[6:] if text.startswith("Yes, ") else text


def _stream(seed: int, purpose: str, index: int | None = None) -> random.Random:
    """An independent, process-stable random stream per purpose and person (string seeds are hashed)."""
    return random.Random(f"obliviate-muse:{seed}:{purpose}:{index}")


def make_people(config: MuseSyntheticConfig, count: int) -> list[Person]:
    taken: set[str] = set()
    people = []
    for i in range(count):
        rng = _stream(config.seed, "person", i)
        name = rng.choice(FULL_NAMES)
        while name in taken:
            name = rng.choice(FULL_NAMES)
        taken.add(name)
        attrs = rng.sample(ATTRIBUTES, config.facts_per_doc)
        people.append(Person(name, [(a, rng.randrange(len(a.templates)), rng.choice(a.values)) for a in attrs]))
    return people


def generate_muse(config: MuseSyntheticConfig | None = None) -> dict[str, list[Any]]:
    """All splits of the synthetic MUSE benchmark, by role (same config, same rows, same order).

    Forget, retain and holdout documents are about disjoint fictitious people; KnowMem asks
    ``qa_per_doc`` of each forget (retain) document's facts; VerbMem prompts with the first
    ``verbmem_prefix_facts`` sentences of each forget document; PrivLeak compares the forget documents
    with the holdout ones; the few-shot examples are about people in no corpus."""
    config = config or MuseSyntheticConfig()
    n_docs = config.n_forget + config.n_retain + config.n_holdout
    people = make_people(config, n_docs + 2 * config.icl_shots)
    forget = people[:config.n_forget]
    retain = people[config.n_forget:config.n_forget + config.n_retain]
    holdout = people[config.n_forget + config.n_retain:n_docs]
    shots = people[n_docs:]

    def questions(group: list[Person], purpose: str) -> list[QAExample]:
        rows = []
        for i, person in enumerate(group):
            picked = sorted(_stream(config.seed, purpose, i).sample(range(len(person.facts)), config.qa_per_doc))
            rows += [person.qa(j) for j in picked]
        return rows

    p = config.verbmem_prefix_facts
    splits: dict[str, list[Any]] = {
        "forget": [x.document() for x in forget],
        "retain": [x.document() for x in retain],
        "holdout": [x.document() for x in holdout],
        "verbmem": [(" ".join(x.sentences()[:p]), " ".join(x.sentences()[p:])) for x in forget],
        "knowmem_forget": questions(forget, "knowmem_forget"),
        "knowmem_retain": questions(retain, "knowmem_retain"),
        "privleak_forget": [x.document() for x in forget],
        "privleak_holdout": [x.document() for x in holdout],
    }
    if config.icl_shots:
        splits["knowmem_forget_icl"] = [x.qa(0) for x in shots[:config.icl_shots]]
        splits["knowmem_retain_icl"] = [x.qa(0) for x in shots[config.icl_shots:]]
    return splits


def write_synthetic_muse(directory: str | Path, config: MuseSyntheticConfig | None = None,
                         overwrite: bool = False) -> Path:
    """Generate the synthetic MUSE benchmark and write it in the MUSE layout; returns the directory."""
    config = config or MuseSyntheticConfig()
    return write_muse_dir(generate_muse(config), directory, name=config.name, seed=config.seed,
                          config=asdict(config), overwrite=overwrite)
