"""Answer scorers on hand-written tables: exact / F1 / math / choice / Game of 24 / LLM judge."""

import pytest

from agentflow_jax.engines import Generation, ScriptedEngine
from agentflow_jax.rl import rewards


@pytest.mark.parametrize("text, normalised", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   Apple,  a pear ", "apple pear"),
    ("Theatre", "theatre"),  # "the" inside a word stays
    ("U.S.A.", "usa"),
])
def test_normalize_answer(text, normalised):
    assert rewards.squad_normalize(text) == normalised


@pytest.mark.parametrize("answer, gold, expected", [
    ("the Eiffel tower", "Eiffel Tower", 1.0),
    ("Paris, France", "Paris", 0.0),
    ("Barack Obama", "Obama; Barack Obama", 1.0),  # any gold of several counts
    ("obama", "Barack Obama; Michelle Obama", 0.0),
])
def test_exact(answer, gold, expected):
    assert rewards.score_answer(answer, gold, "exact") == expected


@pytest.mark.parametrize("answer, gold, expected", [
    ("Paris France", "Paris", 2 * (1 / 2 * 1) / (1 / 2 + 1)),  # precision 1/2, recall 1
    ("the cat sat", "a cat sat down", 2 * (1 * 2 / 3) / (1 + 2 / 3)),  # 2 common; 2 vs 3 tokens
    ("dog", "cat", 0.0),
    ("new york city", "york; new york city", 1.0),  # best gold
    ("a the", "the", 1.0),  # both normalise to nothing
])
def test_token_f1(answer, gold, expected):
    assert rewards.score_answer(answer, gold, "f1") == pytest.approx(expected)


@pytest.mark.parametrize("answer, gold", [
    ("3/4", "0.75"),
    ("\\frac{3}{4}", "0.75"),
    ("$\\dfrac{3}{4}$", "3/4"),
    ("\\boxed{12}", "12"),
    ("The answer is $\\boxed{1,000}$.", "1000"),
    ("1,234,567", "1234567"),
    ("12 cm", "12"),
    ("12\\text{ cm}", "12"),
    ("3 square feet", "3"),
    ("50%", "50"),
    ("50\\%", "0.5"),
    ("x = 5", "5"),
    ("-2.50", "-5/2"),
    ("−7", "-7"),
    ("90^\\circ", "90"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),  # not a number: cleaned LaTeX equality
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("7", "6; 7"),
])
def test_math_equivalent(answer, gold):
    assert rewards.score_answer(answer, gold, "math") == 1.0


@pytest.mark.parametrize("answer, gold", [
    ("0.333", "1/3"),
    ("12", "13"),
    ("5 apples and 4 pears", "5"),
    ("1/0", "0"),
    ("\\sqrt{2}", "2"),
    ("-5", "5"),
])
def test_math_not_equivalent(answer, gold):
    assert rewards.score_answer(answer, gold, "math") == 0.0


CHOICES = ["Paris", "London", "J. K. Rowling", "Berlin"]


@pytest.mark.parametrize("answer, gold, choices, expected", [
    ("(B)", "B", None, 1.0),
    ("B.", "B", None, 1.0),
    ("b", "B", None, 1.0),
    ("**C**", "C", None, 1.0),
    ("The answer is B", "B", None, 1.0),
    ("Answer: (D)", "D", None, 1.0),
    ("B) London", "B", None, 1.0),
    ("I pick (A) because", "A", None, 1.0),
    ("(A)", "B", None, 0.0),
    ("London", "B", CHOICES, 1.0),
    ("london", "London", CHOICES, 1.0),  # gold given as option text
    ("B", "London", CHOICES, 1.0),
    ("J. K. Rowling", "C", CHOICES, 1.0),  # option text wins over a leading "J."
    ("Paris", "B", CHOICES, 0.0),
    ("Denver", "D", None, 0.0),  # "answer is Denver" style words are not letters
    ("The answer is Denver", "D", None, 0.0),
    ("Paris", "Paris", None, 1.0),  # no letter anywhere: text comparison
])
def test_choice(answer, gold, choices, expected):
    assert rewards.score_answer(answer, gold, "choice", choices=choices) == expected


def test_choice_accepts_letter_mapping():
    assert rewards.score_answer("Berlin", "D", "choice", choices={"a": "Paris", "d": "Berlin"}) == 1.0


