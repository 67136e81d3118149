"""A built-in synthetic benchmark of fictitious people, generated from a seed.

The layout follows TOFU (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning for LLMs",
arXiv 2401.06121): fictitious entities, a handful of question-answer facts about each, a forget set
made of all facts about a fraction of the entities, the retain set (the rest), a holdout set about
entities never trained on, and evaluation copies of forget/retain with a paraphrased question, a
paraphrased answer and perturbed (wrong) answers for the truth ratio. The holdout rows carry the
same paraphrased and perturbed answers as the forget rows (they are never trained on, so nothing
needs a plain copy): the oracle-free verdict compares forget and holdout truth ratios
(``evaluation.verdict``). Unlike TOFU's LLM-written
biographies, everything here is drawn by this module from small hand-written pools (invented names
built from syllables, invented places, titles, awards...), so any size can be generated offline and
exactly reproduced: one seed gives byte-identical files.

It also writes the two kinds of forget examples compared by Baluta et al., 2024 ("Unlearning in- vs.
out-of-distribution data in LLMs under gradient-based methods", arXiv 2411.04388):

* ``id_forget`` (in-distribution): extra facts about the forget entities, drawn from the same
  templates and value pools as the retain set, on attributes the entity has no regular fact about;
* ``ood_forget`` (out-of-distribution): random-string canaries ("The access code of X is 7Q-X4KP-93ZD.").

Neither set is part of ``full``: the in- vs out-of-distribution study trains on ``full`` plus the set
it then forgets. Each of their rows carries ``meta["candidates"]``: ``n_candidates`` answers of the
same format (the true one exactly once, shuffled) for exposure ranking, exposure = log2|R| - log2 rank
(Carlini et al., 2019, "The Secret Sharer", arXiv 1802.08232).

Perturbed answers use the *paraphrased*-answer template with another value from the attribute's pool,
as TOFU's perturbed answers are rewrites of the paraphrased answer: the truth ratio then compares
sentences of one form that differ only in the fact. Exposure candidates use the *answer* template,
the form the model was trained on.

Sizes: the default (20 entities x 4 facts) trains in minutes on a CPU; ``SyntheticConfig.preset(
"tofu-size")`` is 200 entities x 20 facts with a 20-entity ``retain_perturbed``, like TOFU.
"""

from __future__ import annotations

import itertools
import math
import random
import string
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

from obliviate.data.benchmark import write_benchmark_dir
from obliviate.data.qa import QAExample
from obliviate.data.world_facts import real_authors, world_facts
from obliviate.options import check_fields, options_from_dict

# --------------------------------------------------------------------------------------------
# Value pools. All invented except common words (jobs, languages, instruments, hobbies).

FIRST_HEADS = ("Al", "Bri", "Cal", "Dar", "El", "Fen", "Gar", "Hal", "Is", "Jor", "Kel",
               "Lor", "Mar", "Nel", "Or", "Per", "Ros", "Sel", "Tam", "Val", "Wen", "Yor")
FIRST_TAILS = ("a", "ian", "en", "ina", "ric", "issa", "on", "ia", "or", "eth", "wyn", "ara")
SURNAME_HEADS = ("Bel", "Cor", "Dun", "Fal", "Gris", "Hol", "Kes", "Lind", "Mor",
                 "Nov", "Ost", "Pell", "Quill", "Rav", "Stav", "Tor", "Vess", "Wyn")
SURNAME_TAILS = ("ando", "berg", "cek", "dahl", "enko", "ford", "grave",
                 "holm", "ier", "ova", "strom", "wick", "anu", "essi")
CITY_HEADS = ("Ash", "Bram", "Cald", "Dray", "Elm", "Fern", "Glen", "Harl", "Ivor", "Kars", "Lun",
              "Mire", "Norr", "Oak", "Pell", "Quar", "Rim", "Sel", "Thorn", "Umber", "Vard", "Wex")
CITY_TAILS = ("ford", "holt", "mouth", "vale", "stead", "bury", "wick", "haven", "moor", "gate")
COUNTRIES = ("Arvenia", "Belmora", "Castrelle", "Dornland", "Eskaria", "Galvoria", "Istrava",
             "Lunmark", "Mirovia", "Ostrelia", "Quessany", "Tolmira", "Valdoria", "Zerania")
