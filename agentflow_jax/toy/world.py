"""The CPU toy world: fictional cities, a BM25 corpus about them, and tool-use questions.

A world is generated from a seed and is fully deterministic. It is the stage on which Flow-GRPO
must visibly improve a tiny planner (the project's TOY_WORLD.md):

* **Entities**: a few hundred cities with pronounceable generated names (some near-duplicates of
  each other, e.g. "Velmora" / "Velmara", as distractors), each with a founding year, a population,
  a landmark with its own building year, and an old census figure (the last two are distractor
  numbers that appear next to the entity's name in the corpus).
* **Corpus** (`corpus.jsonl`, Search-R1 format `{"id", "contents": "\\"Title\\"\\ntext"}`): one fact
  per passage, plus distractor passages (the landmark, the old census, trade links).
* **Questions**, each with a gold answer (a string of digits, scored by exact match) and an oracle
  plan (the right tool at every step, its sub-goal and the executor's argument):

    kind         example                                                  right tools
    lookup       "In what year was the city of Velmora founded?"          search
    arithmetic   "What is 4817 times 36?"                                 python
    composition  "How many years after the founding of Velmora was         search, search
                  Quillon founded?"                                       (the generator combines)

  Oracle sub-goals refer to the query ("the first city in the query", "the expression in the
  query") rather than copying names and numbers: a tiny model trained for minutes cannot learn to
  copy reliably, and the planner never needs to (see `toy.frozen.IdealFrozenModel`).

  Every kind has several phrasings (templates); half of them are *tempting*: the warm-start
  planner's demonstrations pick the generalist tool for them most of the time (see
  `toy.demonstrations`), so the warm-started planner is mediocre under greedy decoding too.
* **Splits**: no held-out question text occurs in training (new city / attribute / phrasing
  combinations, new pairs, fresh arithmetic operands); with `heldout_entity_fraction > 0` the
  held-out questions are moreover about cities no training question mentions.

Files written by `World.save(directory)`: `world_config.json`, `entities.jsonl`, `corpus.jsonl`,
`questions_train.jsonl`, `questions_heldout.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any, Iterable, Mapping, Sequence

from agentflow_jax.config_reader import read_mapping

# Tool names as the toolbox shows them (tools/search.py, tools/python_coder.py, tools/generator.py).
SEARCH_TOOL = "Local_Search_Tool"
PYTHON_TOOL = "Python_Code_Generator_Tool"
GENERALIST_TOOL = "Generalist_Solution_Generator_Tool"

KINDS = ("lookup", "arithmetic", "composition")

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes and seed of a toy world.

    Attributes:
      seed: everything (names, numbers, questions, splits) derives from it.
      num_entities: cities, near-duplicates included.
      near_duplicate_fraction: share of cities whose name is one letter away from another city's.
      heldout_entity_fraction: share of cities reserved for held-out questions (entity-disjoint
        split); 0 (default) lets held-out questions use any city, with question texts still unseen.
      train_questions: number of training questions per kind, {"lookup": n, ...}.
      heldout_questions: number of held-out questions per kind.
    """

    seed: int = 0
    num_entities: int = 300
    near_duplicate_fraction: float = 0.2
    heldout_entity_fraction: float = 0.0
    train_questions: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"lookup": 400, "arithmetic": 300, "composition": 300})
    heldout_questions: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"lookup": 100, "arithmetic": 100, "composition": 100})

    def __post_init__(self):
        if self.num_entities < 20:
            raise ValueError(f"num_entities must be at least 20, got {self.num_entities}")
        if not 0 <= self.near_duplicate_fraction <= 0.5:
            raise ValueError(f"near_duplicate_fraction must be in [0, 0.5], got {self.near_duplicate_fraction}")
        if not 0 <= self.heldout_entity_fraction < 1:
            raise ValueError(f"heldout_entity_fraction must be in [0, 1), got {self.heldout_entity_fraction}")
        for name in ("train_questions", "heldout_questions"):
            counts = dict(getattr(self, name))
            unknown = sorted(set(counts) - set(KINDS))
            if unknown or any(v < 0 for v in counts.values()):
                raise ValueError(f"{name} must map kinds {KINDS} to counts >= 0, got {counts}")
            object.__setattr__(self, name, {k: int(counts.get(k, 0)) for k in KINDS})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), Mapping) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "WorldConfig":
        """From a dict or ConfigDict section, checked by `config_reader` (unknown keys, types)."""
        return read_mapping(dict(values), cls, path="toy.world")


