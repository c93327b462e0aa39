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
    replies = iter(["Same number.\nVerdict: True", "Different city.\nVerdict: **false**", "Let me think about it",
                    "verdict: false ... on reflection Verdict: True"])
    engine = ScriptedEngine(lambda request: next(replies))
    judge = rewards.LLMJudge(engine)
    verdicts = judge.judge_many([("0.75", "3/4", "What is 3/4?"), ("Lyon", "Paris", None), ("x", "y", None),
                                 (None, "y", None), ("a", "b", None)])
    assert [v.correct for v in verdicts] == [True, False, False, False, True]
    assert "malformed" in verdicts[2].reason and "Let me think about it" in verdicts[2].reason
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


# ----------------------------------------------------------------------------- judge verdicts as models write them

@pytest.mark.parametrize("reply, correct", [
    ("Verdict: True", True),
    ("The numbers agree.\nVerdict: False", False),
    ("**Verdict:** **True**", True),
    ("**Verdict**: false", False),
    ("<analysis>: same person\n<true_false>: True", True),
    ("Yes", True),
    ("No.", False),
    ("yes, they refer to the same city", True),
    ("True", True),
    ("false", False),
    ("Correct", True),
    ("Incorrect.", False),
    ('{"correct": true}', True),
    ('{"correct": false, "reason": "different year"}', False),
    ('```json\n{"verdict": "True", "analysis": "0.75 = 3/4"}\n```', True),
    ('{"analysis": "x", "true_false": "False"}', False),
    ('{"is_correct": "yes"}', True),
    ("The candidate names the same person as the gold answer, so it is correct.", True),
    ("Both describe 1642; the answers are equivalent.", True),
    ("The candidate says 1643 while the gold says 1642. Therefore the answer is incorrect.", False),
    ("They are not equivalent.", False),
    ("The candidate's answer isn't correct.", False),
    ("The answer does not match.", False),
    ("Final answer: yes", True),
    ("Judgement - wrong", False),
    ("Verdict: false\nOn reflection the units differ only.\nVerdict: True", True),
])
def test_parse_verdict_reads_the_forms_models_write(reply, correct):
    verdict = rewards.parse_verdict(reply)
    assert verdict.correct is correct and "malformed" not in verdict.reason
    assert verdict.raw == reply


@pytest.mark.parametrize("reply", ["", "Let me think about it.", "{}", '{"analysis": "hmm"}'])
def test_parse_verdict_without_a_decision_is_incorrect_and_says_so(reply):
    verdict = rewards.parse_verdict(reply)
    assert verdict.correct is False and verdict.reason.startswith("malformed judge output")


def test_judge_prompt_is_ours_and_asks_for_the_verdict_line():
    assert rewards.JUDGE_SYSTEM_PROMPT.endswith("'Verdict: True' or 'Verdict: False'.")
    assert "final answer it commits to" in rewards.JUDGE_SYSTEM_PROMPT  # whole replies may be judged


# ----------------------------------------------------------------------------- every scorer: right, wrong, malformed, missing

@pytest.mark.parametrize("kind, gold, right, wrong, malformed", [
    ("exact", "Barack Obama", "barack obama.", "Joe Biden", ""),
    ("f1", "Barack Obama", "Barack Obama", "Joe Biden", "!!!"),
    ("math", "3/4", "\\boxed{0.75}", "\\boxed{0.7}", "\\frac{3}{"),
    ("choice", "C", "(C)", "(A)", "none of them"),
    ("game24", "4 7 8 8", "(7 - 8 / 8) * 4", "(7 + 8 / 8) * 4", "7 * 8 ** 8 - 4"),
])
def test_each_scorer_on_right_wrong_malformed_and_missing(kind, gold, right, wrong, malformed):
    assert rewards.score_answer(right, gold, kind) == 1.0
    assert rewards.score_answer(wrong, gold, kind) == 0.0
    assert rewards.score_answer(malformed, gold, kind) == 0.0
    assert rewards.score_answer(None, gold, kind) == 0.0


@pytest.mark.parametrize("expression, reason_fragment", [
    ("The answer is 24", "unexpected character"),
    ("sqrt(16) * 6", "unexpected character"),
    ("4! - 7 + 8 - 1", "unexpected character"),
    ("8 ^ 2 - 7 * 4 - 8", "unexpected character"),
])
def test_game24_rejects_non_arithmetic(expression, reason_fragment):
    check = rewards.check_game24(expression, [4, 7, 8, 8])
    assert not check.valid and reason_fragment in check.reason


# ----------------------------------------------------------------------------- replies without <answer>

@pytest.mark.parametrize("reply, kind, scored", [
    ("The capital is Paris.", "judge", "The capital is Paris."),
    ("  Paris  ", "exact", "Paris"),
    ("First 3 + 4 = 7, then 7 * 2 = 14.\nSo the total is 14 apples.", "math", "14"),
    ("We get $\\boxed{\\frac{3}{4}}$, i.e. about 0.75 of 1", "math", "\\frac{3}{4}"),
    ("The population is 1,234,567.", "math", "1234567"),
    ("Option A is wrong.\nB fits best.\nThe answer is (C).\nHope this helps!", "choice", "The answer is (C)."),
    ("Try (1 + 1 + 1) × 8 = 24, which works.", "game24", "(1 + 1 + 1) * 8"),
    ("Using 6 x 4 x (1 x 1) we reach 24.", "game24", "6 * 4 * (1 * 1)"),
    ("", "judge", None),
    ("I cannot tell.", "math", None),
    ("No idea.", "game24", None),
])
def test_answer_from_reply(reply, kind, scored):
    assert rewards.answer_from_reply(reply, kind) == scored


class _Trajectory:
    def __init__(self, query_id, answer, generator_text):
        self.query_id, self.answer, self.generator_text = query_id, answer, generator_text


def test_a_reply_without_answer_tags_is_scored_and_the_judge_sees_the_whole_reply():
    queries = [{"query": "Who wrote Hamlet?", "answer": "Shakespeare", "kind": "judge"},
               {"query": "2 + 2?", "answer": "4", "kind": "math"},
               {"query": "Pick", "answer": "B", "kind": "choice"},
               {"query": "1 1 4 6", "answer": "1 1 4 6", "kind": "game24"},
               {"query": "Who?", "answer": "Obama", "kind": "exact"}]
    engine = ScriptedEngine(lambda request: "Verdict: True")
    trajectories = [_Trajectory(0, None, "It was written by William Shakespeare around 1600."),
                    _Trajectory(1, None, "2 + 2 makes 4"),
                    _Trajectory(2, None, "I choose (B)"),
                    _Trajectory(3, None, "6 * 4 * 1 * 1 = 24"),
                    _Trajectory(4, "Obama", "<answer>Obama</answer>"),
                    _Trajectory(1, None, "")]
    scores = rewards.score_trajectories(trajectories, queries, judge=rewards.LLMJudge(engine))
    assert scores.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    (request,) = engine.requests
    assert "Candidate answer: It was written by William Shakespeare around 1600." in request.messages[-1]["content"]
    details = rewards.score_details(trajectories, queries, judge=rewards.LLMJudge(engine))
    assert [d.scored_text for d in details] == [trajectories[0].generator_text, "4", "I choose (B)",
                                                "6 * 4 * 1 * 1", "Obama", None]
    assert details[0].verdict.correct and details[1].verdict is None