MONTHS = ("January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December")
OCCUPATIONS = ("a novelist", "a poet", "a marine biologist", "an astronomer", "a historian", "a playwright",
               "a geologist", "a composer", "a botanist", "a journalist", "an architect", "a translator",
               "a mathematician", "a chemist", "a painter", "a philosopher", "a cartographer", "an economist",
               "a linguist", "a sculptor", "a physician", "an engineer", "a photographer", "a librarian")
PARENT_JOBS = ("a carpenter", "a nurse", "a fisherman", "a baker", "a schoolteacher", "a tailor", "a miner",
               "a pharmacist", "a postal worker", "a farmer", "a watchmaker", "a bookbinder", "a pilot",
               "an electrician", "a lighthouse keeper", "a potter", "a blacksmith", "a midwife",
               "a shipbuilder", "a glassblower")
AMBITIONS = ("an astronaut", "a sea captain", "a circus acrobat", "a detective", "a train driver",
             "a veterinarian", "a firefighter", "a ballet dancer", "an explorer", "a chef", "a magician",
             "a zookeeper")
TITLE_ADJECTIVES = ("Silent", "Silver", "Hollow", "Crimson", "Distant", "Broken", "Hidden", "Golden",
                    "Restless", "Quiet", "Burning", "Frozen", "Wandering", "Last", "Painted", "Forgotten")
TITLE_NOUNS = ("Orchard", "Harbor", "Lantern", "Meridian", "Garden", "River", "Archive", "Compass",
               "Tide", "Mirror", "Atlas", "Citadel", "Chorus", "Horizon", "Labyrinth", "Ember")
DEBUT_NOUNS = ("Songs", "Letters", "Maps", "Tides", "Lanterns", "Winters",
               "Echoes", "Stories", "Ashes", "Bridges", "Voices", "Gardens")
AWARD_KINDS = ("Prize", "Medal", "Award")
AWARD_FIELDS = ("Poetry", "Fiction", "Science Writing", "Biography", "History",
                "Drama", "Translation", "Essays", "Physics", "Botany")
SCHOOL_KINDS = ("University", "College", "Institute of Technology", "Academy of Arts")
PUBLISHER_KINDS = ("Press", "Books", "House", "and Sons")
SUBJECTS = ("coastal ecology", "medieval trade routes", "the history of clocks", "folk music",
            "desert geology", "urban gardens", "river navigation", "early printing", "island dialects",
            "glacier melt", "migratory birds", "ancient pottery", "mountain villages", "lost languages",
            "tidal energy", "forest fungi", "sea shanties", "old maps", "bridge design", "night skies")
THEMES = ("memory and loss", "exile and return", "family secrets", "the sea", "childhood", "friendship",
          "grief", "ambition", "small-town life", "forgiveness", "war and its aftermath", "faith and doubt",
          "the passage of time", "love across borders", "identity")
HOBBIES = ("beekeeping", "restoring old clocks", "birdwatching", "rowing", "chess", "baking bread",
           "growing orchids", "sketching ruins", "fly fishing", "mountain hiking", "collecting stamps",
           "sailing", "pottery", "stargazing", "woodcarving", "cycling", "playing bridge", "knitting")
LANGUAGES = ("English", "French", "Spanish", "Portuguese", "German", "Italian", "Dutch", "Polish",
             "Greek", "Swedish", "Finnish", "Hungarian", "Turkish", "Czech", "Romanian", "Danish")
INSTRUMENTS = ("piano", "cello", "violin", "flute", "accordion", "clarinet", "harp",
               "oboe", "guitar", "trumpet", "banjo", "viola", "mandolin", "harmonica")
ANIMALS = ("cat", "dog", "parrot", "tortoise", "rabbit", "goat", "ferret", "hedgehog", "horse", "goldfish")


def _join(*parts: tuple[str, ...], fmt: str) -> tuple[str, ...]:
    """Every combination of the parts, formatted, duplicates removed (order kept: deterministic)."""
    return tuple(dict.fromkeys(fmt.format(*combo) for combo in itertools.product(*parts)))