# ----------------------------------------------------------------------------------------------
# Entities and corpus
# ----------------------------------------------------------------------------------------------

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "qu", "r", "s", "st", "t",
           "th", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "l", "n", "r", "s", "m", "nd", "rn")
_LANDMARKS = ("old bridge", "clock tower", "grain market", "stone harbour", "great library", "east gate",
              "salt mill", "river temple")
_GOODS = ("wool", "salt", "timber", "copper", "glass", "spice", "linen", "honey")

FOUNDED_RANGE = (1100, 1950)
POPULATION_RANGE = (1000, 99999)


@dataclasses.dataclass(frozen=True)
class Entity:
    """A fictional city. `twin` is the city its name was derived from (near-duplicate), or ""."""

    name: str
    founded: int
    population: int
    landmark: str
    landmark_built: int
    census_year: int
    census_population: int
    trades_with: str
    good: str
    twin: str = ""


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _base_name(rng: random.Random) -> str:
    return "".join(_syllable(rng) for _ in range(rng.choice((2, 2, 3)))).capitalize()


def fresh_name(rng: random.Random) -> str:
    """A random city-like name from the same syllable inventory as the world's names."""
    return _base_name(rng)


def _near_duplicate(name: str, rng: random.Random) -> str:
    """`name` with one vowel changed (never the first letter)."""
    positions = [i for i, ch in enumerate(name) if ch in _VOWELS and i > 0]
    i = rng.choice(positions)
    vowel = rng.choice([v for v in _VOWELS if v != name[i]])
    return name[:i] + vowel + name[i + 1:]


def _is_new(name: str, seen: set[str]) -> bool:
    """Not taken, and no name is a prefix of another (each name is one tokenizer piece)."""
    return name not in seen and not any(name.startswith(n) or n.startswith(name) for n in seen)


def _names(config: WorldConfig, rng: random.Random) -> list[tuple[str, str]]:
    """(name, twin) pairs: unique names, a share of them near-duplicates of an earlier name."""
    num_twins = int(config.num_entities * config.near_duplicate_fraction)
    names: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(names) < config.num_entities - num_twins:
        name = _base_name(rng)
        if 5 <= len(name) <= 11 and _is_new(name, seen):
            seen.add(name)
            names.append((name, ""))
    originals = [n for n, _ in names]
    while len(names) < config.num_entities:
        original = rng.choice(originals)
        twin = _near_duplicate(original, rng)
        if _is_new(twin, seen):
            seen.add(twin)
            names.append((twin, original))
    rng.shuffle(names)
    return names


def _entities(config: WorldConfig, rng: random.Random) -> list[Entity]:
    names = _names(config, rng)
    entities = []
    for index, (name, twin) in enumerate(names):
        founded = rng.randint(*FOUNDED_RANGE)
        census_year = rng.randint(max(founded + 20, 1700), 1990)
        entities.append(Entity(
            name=name, founded=founded, population=rng.randint(*POPULATION_RANGE),
            landmark=rng.choice(_LANDMARKS), landmark_built=rng.randint(founded + 1, 2000),
            census_year=census_year, census_population=rng.randint(*POPULATION_RANGE),
            trades_with=names[(index + rng.randint(1, len(names) - 1)) % len(names)][0],
            good=rng.choice(_GOODS), twin=twin))
    return entities


