"""The CPU toy world and its oracle demonstrations: determinism, gold answers, search, replay, corruption."""

import filecmp
import json
import os
import re

import pytest

from agentflow_jax.agent.rollout import rollout_batch
from agentflow_jax.config_reader import ConfigError
from agentflow_jax.engines import ScriptedEngine
from agentflow_jax.experiment import read_experiment
from agentflow_jax.rl.rewards import score_answer
from agentflow_jax.tools.search import BM25Index
from agentflow_jax.toy import demonstrations as dm
from agentflow_jax.toy import frozen
from agentflow_jax.toy import tokenizer as toy_tokenizer
from agentflow_jax.toy import world as toy_world
from agentflow_jax.toy.config import TokenizerSection
from agentflow_jax.toy.warm_start import encode_demo
from agentflow_jax.toy.world import GENERALIST_TOOL, PYTHON_TOOL, SEARCH_TOOL

TINY_CPU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs",
                        "tiny_cpu.py")


@pytest.fixture(scope="module")
def world():
    return toy_world.generate_world(toy_world.WorldConfig())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def world_dir(world, run_dir):
    directory = run_dir / "warm_start" / "world"
    world.save(directory)
    return str(directory)


@pytest.fixture(scope="module")
def agent(run_dir, world_dir):
    """The toy agent as the shipped config describes it (toolbox factory, rollout config), on this world."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_cpu", TINY_CPU)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.workdir = str(run_dir)
    experiment = read_experiment(config, extra_sections=("toy",))
    return experiment.tools.build, experiment.rollout_config()


@pytest.fixture(scope="module")
def index(world_dir):
    return BM25Index.load_or_build(os.path.join(world_dir, "corpus.jsonl"))


# ----------------------------------------------------------------------------------------------- world


def test_same_seed_same_files_other_seed_other_world(world, world_dir, tmp_path):
    again = toy_world.generate_world(toy_world.WorldConfig())
    again.save(tmp_path / "again")
    for name in toy_world.WORLD_FILES:
        assert filecmp.cmp(os.path.join(world_dir, name), tmp_path / "again" / name, shallow=False), name
    other = toy_world.generate_world(toy_world.WorldConfig(seed=1))
    assert [e.name for e in other.entities] != [e.name for e in world.entities]
    assert toy_world.World.load(world_dir) == world


def test_sizes_kinds_and_phrasings(world):
    config = world.config
    assert len(world.entities) == config.num_entities
    assert len({e.name for e in world.entities}) == len(world.entities)
    twins = [e for e in world.entities if e.twin]
    assert len(twins) == int(config.num_entities * config.near_duplicate_fraction)
    for e in twins:  # one letter away from its original
        original = world.entity(e.twin)
        assert len(e.name) == len(original.name)
        assert sum(a != b for a, b in zip(e.name, original.name)) == 1
    for split, counts in (("train", config.train_questions), ("heldout", config.heldout_questions)):
        questions = world.questions(split)
        for kind in toy_world.KINDS:
            rows = [q for q in questions if q.kind == kind]
            assert len(rows) == counts[kind]
            tempting = sum(q.tempting for q in rows) / len(rows)
            assert 0.45 <= tempting <= 0.55  # half the phrasings tempt the generalist
    assert len({q.text for q in world.train + world.heldout}) == len(world.train) + len(world.heldout)


def test_heldout_questions_are_unseen_and_optionally_about_unseen_cities(world):
    assert not {q.text for q in world.train} & {q.text for q in world.heldout}
    disjoint = toy_world.generate_world(toy_world.WorldConfig(
        num_entities=60, heldout_entity_fraction=0.25, train_questions={"lookup": 20, "arithmetic": 5,
                                                                        "composition": 20},
        heldout_questions={"lookup": 10, "arithmetic": 5, "composition": 10}))
    train_cities = {name for q in disjoint.train for name in q.entities}
    heldout_cities = {name for q in disjoint.heldout for name in q.entities}
    assert heldout_cities and not train_cities & heldout_cities


def test_no_city_name_is_a_prefix_of_another(world):
    names = sorted(e.name for e in world.entities)
    assert not [(a, b) for a, b in zip(names, names[1:]) if b.startswith(a)]


def _recompute(question, world):
    """The answer from the entity table and the question text alone (not the generator's fields)."""
    text = question.text
    cities = sorted((e for e in world.entities if re.search(rf"\b{e.name}\b", text)),
                    key=lambda e: text.index(e.name))
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    if question.kind == "arithmetic":
        a, b = numbers
        op = re.search(r"(times|plus|minus)", text).group(1)
        return {"times": a * b, "plus": a + b, "minus": a - b}[op]
    if question.kind == "lookup":
        (city,) = cities
        return city.founded if "founded" in text else city.population
    x, y = cities
    if "population" in text or "people" in text:
        return x.population + y.population
    return abs(y.founded - x.founded)


def test_every_gold_answer_follows_from_the_entity_table_and_the_corpus(world):
    corpus_texts = {r["contents"].partition("\n")[2] for r in world.corpus}
    for q in world.train + world.heldout:
        assert q.answer == str(_recompute(q, world)), q
        assert q.answer.isdigit()
        for name in q.entities:  # the facts the composition / lookup needs are passages
            e = world.entity(name)
            fact = toy_world.founded_passage(e) if q.subtype in ("founded", "years_after") \
                else toy_world.population_passage(e)
            assert fact in corpus_texts
        # The generalist's answer is plausible in form and wrong.
        assert re.findall(r"\d+", q.generalist_answer)[-1] != q.answer


def test_corpus_is_search_r1_jsonl(world_dir, world):
    with open(os.path.join(world_dir, "corpus.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == len(world.corpus) == 5 * len(world.entities)
    for row in rows[:50]:
        assert set(row) == {"id", "contents"}
        title, _, text = row["contents"].partition("\n")
        assert title.startswith('"') and title.endswith('"') and text


def test_search_ranks_the_right_passage_first_for_every_oracle_sub_goal(world, index):
    queries, expected = [], []
    for q in world.train + world.heldout:
        for step in q.plan:
            if step.tool_name == SEARCH_TOOL:
                name, _, keyword = step.tool_query.rpartition(" ")
                queries.append(step.tool_query)
                expected.append(f"{name.lower()}-{keyword}")
    hits = index.search(queries, topk=2)
    wrong = [(query, want, h[0].id) for query, want, h in zip(queries, expected, hits) if h[0].id != want]
    assert not wrong, wrong[:5]


def test_generator_answers_score_as_exact_matches():
    assert score_answer(" 1,642. ", "1642", "exact") == 1.0
    assert score_answer("1643", "1642", "exact") == 0.0
    assert score_answer(None, "1642", "exact") == 0.0


def test_bad_world_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="config.toy.world has unknown key 'num_cities'"):
        toy_world.WorldConfig.from_mapping({"num_cities": 10})
    with pytest.raises(ValueError, match="kinds"):
        toy_world.WorldConfig(train_questions={"riddle": 3})


# ----------------------------------------------------------------------------------------------- demos


def _sample(world):
    """Questions covering every kind, phrasing and path (oracle and generalist at each step)."""
    corruption = dm.Corruption()
    chosen, seen = [], set()
    for q in world.train:
        path = tuple(corruption.wrong(q, step) for step in range(1, len(q.plan) + 1))
        first_wrong = path.index(True) if True in path else -1
        key = (q.kind, q.subtype, q.tempting, first_wrong)
        if key not in seen:
            seen.add(key)
            chosen.append(q)
    return chosen


@pytest.fixture(scope="module")
def recording(world, agent):
    toolbox_factory, rollout = agent
    return dm.record_demonstrations(_sample(world), toolbox_factory=toolbox_factory, rollout=rollout)


def test_replayed_demonstrations_reproduce_the_rollout_exactly(recording, agent):
    """Serving the demonstrations' replies by exact prompt through the real rollout and real tools
    asks for exactly the demonstrated prompts: every prompt (tool results in memory included) is
    what the agent builds at rollout time."""
    replies = {}
    for d in recording.demos:
        key = json.dumps(d.messages)
        assert replies.setdefault(key, d.target) == d.target
    asked = []

    def respond(request):
        key = json.dumps([dict(m) for m in request.messages])
        asked.append(key)
        if key not in replies:
            raise AssertionError("the rollout built a prompt no demonstration has: "
                                 f"{request.messages[-1]['content'][:300]}")
        return replies[key]

    engine = ScriptedEngine(respond)
    toolbox_factory, rollout = agent
    questions = recording.questions
    trajectories = rollout_batch([q.text for q in questions], n=1, planner=engine, frozen=engine,
                                 toolbox=toolbox_factory(engine), config=rollout)
    assert sorted(asked) == sorted(replies)
    assert [t.answer for t in trajectories] == [t.answer for t in recording.trajectories]


def test_demonstrations_cover_every_role_and_parse(recording):
    from agentflow_jax.agent import modules

    roles = {d.role for d in recording.demos}
    assert roles == set(frozen.ROLES)
    for d in recording.demos:
        if d.role == "planner":
            step = modules.parse_planner_output(d.target, _metadata())
            assert step.parse_error is None and step.tool_name == d.chosen_tool
            assert d.target.count("\n") == 3 and d.target.endswith(d.chosen_tool)
        elif d.role == "verifier":
            assert modules.parse_verifier_output(d.target).parse_error is None
        elif d.role == "generator":
            assert modules.parse_generator_output(d.target).answer.isdigit()


def _metadata():
    from agentflow_jax.tools.generator import GENERALIST_METADATA
    from agentflow_jax.tools.python_coder import PYTHON_CODER_METADATA
    from agentflow_jax.tools.search import LOCAL_SEARCH_METADATA

    return [GENERALIST_METADATA, LOCAL_SEARCH_METADATA, PYTHON_CODER_METADATA]


def test_oracle_path_ends_with_gold_and_generalist_path_fools_the_verifier(recording):
    by_text = {q.text: q for q in recording.questions}
    paths = set()
    for t in recording.trajectories:
        q = by_text[t.memory.query]
        tools = [turn.tool_name for turn in t.memory.turns]
        paths.add(tuple(tools) == tuple(s.tool_name for s in q.plan))
        assert t.stop_reason == "verifier"
        if tools[-1] == GENERALIST_TOOL:
            assert t.answer != q.answer
            assert tools[:-1] == [s.tool_name for s in q.plan[:len(tools) - 1]]
        else:
            assert tools == [s.tool_name for s in q.plan] and t.answer == q.answer
    assert paths == {True, False}
    python_results = [turn.result for t in recording.trajectories for turn in t.memory.turns
                      if turn.tool_name == PYTHON_TOOL]
    assert python_results and all(r.startswith("Printed output:\nresult: ") for r in python_results)


def test_planner_corruption_rate_and_its_dependence_on_phrasing(world, recording):
    corruption = dm.Corruption()
    # The rate over the full training set follows from the corruption draws (step k exists only when
    # steps < k followed the oracle); computed without running the tools.
    wrong = total = 0
    by_phrasing = {False: [0, 0], True: [0, 0]}
    for q in world.train:
        for step in range(1, len(q.plan) + 1):
            total += 1
            is_wrong = corruption.wrong(q, step)
            wrong += is_wrong
            if step == 1:
                by_phrasing[q.tempting][0] += is_wrong
                by_phrasing[q.tempting][1] += 1
            if is_wrong:
                break
    assert 0.38 <= wrong / total <= 0.5
    assert by_phrasing[True][0] / by_phrasing[True][1] > 0.7
    assert by_phrasing[False][0] / by_phrasing[False][1] < 0.25
    # The recorded demonstrations carry exactly those draws.
    for d in recording.demos:
        if d.role == "planner":
            q = next(q for q in recording.questions if q.id == d.question_id)
            assert d.corrupted == corruption.wrong(q, d.step)
            assert d.oracle_tool == q.plan[d.step - 1].tool_name


def test_tokenizer_round_trips_demonstrations_and_keeps_names_and_numbers_context_free(world, recording, tmp_path):
    texts = toy_tokenizer.tokenizer_texts(world, recording.demos, max_texts=400, seed=0)
    section = TokenizerSection(vocab_size=900, max_piece_length=32, max_texts=400, seed=0)
    tokenizer = toy_tokenizer.train_tokenizer(section, world, texts, str(tmp_path / "tok.model"))
    for piece in toy_tokenizer.TOOL_PIECES + tuple(e.name for e in world.entities[:50]) + toy_tokenizer.DIGIT_PAIRS:
        assert len(tokenizer.encode(piece)) == 1, piece
    # A name or number is the same tokens wherever it appears (what makes copying it easy).
    name, number = world.entities[0].name, "94214"
    ids = lambda text: tokenizer.encode(text, allow_special=False)  # noqa: E731
    for context in ("Query: When was {} founded?", '{{"query": "{} founded"}}', "Context: {}."):
        assert ids(name)[0] in ids(context.format(name))
        assert " ".join(map(str, ids(number))) in " ".join(map(str, ids(context.format(number))))
    for d in recording.demos:
        for text in [m["content"] for m in d.messages] + [d.target]:
            assert tokenizer.decode(tokenizer.encode(text, allow_special=False)) == text
        example = encode_demo(tokenizer, d)
        assert tokenizer.decode(example.target_ids) == d.target + "<|im_end|>"
        assert tokenizer.decode(example.prompt_ids).endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------- ideal frozen model


def _planner_text(tool, sub_goal="Find the founding year of the city in the query."):
    return dm.planner_output("j", "None.", sub_goal, tool)


def _run(world, agent, question, planner_texts):
    """One trajectory of `question` with scripted planner replies and the ideal frozen model."""
    replies = iter(planner_texts)
    planner = ScriptedEngine(lambda request: next(replies))
    engine = frozen.IdealFrozenEngine(world.train + world.heldout)
    toolbox_factory, rollout = agent
    (trajectory,) = rollout_batch([question.text], n=1, planner=planner, frozen=engine,
                                  toolbox=toolbox_factory(engine), config=rollout)
    return trajectory


def test_ideal_frozen_model_off_the_oracle_path(world, agent):
    lookup = next(q for q in world.train if q.kind == "lookup" and q.subtype == "founded")
    composition = next(q for q in world.train if q.kind == "composition" and q.subtype == "years_after")
    arithmetic = next(q for q in world.train if q.kind == "arithmetic")
    # A program cannot look a fact up: no result, the verifier continues, and a later search recovers.
    t = _run(world, agent, lookup, [_planner_text(PYTHON_TOOL), _planner_text(SEARCH_TOOL)])
    assert [turn.stop for turn in t.turns] == [False, True] and t.answer == lookup.answer
    # Searching the first city twice leaves the second fact missing until the last turn: no answer.
    first = "Find the founding year of the first city in the query."
    t = _run(world, agent, composition, [_planner_text(SEARCH_TOOL, first)] * 3)
    assert t.stop_reason == "max_turns" and t.answer == frozen.NO_ANSWER
    # The generalist fools the verifier at any step; its wrong number becomes the answer.
    second = "Find the founding year of the second city in the query."
    t = _run(world, agent, composition, [_planner_text(SEARCH_TOOL, second), _planner_text(GENERALIST_TOOL)])
    assert t.stop_reason == "verifier" and len(t.turns) == 2
    assert t.answer == re.findall(r"\d+", composition.generalist_answer)[-1] != composition.answer
    # Order of the searches does not matter; the generator combines the two facts.
    t = _run(world, agent, composition, [_planner_text(SEARCH_TOOL, second), _planner_text(SEARCH_TOOL, first)])
    assert t.answer == composition.answer
    # A search for an arithmetic question finds nothing useful; the program then answers it.
    t = _run(world, agent, arithmetic, [_planner_text(SEARCH_TOOL, "Compute the expression in the query."),
                                           _planner_text(PYTHON_TOOL, "Compute the expression in the query.")])
    assert [turn.stop for turn in t.turns] == [False, True] and t.answer == arithmetic.answer
    # An unknown tool name is a failed turn; the verifier continues.
    t = _run(world, agent, lookup, [_planner_text("Teleport_Tool"), _planner_text(SEARCH_TOOL)])
    assert not t.turns[0].result.ok and t.answer == lookup.answer


def test_ideal_frozen_model_never_reads_the_gold_answer(world):
    """Its replies depend on the memory in the prompt: an empty memory gives no answer."""
    model = frozen.IdealFrozenModel(world.train)
    q = next(q for q in world.train if q.kind == "lookup")
    assert model.answer(q.text, []) == frozen.NO_ANSWER
    assert model.verdict(q.text, []) == (False, "The founding year has not been found yet.") or q.subtype != "founded"
    passage = f"[1] Title: {q.entities[0]}\n{toy_world.fact_sentence(q.subtype, q.entities[0], 1234)}"
    assert model.answer(q.text, [(SEARCH_TOOL, passage)]) == "1234"