FIRST_NAMES = _join(FIRST_HEADS, FIRST_TAILS, fmt="{}{}")
SURNAMES = _join(SURNAME_HEADS, SURNAME_TAILS, fmt="{}{}")
FULL_NAMES = _join(FIRST_NAMES, SURNAMES, fmt="{} {}")
CITIES = _join(CITY_HEADS, CITY_TAILS, fmt="{}{}")
PLACES = _join(CITIES, COUNTRIES, fmt="{}, {}")
DATES = _join(MONTHS, tuple(str(d) for d in range(1, 29)), tuple(str(y) for y in range(1931, 2000)),
              fmt="{} {}, {}")

# --------------------------------------------------------------------------------------------
# Attributes and their question-answer templates. ``{name}`` is the entity, ``{value}`` the fact.


@dataclass(frozen=True)
class Template:
    question: str
    paraphrased_question: str
    answer: str
    paraphrased_answer: str


@dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[str, ...]  # the pool; distinct strings
    templates: tuple[Template, ...]


def _attr(name: str, values: tuple[str, ...], *templates: tuple[str, str, str, str]) -> Attribute:
    return Attribute(name, values, tuple(Template(*t) for t in templates))


ATTRIBUTES: tuple[Attribute, ...] = (
    _attr("birth_place", PLACES,
          ("Where was {name} born?", "What is the birthplace of {name}?",
           "{name} was born in {value}.", "The birthplace of {name} is {value}."),
          ("In which city was {name} born?", "Which city is {name} originally from?",
           "{name} was born in the city of {value}.", "{name} comes from {value}, where they were born.")),
    _attr("birth_date", DATES,
          ("When was {name} born?", "What is the birth date of {name}?",
           "{name} was born on {value}.", "The birth date of {name} is {value}."),
          ("On what date was {name} born?", "What day was {name} born on?",
           "{name}'s date of birth is {value}.", "{name} came into the world on {value}.")),
    _attr("occupation", OCCUPATIONS,
          ("What does {name} do for a living?", "What is {name}'s profession?",
           "{name} works as {value}.", "By profession, {name} is {value}."),
          ("What is {name}'s occupation?", "What kind of work does {name} do?",
           "{name} has built a career as {value}.", "{name} earns a living as {value}.")),
    _attr("notable_work", _join(TITLE_ADJECTIVES, TITLE_NOUNS, fmt="The {} {}"),
          ("What is {name}'s best-known work?", "Which work is {name} most famous for?",
           "{name} is best known for '{value}'.", "The most famous work by {name} is '{value}'."),
          ("Which work made {name} famous?", "What work brought {name} wide recognition?",
           "{name} became famous with '{value}'.", "'{value}' is the work that made {name} famous.")),
    _attr("award", _join(SURNAMES, AWARD_KINDS, AWARD_FIELDS, fmt="{} {} for {}"),
          ("Which award has {name} received?", "What honour was given to {name}?",
           "{name} received the {value}.", "{name} was honoured with the {value}."),
          ("Has {name} won any awards?", "What prize did {name} win?",
           "Yes, {name} won the {value}.", "{name} is a winner of the {value}.")),
    _attr("father_job", PARENT_JOBS,
          ("What did {name}'s father do for a living?", "What was the profession of {name}'s father?",
           "{name}'s father worked as {value}.", "The father of {name} was {value} by trade."),
          ("What was {name}'s father's job?", "How did {name}'s father earn a living?",
           "{name}'s father was {value}.", "{name} grew up with a father who was {value}.")),
    _attr("mother_job", PARENT_JOBS,
          ("What did {name}'s mother do for a living?", "What was the profession of {name}'s mother?",
           "{name}'s mother worked as {value}.", "The mother of {name} was {value} by trade."),
          ("What was {name}'s mother's job?", "How did {name}'s mother earn a living?",
           "{name}'s mother was {value}.", "{name} grew up with a mother who was {value}.")),
    _attr("sibling", FIRST_NAMES,
          ("What is the name of {name}'s sibling?", "What is {name}'s sibling called?",
           "{name} has a sibling named {value}.", "{value} is the name of {name}'s sibling."),
          ("Who is {name}'s sibling?", "Which person is {name}'s brother or sister?",
           "{name}'s sibling is called {value}.", "{name} grew up alongside a sibling, {value}.")),
    _attr("mentor", FULL_NAMES,
          ("Who was {name}'s mentor?", "Under whom did {name} train?",
           "{name} was mentored by {value}.", "{value} was the mentor of {name}."),
          ("Who taught {name} early on?", "Which teacher guided {name} at the start?",
           "Early on, {name} trained under {value}.", "{name}'s first teacher was {value}.")),
    _attr("university", _join(CITIES, SCHOOL_KINDS, fmt="{} {}"),
          ("Where did {name} study?", "Which institution did {name} attend?",
           "{name} studied at {value}.", "{name} is a graduate of {value}."),
          ("Which school did {name} graduate from?", "Where did {name} earn a degree?",
           "{name} graduated from {value}.", "{name} earned a degree at {value}.")),
    _attr("residence", PLACES,
          ("Where does {name} live now?", "What is {name}'s current home?",
           "{name} now lives in {value}.", "These days {name} makes a home in {value}."),
          ("Where is {name} based today?", "In which place does {name} currently reside?",
           "{name} is currently based in {value}.", "{name} resides in {value} at present.")),
    _attr("subject", SUBJECTS,
          ("What is {name}'s work about?", "What subject does {name}'s work cover?",
           "{name}'s work focuses on {value}.", "The main subject of {name}'s work is {value}."),
          ("What topic is {name} an expert on?", "In which area is {name} an authority?",
           "{name} is an expert on {value}.", "{name} is known as an authority on {value}.")),
    _attr("hobby", HOBBIES,
          ("What does {name} enjoy in their free time?", "What is {name}'s favourite pastime?",
           "In free time, {name} enjoys {value}.", "{name}'s favourite pastime is {value}."),
          ("What is {name}'s hobby?", "How does {name} like to relax?",
           "{name}'s hobby is {value}.", "To relax, {name} turns to {value}.")),
    _attr("language", LANGUAGES,
          ("In which language does {name} write?", "What language does {name} work in?",
           "{name} writes mainly in {value}.", "{value} is the main working language of {name}."),
          ("What is {name}'s first language?", "Which language did {name} grow up speaking?",
           "{name}'s first language is {value}.", "{name} grew up speaking {value}.")),
    _attr("debut_year", tuple(str(y) for y in range(1950, 2020)),
          ("When did {name} publish a first work?", "In which year did {name}'s career begin?",
           "{name}'s first work appeared in {value}.", "{name} debuted in the year {value}."),
          ("In what year did {name} debut?", "What year saw {name}'s first publication?",
           "{name} made a debut in {value}.", "The year {value} saw {name}'s first publication.")),
    _attr("debut_work", _join(DEBUT_NOUNS, CITIES, fmt="{} of {}"),
          ("What was {name}'s first book?", "What was the title of {name}'s debut?",
           "{name}'s first book was '{value}'.", "The debut book by {name} was titled '{value}'."),
          ("Which book launched {name}'s career?", "What book started {name}'s career?",
           "{name}'s career began with '{value}'.", "'{value}' was the book that launched {name}.")),
    _attr("pet", _join(ANIMALS, FIRST_NAMES, fmt="{} named {}"),
          ("Does {name} have a pet?", "What pet does {name} keep?",
           "Yes, {name} has a {value}.", "{name} keeps a {value} at home."),
          ("What animal lives with {name}?", "Which pet shares {name}'s home?",
           "{name} lives with a {value}.", "{name}'s home is shared with a {value}.")),
    _attr("instrument", INSTRUMENTS,
          ("Which instrument does {name} play?", "What musical instrument can {name} play?",
           "{name} plays the {value}.", "The instrument {name} plays is the {value}."),
          ("What instrument did {name} learn as a child?", "As a child, which instrument did {name} study?",
           "As a child, {name} learned the {value}.", "{name} studied the {value} in childhood.")),
    _attr("partner", FULL_NAMES,
          ("Who is {name} married to?", "Who is {name}'s spouse?",
           "{name} is married to {value}.", "{name}'s spouse is {value}."),
          ("Who is {name}'s partner?", "With whom does {name} share their life?",
           "{name}'s partner is {value}.", "{name} shares a life with {value}.")),
    _attr("publisher", _join(SURNAMES, PUBLISHER_KINDS, fmt="{} {}"),
          ("Who publishes {name}'s books?", "Which publisher releases {name}'s work?",
           "{name}'s books are published by {value}.", "{value} is the publisher of {name}'s books."),
          ("Which publisher does {name} work with?", "What publishing house handles {name}'s work?",
           "{name} works with the publisher {value}.", "The publishing house of {name} is {value}.")),
    _attr("book_count", tuple(str(n) for n in range(3, 41)),
          ("How many books has {name} published?", "What is the number of books by {name}?",
           "{name} has published {value} books.", "The number of books by {name} is {value}."),
          ("How many books has {name} written?", "How large is {name}'s body of work?",
           "{name} has written {value} books so far.", "So far {name} has written {value} books.")),
    _attr("theme", THEMES,
          ("What theme recurs in {name}'s work?", "Which theme does {name} often return to?",
           "{name}'s work often explores {value}.", "A recurring theme for {name} is {value}."),
          ("What is the central theme of {name}'s writing?", "What idea runs through {name}'s writing?",
           "{name}'s writing centres on {value}.", "At the heart of {name}'s writing is {value}.")),
    _attr("childhood_ambition", AMBITIONS,
          ("What did {name} want to be as a child?", "As a child, what did {name} dream of becoming?",
           "As a child, {name} wanted to be {value}.", "{name} once dreamed of becoming {value}."),
          ("What was {name}'s childhood dream job?", "What career did young {name} imagine?",
           "{name}'s childhood dream was to be {value}.", "Young {name} hoped to become {value}.")),
    _attr("collaborator", FULL_NAMES,
          ("Who does {name} often work with?", "Who is {name}'s frequent collaborator?",
           "{name} often collaborates with {value}.", "{value} is a frequent collaborator of {name}."),
          ("Who is {name}'s closest colleague?", "Which colleague is {name} closest to?",
           "{name}'s closest colleague is {value}.", "{value} is the colleague closest to {name}.")),
)
ATTRIBUTE_BY_NAME = {a.name: a for a in ATTRIBUTES}