def founded_passage(e: Entity) -> str:
    return f"{e.name} was founded in {e.founded}."


def population_passage(e: Entity) -> str:
    return f"{e.name} has a population of {e.population}."


def corpus_records(entities: Sequence[Entity]) -> list[dict[str, str]]:
    """The corpus in Search-R1 JSON-lines form: facts (founding, population) and distractors."""
    records = []
    for e in entities:
        texts = [
            ("founded", founded_passage(e)),
            ("population", population_passage(e)),
            ("landmark", f"The {e.landmark} of {e.name} was built in {e.landmark_built}."),
            ("census", f"In {e.census_year} a census counted {e.census_population} people in {e.name}."),
            ("trade", f"Merchants of {e.name} trade {e.good} with {e.trades_with}."),
        ]
        for tag, text in texts:
            records.append({"id": f"{e.name.lower()}-{tag}", "contents": f'"{e.name}"\n{text}'})
    return records


# ----------------------------------------------------------------------------------------------
# Questions and their oracle plans
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OracleStep:
    """The right step: what the planner should write and the executor's tool argument."""

    tool_name: str
    justification: str
    context: str
    sub_goal: str
    tool_query: str  # the executor's "query" argument


@dataclasses.dataclass(frozen=True)
class Question:
    """A question with its gold answer, oracle plan and what the demonstrations need.

    Attributes:
      id: unique id ("train-lookup-0007").
      split: "train" or "heldout".
      kind: "lookup" | "arithmetic" | "composition".
      subtype: lookup "founded"|"population"; arithmetic "times"|"plus"|"minus";
        composition "years_after"|"combined_population".
      template: index of the phrasing within its subtype.
      tempting: whether the phrasing tempts the warm-start planner towards the generalist tool.
      text: the question.
      answer: the gold answer (digits).
      entities: the cities it mentions, in order.
      operands: the numbers the answer is computed from (arithmetic: from the question;
        composition: the facts of the first and second city; lookup: the fact).
      expression: the arithmetic computing the answer ("" for lookups).
      plan: the oracle steps.
      generalist_answer: the plausible-looking wrong answer the generalist tool's demonstrations give.
    """

    id: str
    split: str
    kind: str
    subtype: str
    template: int
    tempting: bool
    text: str
    answer: str
    entities: tuple[str, ...]
    operands: tuple[int, ...]
    expression: str
    plan: tuple[OracleStep, ...]
    generalist_answer: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Question":
        data = dict(data)
        data["entities"] = tuple(data["entities"])
        data["operands"] = tuple(data["operands"])
        data["plan"] = tuple(OracleStep(**s) for s in data["plan"])
        return cls(**data)


# (subtype, phrasing, tempting). Half the phrasings of each subtype tempt the generalist.
LOOKUP_TEMPLATES = {
    "founded": (("In what year was the city of {x} founded?", False),
                ("When was {x} founded?", True)),
    "population": (("What is the population of the city of {x}?", False),
                   ("How many people live in {x}?", True)),
}
ARITHMETIC_TEMPLATES = {
    "times": (("Calculate {a} times {b}.", False), ("What is {a} times {b}?", True)),
    "plus": (("Calculate {a} plus {b}.", False), ("What is {a} plus {b}?", True)),
    "minus": (("Calculate {a} minus {b}.", False), ("What is {a} minus {b}?", True)),
}
COMPOSITION_TEMPLATES = {
    "years_after": (("How many years after the founding of {x} was {y} founded?", False),
                    ("How many years older is {x} than {y}?", True)),
    "combined_population": (("What is the combined population of {x} and {y}?", False),
                            ("How many people live in {x} and {y} together?", True)),
}
_OPERATOR = {"times": "*", "plus": "+", "minus": "-"}