@pytest.mark.parametrize("expression, numbers, valid, reason_fragment", [
    ("6 * 4 * (1 * 1)", [1, 1, 4, 6], True, "valid"),
    ("24 = 4 * 6 / (1 * 1)", [1, 1, 4, 6], True, "valid"),
    ("6 * 4 / 1 / 1 = 24", [1, 1, 4, 6], True, "valid"),
    ("8 / (3 - 8 / 3)", [3, 3, 8, 8], True, "valid"),  # needs exact fractions: 8 / (1/3)
    ("(5 - 1 / 5) * 5", [1, 5, 5, 5], True, "valid"),
    ("\\boxed{(10 - 4) \\times 4 \\times 1}", [1, 4, 4, 10], True, "valid"),
    ("[(13 - 9) × (2 + 4)]", [2, 4, 9, 13], True, "valid"),
    ("6 ÷ (1 - 3 / 4)", [1, 3, 4, 6], True, "valid"),
    ("6 * 4", [1, 1, 4, 6], False, "uses numbers"),  # numbers missing
    ("6 * 4 * 1 * 1 * 1", [1, 1, 4, 6], False, "uses numbers"),  # 1 used three times
    ("(6 + 6) * (1 + 1)", [1, 1, 4, 6], False, "uses numbers"),  # 6 reused, 4 unused
    ("64 / 2 - 8", [2, 4, 6, 8], False, "uses numbers"),  # digits glued into a new number
    ("(6 - 1) * 4 + 1", [1, 1, 4, 6], False, "evaluates to 21"),
    ("(6 - 1 - 1) * 4", [1, 1, 4, 6], False, "evaluates to 16"),
    ("(1 + 4) / 6 * 1", [1, 1, 4, 6], False, "evaluates to 5/6"),
    ("6 / (1 - 1) + 4", [1, 1, 4, 6], False, "division by zero"),
    ("-1 + 1 + 6 * 4", [1, 1, 4, 6], False, "unary"),
    ("6 ** 1 * 4 * 1", [1, 1, 4, 6], False, "unexpected"),
    ("__import__('os')", [1, 1, 4, 6], False, "unexpected character"),
    ("(6 - 1 - 1 * 4", [1, 1, 4, 6], False, "ends early"),
    ("(6 * 4 1) * 1", [1, 1, 4, 6], False, "unbalanced"),
    ("6 * 4) * 1 * 1", [1, 1, 4, 6], False, "after a complete expression"),
    ("6 * 4 * 1.0 * 1", [1, 1, 4, 6], False, "unexpected character"),
    ("", [1, 1, 4, 6], False, "empty"),
])
def test_game24(expression, numbers, valid, reason_fragment):
    check = rewards.check_game24(expression, numbers)
    assert check.valid is valid
    assert reason_fragment in check.reason


def test_game24_score_reads_numbers_from_gold():
    assert rewards.score_answer("6 * 4 * (1 * 1)", "[1, 1, 4, 6]", "game24") == 1.0
    assert rewards.score_answer("(1 * 1) * 6 * 4", "1 1 4 6", "game24") == 1.0
    assert rewards.score_answer("6 * 4 * (1 * 1)", "1 2 4 6", "game24") == 0.0


@pytest.mark.parametrize("kind", ["exact", "f1", "math", "choice", "game24"])
def test_missing_answer_scores_zero(kind):
    assert rewards.score_answer(None, "1 1 4 6", kind) == 0.0


def test_unknown_kind_and_missing_judge():
    with pytest.raises(ValueError, match="unknown score kind"):
        rewards.score_answer("x", "x", "fuzzy")
    with pytest.raises(ValueError, match="judge=LLMJudge"):
        rewards.score_answer("x", "x", "judge")


def test_judge_parses_verdicts_and_records_malformed_output():
    replies = iter(["Same number.\nVerdict: True", "Different city.\nVerdict: **false**", "I think they match",
                    "verdict: false ... on reflection Verdict: True"])
    engine = ScriptedEngine(lambda request: next(replies))
    judge = rewards.LLMJudge(engine)
    verdicts = judge.judge_many([("0.75", "3/4", "What is 3/4?"), ("Lyon", "Paris", None), ("x", "y", None),
                                 (None, "y", None), ("a", "b", None)])
    assert [v.correct for v in verdicts] == [True, False, False, False, True]
    assert "malformed" in verdicts[2].reason and "I think they match" in verdicts[2].reason
    assert verdicts[3].reason == "no answer"
    assert len(engine.requests) == 4  # the None answer never reaches the engine
    first = engine.requests[0]
    user = first.messages[-1]["content"]
    assert "What is 3/4?" in user and "Gold answer: 3/4" in user and "Candidate answer: 0.75" in user
    assert first.messages[0]["role"] == "system" and first.temperature == 0.0


def test_score_with_judge():
    engine = ScriptedEngine(lambda request: Generation(text="Verdict: True"))
    judge = rewards.LLMJudge(engine)
    assert rewards.score_answer("Barack Obama", "Obama", "judge", judge=judge, question="Who?") == 1.0
    assert rewards.score_answer(None, "Obama", "judge", judge=judge) == 0.0
    assert len(engine.requests) == 1