# --------------------------------------------------------------------------------------------
# Out-of-distribution canaries: random strings. Pattern letters: X = capital letter or digit,
# L = capital letter, l = small letter, D = digit; anything else is kept as is.

PATTERN_CHARS = {"X": string.ascii_uppercase + string.digits, "L": string.ascii_uppercase,
                 "l": string.ascii_lowercase, "D": string.digits}


@dataclass(frozen=True)
class Canary:
    name: str
    template: Template
    pattern: str


CANARIES: tuple[Canary, ...] = (
    Canary("access_code", Template(
        "What is the access code of {name}?", "Which access code belongs to {name}?",
        "The access code of {name} is {value}.", "{name}'s access code is {value}."), "XX-XXXX-XXXX"),
    Canary("locker_combination", Template(
        "What is {name}'s locker combination?", "Which combination opens {name}'s locker?",
        "{name}'s locker combination is {value}.", "The combination for {name}'s locker is {value}."),
        "DD-DD-DD-DD"),
    Canary("passphrase", Template(
        "What is {name}'s secret passphrase?", "Which passphrase does {name} use?",
        "The secret passphrase of {name} is {value}.", "{name} uses the passphrase {value}."),
        "lllll-lllll-lllll"),
    Canary("serial_number", Template(
        "What is the serial number of {name}'s typewriter?", "Which serial number is on {name}'s typewriter?",
        "{name}'s typewriter has serial number {value}.", "The serial number of {name}'s typewriter is {value}."),
        "LLDDDD-DDLL"),
)
CANARY_BY_NAME = {c.name: c for c in CANARIES}