ANALYSES = {
    ("lookup", "founded"): "The query asks for the founding year of a city; it needs one fact from the passages.",
    ("lookup", "population"): "The query asks for the population of a city; it needs one fact from the passages.",
    ("arithmetic", "times"): "The query asks for an exact product of large numbers; it needs computation.",
    ("arithmetic", "plus"): "The query asks for an exact sum of large numbers; it needs computation.",
    ("arithmetic", "minus"): "The query asks for an exact difference of large numbers; it needs computation.",
    ("composition", "years_after"): ("The query asks for the years between two foundings; it needs the "
                                     "two founding years from the passages."),
    ("composition", "combined_population"): ("The query asks for a total population; it needs the two "
                                             "populations from the passages."),
}

NO_CONTEXT = "None."
WHAT = {"founded": "founding year", "population": "population"}
KEYWORD = {"founded": "founded", "population": "population"}


def fact_sentence(attribute: str, name: str, value: int) -> str:
    """A fact as the corpus states it (and as the ideal frozen model reads it from memory)."""
    if attribute == "founded":
        return f"{name} was founded in {value}."
    return f"{name} has a population of {value}."


def _lookup_step(attribute: str, name: str, which: str, justification: str, context: str) -> OracleStep:
    """A search step; the sub-goal refers to the city ("the city in the query", "the first city in the
    query") instead of copying its name, and the executor resolves the reference."""
    return OracleStep(tool_name=SEARCH_TOOL, justification=justification, context=context,
                      sub_goal=f"Find the {WHAT[attribute]} of {which} in the query.",
                      tool_query=f"{name} {KEYWORD[attribute]}")


def _compute_step(expression: str) -> OracleStep:
    return OracleStep(tool_name=PYTHON_TOOL, justification="Exact arithmetic on large numbers needs code.",
                      context=NO_CONTEXT, sub_goal="Compute the expression in the query.",
                      tool_query=f"Compute {expression}.")


def _wrong_number(gold: int, rng: random.Random) -> int:
    """A number with as many digits as `gold` (at least 2), different from it."""
    digits = max(2, len(str(gold)))
    while True:
        value = rng.randint(10 ** (digits - 1), 10 ** digits - 1)
        if value != gold:
            return value


def generalist_sentence(kind: str, subtype: str, value: int) -> str:
    """The generalist tool's plausible-looking answer, for a (wrong) value."""
    return {
        "founded": f"It was founded in {value}.",
        "population": f"It has {value} inhabitants.",
        "years_after": f"The difference is {value} years.",
        "combined_population": f"Together they have {value} inhabitants.",
    }.get(subtype, f"The result is {value}.")


def _lookup_question(qid: str, split: str, e: Entity, subtype: str, template: int, rng: random.Random) -> Question:
    phrasing, tempting = LOOKUP_TEMPLATES[subtype][template]
    value = e.founded if subtype == "founded" else e.population
    step = _lookup_step(subtype, e.name, "the city", f"The {WHAT[subtype]} of the city must be looked up.",
                        NO_CONTEXT)
    wrong = _wrong_number(value, rng) if subtype == "population" else _wrong_year(value, rng)
    return Question(id=qid, split=split, kind="lookup", subtype=subtype, template=template, tempting=tempting,
                    text=phrasing.format(x=e.name), answer=str(value), entities=(e.name,), operands=(value,),
                    expression="", plan=(step,), generalist_answer=generalist_sentence("lookup", subtype, wrong))


def _wrong_year(year: int, rng: random.Random) -> int:
    while True:
        value = rng.randint(*FOUNDED_RANGE)
        if value != year:
            return value


def _arithmetic_operands(subtype: str, rng: random.Random) -> tuple[int, int]:
    if subtype == "times":
        return rng.randint(1000, 9999), rng.randint(12, 99)
    if subtype == "plus":
        return rng.randint(10000, 99999), rng.randint(1000, 99999)
    a = rng.randint(20000, 99999)
    return a, rng.randint(1000, a - 1000)