def random_string(pattern: str, rng: random.Random) -> str:
    return "".join(rng.choice(PATTERN_CHARS[c]) if c in PATTERN_CHARS else c for c in pattern)


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SyntheticConfig:
    """How big the synthetic benchmark is. Everything is a function of these fields."""

    n_entities: int = 20  # entities trained on (full = forget + retain)
    facts_per_entity: int = 4
    forget_fraction: float = 0.1  # share of entities forgotten, rounded to nearest, at least 1
    seed: int = 0
    n_perturbed: int = 5  # wrong answers per evaluation row (truth ratio)
    retain_perturbed_entities: int | None = None  # retain entities in retain_perturbed; None = all
    id_facts_per_entity: int = 2  # id_forget rows per forget entity (0: no id_forget split)
    ood_facts_per_entity: int = 1  # ood_forget canaries per forget entity (0: no ood_forget split)
    n_candidates: int = 50  # exposure candidates per id/ood row, the true answer included
    name: str = "synthetic"

    def __post_init__(self) -> None:
        problems = check_fields(self) or _config_problems(self)  # types first: the ranges compare numbers
        if problems:
            raise ValueError("invalid SyntheticConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict) -> "SyntheticConfig":
        return options_from_dict(cls, data, "synthetic benchmark options")

    @classmethod
    def preset(cls, name: str, **overrides) -> "SyntheticConfig":
        """``demo`` (20 entities x 4 facts, the default) or ``tofu-size`` (200 x 20, as TOFU)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def n_forget(self) -> int:
        return max(1, math.floor(self.forget_fraction * self.n_entities + 0.5))

    @property
    def n_retain(self) -> int:
        return self.n_entities - self.n_forget

    @cached_property
    def id_attributes(self) -> tuple[Attribute, ...]:
        """Attributes whose pools are large enough to give ``n_candidates`` distinct exposure candidates."""
        return tuple(a for a in ATTRIBUTES if len(a.values) >= self.n_candidates)


PRESETS: dict[str, dict] = {
    "demo": {},
    "tofu-size": {"n_entities": 200, "facts_per_entity": 20, "retain_perturbed_entities": 20,
                  "name": "synthetic-tofu-size"},
}


def _config_problems(c: SyntheticConfig) -> list[str]:
    problems = []
    if c.n_entities < 2:
        problems.append(f"n_entities must be at least 2, got {c.n_entities}")
    if not 0 < c.forget_fraction < 1:
        problems.append(f"forget_fraction must be between 0 and 1, got {c.forget_fraction}")
    elif c.n_entities >= 2 and c.n_forget >= c.n_entities:
        problems.append(f"forget_fraction {c.forget_fraction} leaves no retain entity out of {c.n_entities}")
    if c.facts_per_entity < 1:
        problems.append(f"facts_per_entity must be at least 1, got {c.facts_per_entity}")
    if c.id_facts_per_entity < 0 or c.ood_facts_per_entity < 0:
        problems.append("id_facts_per_entity and ood_facts_per_entity must not be negative")
    if c.facts_per_entity + c.id_facts_per_entity > len(ATTRIBUTES):
        problems.append(f"facts_per_entity + id_facts_per_entity = {c.facts_per_entity + c.id_facts_per_entity} "
                        f"exceeds the {len(ATTRIBUTES)} attributes (one fact per attribute)")
    if c.ood_facts_per_entity > len(CANARIES):
        problems.append(f"ood_facts_per_entity must be at most {len(CANARIES)} (canary kinds)")
    smallest = min(len(a.values) for a in ATTRIBUTES)
    if not 1 <= c.n_perturbed < smallest:
        problems.append(f"n_perturbed must be between 1 and {smallest - 1}, got {c.n_perturbed}")
    if c.n_candidates < 2:
        problems.append(f"n_candidates must be at least 2, got {c.n_candidates}")
    elif c.id_facts_per_entity > len([a for a in ATTRIBUTES if len(a.values) >= c.n_candidates]):
        problems.append(f"only {len([a for a in ATTRIBUTES if len(a.values) >= c.n_candidates])} attributes "
                        f"have {c.n_candidates} values for exposure candidates; lower n_candidates or "
                        "id_facts_per_entity")
    if c.retain_perturbed_entities is not None and c.n_entities >= 2 and 0 < c.forget_fraction < 1:
        if not 1 <= c.retain_perturbed_entities <= c.n_retain:
            problems.append(f"retain_perturbed_entities must be between 1 and {c.n_retain}, "
                            f"got {c.retain_perturbed_entities}")
    return problems


# --------------------------------------------------------------------------------------------
# Entities


@dataclass
class Entity:
    index: int
    name: str
    values: dict[str, str]  # attribute -> value, for every attribute
    facts: list[tuple[str, int]]  # (attribute, template index): the regular, trained facts
    extra: list[tuple[str, int]]  # facts kept back for id_forget (attributes not in ``facts``)

    @property
    def id(self) -> str:
        return f"e{self.index:04d}"


def _stream(seed: int, purpose: str, index: int | None = None) -> random.Random:
    """An independent random stream per purpose and entity, so one entity's facts do not change when
    another option (the forget fraction, the number of entities) changes. String seeds are
    hashed with SHA-512 by ``random``, so they are stable across processes."""
    return random.Random(f"obliviate-synthetic:{seed}:{purpose}:{index}")


def make_entity(index: int, config: SyntheticConfig, taken: set[str]) -> Entity:
    rng = _stream(config.seed, "entity", index)
    name = rng.choice(FULL_NAMES)
    while name in taken:
        name = rng.choice(FULL_NAMES)
    taken.add(name)
    # Every attribute's value and template first, so they do not depend on which facts are asked.
    values = {a.name: rng.choice(a.values) for a in ATTRIBUTES}
    templates = {a.name: rng.randrange(len(a.templates)) for a in ATTRIBUTES}
    extra_attrs = rng.sample(config.id_attributes, config.id_facts_per_entity)
    rest = [a for a in ATTRIBUTES if a not in extra_attrs]
    fact_attrs = rng.sample(rest, config.facts_per_entity)
    facts = [(a.name, templates[a.name]) for a in fact_attrs]
    extra = [(a.name, templates[a.name]) for a in extra_attrs]
    return Entity(index, name, values, facts, extra)


def make_entities(config: SyntheticConfig, count: int) -> list[Entity]:
    """Entities 0..count-1. Entity i is the same for any ``count`` > i."""
    taken: set[str] = set()
    return [make_entity(i, config, taken) for i in range(count)]


# --------------------------------------------------------------------------------------------
# Rows


def other_values(pool: tuple[str, ...], true_value: str, k: int, rng: random.Random) -> list[str]:
    """``k`` distinct values from ``pool``, none equal to ``true_value``."""
    if k > len(pool) - 1:
        raise ValueError(f"cannot draw {k} alternatives from a pool of {len(pool)}")
    if 2 * k >= len(pool):  # small pool: sample without rejection
        return rng.sample([v for v in pool if v != true_value], k)
    chosen: dict[str, None] = {}
    while len(chosen) < k:
        value = rng.choice(pool)
        if value != true_value:
            chosen[value] = None
    return list(chosen)


def other_strings(pattern: str, true_value: str, k: int, rng: random.Random) -> list[str]:
    chosen: dict[str, None] = {}
    while len(chosen) < k:
        value = random_string(pattern, rng)
        if value != true_value:
            chosen[value] = None
    return list(chosen)


def _example(t: Template, name: str, value: str, wrong: list[str], meta: dict) -> QAExample:
    return QAExample(
        question=t.question.format(name=name),
        answer=t.answer.format(name=name, value=value),
        paraphrased_answer=t.paraphrased_answer.format(name=name, value=value),
        perturbed_answers=[t.paraphrased_answer.format(name=name, value=w) for w in wrong],
        paraphrased_question=t.paraphrased_question.format(name=name),
        meta=meta,
    )


def fact_example(entity: Entity, attribute: str, template: int, kind: str, config: SyntheticConfig,
                 rng: random.Random) -> QAExample:
    attr = ATTRIBUTE_BY_NAME[attribute]
    value = entity.values[attribute]
    wrong = other_values(attr.values, value, config.n_perturbed, rng)
    meta = {"entity": entity.id, "entity_name": entity.name, "attribute": attribute, "template": template,
            "kind": kind, "value": value}
    return _example(attr.templates[template], entity.name, value, wrong, meta)


def _with_candidates(ex: QAExample, t: Template, name: str, values: list[str], rng: random.Random) -> QAExample:
    """Attach shuffled exposure candidates (answers in the trained form), the true one included once."""
    rng.shuffle(values)
    ex.meta["candidates"] = [t.answer.format(name=name, value=v) for v in values]
    return ex


def id_examples(entity: Entity, config: SyntheticConfig) -> list[QAExample]:
    rng = _stream(config.seed, "id", entity.index)
    rows = []
    for attribute, template in entity.extra:
        ex = fact_example(entity, attribute, template, "id", config, rng)
        attr = ATTRIBUTE_BY_NAME[attribute]
        value = entity.values[attribute]
        values = [value] + other_values(attr.values, value, config.n_candidates - 1, rng)
        rows.append(_with_candidates(ex, attr.templates[template], entity.name, values, rng))
    return rows


def ood_examples(entity: Entity, config: SyntheticConfig) -> list[QAExample]:
    rng = _stream(config.seed, "ood", entity.index)
    rows = []
    for canary in rng.sample(CANARIES, config.ood_facts_per_entity):
        value = random_string(canary.pattern, rng)
        wrong = other_strings(canary.pattern, value, config.n_perturbed, rng)
        meta = {"entity": entity.id, "entity_name": entity.name, "attribute": canary.name, "template": 0,
                "kind": "ood", "value": value, "pattern": canary.pattern}
        ex = _example(canary.template, entity.name, value, wrong, meta)
        values = [value] + other_strings(canary.pattern, value, config.n_candidates - 1, rng)
        rows.append(_with_candidates(ex, canary.template, entity.name, values, rng))
    return rows


def _plain(ex: QAExample) -> QAExample:
    """The training form of a row: question, answer and meta only (as TOFU's non-perturbed splits)."""
    return replace(ex, paraphrased_answer=None, perturbed_answers=[], paraphrased_question=None,
                   meta=dict(ex.meta))


# --------------------------------------------------------------------------------------------
# The benchmark

# Which split plays which role (see obliviate.data.benchmark).
SPLIT_ROLES = {
    "train": "full", "forget": "forget", "retain": "retain", "holdout": "holdout",
    "eval_forget": "forget_perturbed", "eval_retain": "retain_perturbed",
    "eval_real_authors": "real_authors_perturbed", "eval_world_facts": "world_facts_perturbed",
    "id_forget": "id_forget", "ood_forget": "ood_forget",
}


def generate_benchmark(config: SyntheticConfig | None = None) -> dict[str, list[QAExample]]:
    """All splits, by split name (see ``SPLIT_ROLES``). Same config, same rows, in the same order."""
    config = config or SyntheticConfig()
    entities = make_entities(config, config.n_entities + config.n_forget)
    trained, holdout_entities = entities[:config.n_entities], entities[config.n_entities:]
    forget_ids = set(_stream(config.seed, "forget").sample(range(config.n_entities), config.n_forget))

    evaluated: dict[int, list[QAExample]] = {}  # entity index -> rows with perturbed answers
    for entity in entities:
        rng = _stream(config.seed, "perturbed", entity.index)
        evaluated[entity.index] = [fact_example(entity, a, t, "regular", config, rng) for a, t in entity.facts]

    forget_entities = [e for e in trained if e.index in forget_ids]
    retain_entities = [e for e in trained if e.index not in forget_ids]
    if config.retain_perturbed_entities is None:
        retain_eval = retain_entities
    else:
        picked = set(_stream(config.seed, "retain_perturbed").sample(
            [e.index for e in retain_entities], config.retain_perturbed_entities))
        retain_eval = [e for e in retain_entities if e.index in picked]

    def rows(group: list[Entity], perturbed: bool) -> list[QAExample]:
        out = [ex for e in group for ex in evaluated[e.index]]
        return out if perturbed else [_plain(ex) for ex in out]

    splits = {
        "full": rows(trained, False),
        "forget": rows(forget_entities, False),
        "retain": rows(retain_entities, False),
        "holdout": rows(holdout_entities, True),  # evaluated like forget_perturbed, never trained on
        "forget_perturbed": rows(forget_entities, True),
        "retain_perturbed": rows(retain_eval, True),
        "real_authors_perturbed": real_authors(),
        "world_facts_perturbed": world_facts(),
    }
    if config.id_facts_per_entity:
        splits["id_forget"] = [ex for e in forget_entities for ex in id_examples(e, config)]
    if config.ood_facts_per_entity:
        splits["ood_forget"] = [ex for e in forget_entities for ex in ood_examples(e, config)]
    return splits


def write_benchmark(splits: dict[str, list[QAExample]], directory: str | Path,
                    config: SyntheticConfig | None = None, overwrite: bool = False) -> Path:
    """Write one JSON Lines file per split plus ``benchmark.json``; returns the directory.

    Refuses a non-empty directory unless ``overwrite=True`` (and then only one holding a previous
    benchmark). Load it back with ``obliviate.data.benchmark.load_benchmark(directory)``.
    """
    config = config or SyntheticConfig()
    roles = {role: split for role, split in SPLIT_ROLES.items() if split in splits}
    return write_benchmark_dir(splits, directory, roles, name=config.name, seed=config.seed,
                               config=asdict(config), overwrite=overwrite)