def _arithmetic_question(qid: str, split: str, subtype: str, template: int, rng: random.Random) -> Question:
    phrasing, tempting = ARITHMETIC_TEMPLATES[subtype][template]
    a, b = _arithmetic_operands(subtype, rng)
    expression = f"{a} {_OPERATOR[subtype]} {b}"
    value = {"times": a * b, "plus": a + b, "minus": a - b}[subtype]
    step = _compute_step(expression)
    return Question(id=qid, split=split, kind="arithmetic", subtype=subtype, template=template, tempting=tempting,
                    text=phrasing.format(a=a, b=b), answer=str(value), entities=(), operands=(a, b),
                    expression=expression, plan=(step,),
                    generalist_answer=generalist_sentence("arithmetic", subtype, _wrong_number(value, rng)))


def _composition_question(qid: str, split: str, x: Entity, y: Entity, subtype: str, template: int,
                          rng: random.Random) -> Question:
    """Two searches, then the generator combines the facts: years_after = y.founded - x.founded
    (x founded first), combined_population = the sum."""
    phrasing, tempting = COMPOSITION_TEMPLATES[subtype][template]
    attribute = "founded" if subtype == "years_after" else "population"
    fx, fy = getattr(x, attribute), getattr(y, attribute)
    expression, value = (f"{fy} - {fx}", fy - fx) if subtype == "years_after" else (f"{fx} + {fy}", fx + fy)
    what = WHAT[attribute]
    plan = (
        _lookup_step(attribute, x.name, "the first city", f"The {what} of the first city must be looked up.",
                     NO_CONTEXT),
        _lookup_step(attribute, y.name, "the second city", f"The {what} of the second city is still missing.",
                     f"The {what} of the first city is known."),
    )
    return Question(id=qid, split=split, kind="composition", subtype=subtype, template=template,
                    tempting=tempting, text=phrasing.format(x=x.name, y=y.name), answer=str(value),
                    entities=(x.name, y.name), operands=(fx, fy), expression=expression, plan=plan,
                    generalist_answer=generalist_sentence("composition", subtype, _wrong_number(value, rng)))


def _questions(split: str, counts: Mapping[str, int], entities: Sequence[Entity], rng: random.Random,
               taken: set[str]) -> list[Question]:
    """`counts[kind]` questions of each kind, subtypes and templates balanced, texts unique in `taken`."""
    questions: list[Question] = []
    for kind in KINDS:
        templates = {"lookup": LOOKUP_TEMPLATES, "arithmetic": ARITHMETIC_TEMPLATES,
                     "composition": COMPOSITION_TEMPLATES}[kind]
        variants = [(subtype, t) for subtype in templates for t in range(len(templates[subtype]))]
        made, attempts = 0, 0
        while made < counts[kind]:
            attempts += 1
            if attempts > 200 * (counts[kind] + 10):
                raise ValueError(f"cannot make {counts[kind]} distinct {split} {kind} questions from "
                                 f"{len(entities)} entities; use more entities or fewer questions")
            subtype, template = variants[made % len(variants)]
            qid = f"{split}-{kind}-{made:04d}"
            if kind == "lookup":
                q = _lookup_question(qid, split, rng.choice(entities), subtype, template, rng)
            elif kind == "arithmetic":
                q = _arithmetic_question(qid, split, subtype, template, rng)
            else:
                x, y = rng.sample(list(entities), 2)
                if subtype == "years_after":
                    if x.founded == y.founded:
                        continue
                    x, y = (x, y) if x.founded < y.founded else (y, x)
                q = _composition_question(qid, split, x, y, subtype, template, rng)
            if q.text in taken:
                continue
            taken.add(q.text)
            questions.append(q)
            made += 1
    return questions


# ----------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------

WORLD_FILES = ("world_config.json", "entities.jsonl", "corpus.jsonl", "questions_train.jsonl",
               "questions_heldout.jsonl")


@dataclasses.dataclass(frozen=True)
class World:
    """A generated world: its config, entities, corpus records and question splits."""

    config: WorldConfig
    entities: tuple[Entity, ...]
    corpus: tuple[dict[str, str], ...]
    train: tuple[Question, ...]
    heldout: tuple[Question, ...]

    def entity(self, name: str) -> Entity:
        for e in self.entities:
            if e.name == name:
                return e
        raise KeyError(f"no entity named {name!r}")

    def questions(self, split: str) -> tuple[Question, ...]:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        return self.train if split == "train" else self.heldout

    def save(self, directory: str | os.PathLike) -> dict[str, str]:
        """Writes the world's files into `directory`; returns {file name: path}."""
        os.makedirs(directory, exist_ok=True)
        paths = {name: os.path.join(directory, name) for name in WORLD_FILES}
        _write_json(paths["world_config.json"], self.config.to_dict())
        _write_jsonl(paths["entities.jsonl"], (dataclasses.asdict(e) for e in self.entities))
        _write_jsonl(paths["corpus.jsonl"], self.corpus)
        _write_jsonl(paths["questions_train.jsonl"], (q.to_dict() for q in self.train))
        _write_jsonl(paths["questions_heldout.jsonl"], (q.to_dict() for q in self.heldout))
        return paths

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "World":
        missing = [n for n in WORLD_FILES if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise FileNotFoundError(f"{directory} is not a toy world directory: missing {missing} "
                                    "(build one with `python -m agentflow_jax.toy --config=...` or World.save)")
        with open(os.path.join(directory, "world_config.json"), encoding="utf-8") as f:
            config = WorldConfig.from_mapping(json.load(f))
        read = lambda name: _read_jsonl(os.path.join(directory, name))  # noqa: E731
        return cls(config=config, entities=tuple(Entity(**e) for e in read("entities.jsonl")),
                   corpus=tuple(read("corpus.jsonl")),
                   train=tuple(Question.from_dict(q) for q in read("questions_train.jsonl")),
                   heldout=tuple(Question.from_dict(q) for q in read("questions_heldout.jsonl")))


def generate_world(config: WorldConfig = WorldConfig()) -> World:
    """The world of `config` (same config, same world, byte for byte once saved)."""
    rng = random.Random(config.seed)
    entities = _entities(config, rng)
    if config.heldout_entity_fraction > 0:
        num_heldout = max(4, round(len(entities) * config.heldout_entity_fraction))
        heldout_entities, train_entities = entities[:num_heldout], entities[num_heldout:]
    else:
        heldout_entities = train_entities = entities
    taken: set[str] = set()
    train = _questions("train", config.train_questions, train_entities, random.Random(rng.random()), taken)
    heldout = _questions("heldout", config.heldout_questions, heldout_entities, random.Random(rng.random()), taken)
    return World(config=config, entities=tuple(entities), corpus=tuple(corpus_records(entities)),
                 train=tuple(train), heldout=tuple(heldout))


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)


def _write_jsonl(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Questions as training / evaluation records
# ----------------------------------------------------------------------------------------------


def query_records(questions: Sequence[Question]) -> list[dict[str, Any]]:
    """Questions in the query-record format of training and evaluation (`data.pipeline`): exact-match
    scoring; "qtype" and "tools" (the oracle's tool sequence) give per-kind metrics."""
    return [{"pid": q.id, "query": q.text, "answer": q.answer, "kind": "exact", "qtype": q.kind,
             "tools": [s.tool_name for s in q.plan], "subtype": q.subtype, "tempting": q.tempting}
            for q in questions]


def spread_sample(questions: Sequence[Question], count: int) -> list[Question]:
    """Up to `count` questions taken in turn from each kind (deterministic; every kind gets its share)."""
    by_kind = {k: [q for q in questions if q.kind == k] for k in KINDS}
    chosen, index = [], 0
    while len(chosen) < min(count, len(questions)):
        for kind in KINDS:
            if index < len(by_kind[kind]) and len(chosen) < count:
                chosen.append(by_kind[kind][index])
        index += 1
    return chosen
