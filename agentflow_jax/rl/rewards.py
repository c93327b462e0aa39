"""The one scorer module: the final-outcome reward of a trajectory (RL), the accuracy of an evaluation
item, and the warm start's reports all score answers here.

All scorers take the answer extracted from the generator's `<answer>` and the gold answer. Several
gold answers may be joined with "; " (SPEC section 3); matching any one counts (token F1 takes the
best). A reply without `<answer>` is still scored (`answer_from_reply`): the judge reads the whole
reply, as the reference implementation's judge does, and each exact scorer reads what it would look
for in free text (below). Only an empty reply (None) scores 0.

  kind      rule
  exact     SQuAD normalisation (lowercase, no punctuation, no articles, single spaces), then equality
  f1        token F1 of the normalised texts
  math      numeric equivalence: ints, decimals, fractions (3/4, \\frac{3}{4}), thousands commas,
            percentages (50% matches 50 and 0.5), \\boxed{}, $...$, "x = 5", trailing units ("12 cm");
            otherwise equality of the cleaned LaTeX with whitespace removed
  choice    multiple-choice letter: "(B)", "B.", "B) text", "answer is B", or an option's text when
            `choices` are given
  game24    exact Game-of-24 check: the expression uses each given number exactly once, only
            + - * / and parentheses, and equals 24 in exact rational arithmetic (safe parser, no eval);
            the gold answer holds the puzzle's numbers ("4 7 8 8", "[4, 7, 8, 8]")
  judge     an LLM (`LLMJudge`) decides whether the answer is equivalent to the gold answer; its reply
            may take any of the forms `parse_verdict` reads

  without <answer>   what is scored
  judge, exact, f1   the whole reply (the judge finds the final answer in it; exact match then
                     fails on prose, F1 gives partial credit)
  math               the last \\boxed{...}, else the last number written in the reply
  choice             the last line of the reply that names an option letter
  game24             the last arithmetic expression in the reply
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import string
from fractions import Fraction
from typing import Any, Mapping, Sequence

import numpy as np

from agentflow_jax.engines import Engine, GenerationRequest

SCORE_KINDS = ("exact", "f1", "math", "choice", "game24", "judge")
GOLD_SEPARATOR = "; "

Choices = Sequence[str] | Mapping[str, str]
"""Option texts in letter order (A, B, ...) or a letter -> text mapping."""


def score_answer(answer: str | None, gold: str, kind: str, *, choices: Choices | None = None,
          judge: LLMJudge | None = None, question: str | None = None) -> float:
    """Scores one answer in [0, 1] with the rule `kind` (module docstring); None scores 0.

    Args:
      answer: the extracted answer, or None when the generator gave none.
      gold: the gold answer(s), several joined with "; " (for "game24": the puzzle's numbers).
      kind: one of SCORE_KINDS.
      choices: the options of a multiple-choice item ("choice" only).
      judge: the LLM judge ("judge" only).
      question: shown to the judge for context ("judge" only).
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {kind!r}; expected one of {SCORE_KINDS}")
    if kind == "judge" and judge is None:
        raise ValueError('score_answer(kind="judge") needs judge=LLMJudge(engine)')
    if answer is None:
        return 0.0
    if kind == "game24":
        return float(check_game24(answer, game24_numbers(gold)).valid)
    if kind == "judge":
        return float(judge.judge(answer, gold, question=question).correct)
    golds = split_gold(gold)
    if kind == "exact":
        return float(any(exact_match(answer, g) for g in golds))
    if kind == "f1":
        return max(token_f1(answer, g) for g in golds)
    if kind == "math":
        return float(any(math_equivalent(answer, g) for g in golds))
    return float(any(choice_matches(answer, g, choices) for g in golds))  # "choice"


def score_trajectories(trajectories: Sequence[Any], queries: Sequence[Mapping[str, Any]], *,
                       judge: LLMJudge | None = None) -> np.ndarray:
    """[len(trajectories)] float32 rewards: each trajectory's answer scored against its query's gold answer.

    `trajectories` have `.query_id` (index into `queries`), `.answer` (the `<answer>` text or None)
    and `.generator_text` (the whole reply, scored through `answer_from_reply` when there is no
    `<answer>`); a query record has "query", "answer", optional "kind" (default "exact") and
    "choices". Rows scored by the judge are sent in one batched call.
    """
    return np.asarray([s.score for s in score_details(trajectories, queries, judge=judge)], np.float32)


@dataclasses.dataclass(frozen=True)
class ScoredAnswer:
    """One trajectory's score, the text that was scored, and the judge's verdict when it judged."""

    score: float
    scored_text: str | None
    verdict: JudgeVerdict | None = None


def score_details(trajectories: Sequence[Any], queries: Sequence[Mapping[str, Any]], *,
                  judge: LLMJudge | None = None) -> list[ScoredAnswer]:
    """`score_trajectories` with what each score was computed from (for evaluation reports)."""
    details: list[ScoredAnswer | None] = [None] * len(trajectories)
    judged = []
    for index, trajectory in enumerate(trajectories):
        query = queries[trajectory.query_id]
        kind = query.get("kind", "exact")
        text = trajectory.answer if trajectory.answer is not None else answer_from_reply(
            trajectory.generator_text, kind)
        if kind == "judge":
            judged.append((index, text))
            continue
        details[index] = ScoredAnswer(score_answer(text, query["answer"], kind, choices=query.get("choices")), text)
    if judged:
        if judge is None:
            raise ValueError(f'{len(judged)} queries are scored by kind "judge" but no judge engine is configured')
        items = [(text, queries[trajectories[i].query_id]["answer"], queries[trajectories[i].query_id]["query"])
                 for i, text in judged]
        for (index, text), verdict in zip(judged, judge.judge_many(items)):
            details[index] = ScoredAnswer(float(verdict.correct), text, verdict)
    return details


def answer_from_reply(reply: str | None, kind: str) -> str | None:
    """What scorer `kind` reads from a generator reply that has no `<answer>` tag (module docstring);
    None when the reply is empty or holds nothing of the kind."""
    if reply is None or not reply.strip():
        return None
    reply = reply.strip()
    if kind == "math":
        boxed = _last_braced(reply, "\\boxed")
        if boxed is not None:
            return boxed
        numbers = _LOOSE_NUMBER.findall(_THOUSANDS_COMMA.sub("", reply))
        return numbers[-1] if numbers else None
    if kind == "choice":
        return next((line for line in reversed(reply.splitlines()) if choice_letter(line) is not None), None)
    if kind == "game24":
        boxed = _last_braced(reply, "\\boxed")
        if boxed is not None:
            return boxed
        expressions = [e.strip() for e in _ARITHMETIC_RUN.findall(_game24_symbols(reply)) if _OPERATOR.search(e)]
        return expressions[-1] if expressions else None
    return reply


def split_gold(gold: str) -> list[str]:
    """Gold answers joined with "; " -> the list of non-empty answers (the whole string if one)."""
    parts = [part.strip() for part in gold.split(GOLD_SEPARATOR)]
    return [part for part in parts if part] or [gold.strip()]


# ----------------------------------------------------------------------------- open QA

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> bool:
    """Equality after `squad_normalize`."""
    return squad_normalize(prediction) == squad_normalize(gold)


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after `squad_normalize` (SQuAD F1)."""
    predicted, expected = squad_normalize(prediction).split(), squad_normalize(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------- math

_LATEX_SPACING = re.compile(r"\\[!,;: ]|\\left|\\right|\\displaystyle")
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(
    r"^(?P<sign>[-+]?)\s*"
    r"(?:\\frac\{(?P<frac_num>\d+(?:\.\d+)?)\}\{(?P<frac_den>\d+(?:\.\d+)?)\}"
    r"|(?P<num>\d+(?:\.\d+)?)\s*/\s*(?P<den>\d+(?:\.\d+)?)"
    r"|(?P<decimal>\d+(?:\.\d*)?|\.\d+))"
    r"\s*(?P<percent>%)?"
    r"\s*(?:[a-zA-Z][\w^./]*(?:\s+[a-zA-Z][\w^./]*)?)?$")  # at most two unit words: "12 cm", "3 square feet"


_LOOSE_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")


def math_equivalent(prediction: str, gold: str) -> bool:
    """Numeric equivalence in exact rational arithmetic; cleaned-LaTeX equality when not numbers."""
    predicted, expected = clean_math_answer(prediction), clean_math_answer(gold)
    predicted_values, expected_values = _number_readings(predicted), _number_readings(expected)
    if predicted_values and expected_values:
        return bool(predicted_values & expected_values)
    return re.sub(r"\s+", "", predicted).lower() == re.sub(r"\s+", "", expected).lower()


def clean_math_answer(text: str) -> str:
    """The final value of a math answer: \\boxed content, no $ / \\( \\), right side of "=", plain LaTeX."""
    text = _last_braced(text, "\\boxed") or _last_braced(text, "\\fbox") or text
    for delimiter in ("$", "\\(", "\\)", "\\[", "\\]"):
        text = text.replace(delimiter, "")
    text = text.replace("−", "-")
    text = text.rsplit("=", 1)[-1]
    text = _LATEX_SPACING.sub("", text).replace("\\%", "%").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _DEGREES.sub("", _LATEX_TEXT.sub(r" \1", text))
    text = _THOUSANDS_COMMA.sub("", text)
    return text.strip().rstrip(".").strip()


def parse_number(text: str) -> tuple[Fraction, bool] | None:
    """A cleaned answer -> (exact value, written as a percentage), or None if it is not a number."""
    match = _NUMBER.match(text.strip())
    if match is None:
        return None
    if match["frac_num"] is not None:
        numerator, denominator = Fraction(match["frac_num"]), Fraction(match["frac_den"])
    elif match["num"] is not None:
        numerator, denominator = Fraction(match["num"]), Fraction(match["den"])
    else:
        numerator, denominator = Fraction(match["decimal"]), Fraction(1)
    if denominator == 0:
        return None
    value = numerator / denominator
    return (-value if match["sign"] == "-" else value), match["percent"] is not None


def _number_readings(cleaned: str) -> set[Fraction]:
    """The values a cleaned answer may mean: {x}, or {x, x/100} for "x%"; empty if not a number."""
    parsed = parse_number(cleaned)
    if parsed is None:
        return set()
    value, is_percent = parsed
    return {value, value / 100} if is_percent else {value}


def _last_braced(text: str, command: str) -> str | None:
    """Content of the last `command{...}` with balanced braces, or None."""
    start = text.rfind(command + "{")
    if start < 0:
        return None
    depth, begin = 0, start + len(command)
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin + 1:index]
    return None


# ----------------------------------------------------------------------------- multiple choice

_LETTERS = "ABCDEFGHIJ"
_WHOLE_LETTER = re.compile(r"^\(?([A-Ja-j])\)?[.:)]?$")
_STATED_LETTER = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*\(?([A-J])\b\)?")
_LEADING_LETTER = re.compile(r"^\(?([A-J])[.:)]\s")
_PARENTHESISED_LETTER = re.compile(r"\(([A-J])\)")
_OPTION_PREFIX = re.compile(r"^\(?[A-J][.:)]\s*")


def choice_letter(text: str, choices: Choices | None = None) -> str | None:
    """The option letter an answer names, or None.

    Tried in order: the text of one of `choices` (normalised equality, so "J. K. Rowling" is an
    option, not the letter J); the whole answer is a letter ("B", "(b)", "B."); "answer is B" /
    "Option: (C)"; a leading "B." or "(B) text"; the first "(B)" anywhere.
    """
    cleaned = text.replace("*", "").strip()
    if choices is not None:
        wanted = squad_normalize(cleaned)
        for letter, option in _options(choices).items():
            if wanted and wanted in (squad_normalize(option), squad_normalize(_OPTION_PREFIX.sub("", option))):
                return letter
    for pattern in (_WHOLE_LETTER, _STATED_LETTER, _LEADING_LETTER, _PARENTHESISED_LETTER):
        match = pattern.search(cleaned)
        if match:
            return match[1].upper()
    return None


def choice_matches(answer: str, gold: str, choices: Choices | None = None) -> bool:
    """Whether the answer names the gold option (gold: a letter or, with `choices`, an option's text)."""
    gold_letter = choice_letter(gold, choices)
    if gold_letter is None:
        return exact_match(answer, gold)
    return choice_letter(answer, choices) == gold_letter


def _options(choices: Choices) -> dict[str, str]:
    if isinstance(choices, Mapping):
        return {letter.strip().upper(): text for letter, text in choices.items()}
    if len(choices) > len(_LETTERS):
        raise ValueError(f"at most {len(_LETTERS)} choices are supported, got {len(choices)}")
    return dict(zip(_LETTERS, choices))


# ----------------------------------------------------------------------------- Game of 24

@dataclasses.dataclass(frozen=True)
class Game24Check:
    """Verdict of `check_game24`: valid, or the reason it is not."""

    valid: bool
    reason: str


class _InvalidExpression(ValueError):
    pass


_GAME24_SYMBOLS = {"×": "*", "\\times": "*", "\\cdot": "*", "÷": "/", "\\div": "/",
                   "−": "-", "–": "-", "[": "(", "]": ")", "\\left": "", "\\right": "", "$": ""}
_GAME24_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")
_LETTER_TIMES = re.compile(r"(?<=[\d)\s])[xX](?=[\s\d(])")  # "6 x 4", "(1+1)x8"; not the x of a word
_TARGET = Fraction(24)


_ARITHMETIC_RUN = re.compile(r"[\d\s+\-*/()]*\d[\d\s+\-*/()]*")
_OPERATOR = re.compile(r"\d\s*[-+*/]\s*[\d(]|\)\s*[-+*/]")


def _game24_symbols(text: str) -> str:
    """`text` with the usual operator spellings (×, ÷, \\times, [ ]) as + - * / ( )."""
    for symbol, replacement in _GAME24_SYMBOLS.items():
        text = text.replace(symbol, replacement)
    return _LETTER_TIMES.sub("*", text)


def game24_numbers(gold: str) -> list[int]:
    """The puzzle's numbers from a gold string: every integer in it ("4 7 8 8", "[4, 7, 8, 8]")."""
    return [int(n) for n in re.findall(r"\d+", gold)]


def check_game24(expression: str, numbers: Sequence[int]) -> Game24Check:
    """Whether `expression` uses each of `numbers` exactly once, only + - * / ( ), and equals 24 exactly.

    A trailing "= 24" (or leading "24 =") is ignored; ×, ÷, \\times, \\div and [ ] are accepted as
    the usual operators and brackets. Unary signs and non-integer literals are not allowed.
    """
    text = _game24_symbols(_last_braced(expression, "\\boxed") or expression)
    text = re.sub(r"^\s*24\s*=|=\s*24\s*\.?\s*$", "", text.strip())
    try:
        tokens = _tokenize_game24(text)
        value, literals = _Game24Parser(tokens).parse()
    except _InvalidExpression as e:
        return Game24Check(False, str(e))
    if sorted(literals) != sorted(numbers):
        return Game24Check(False, f"uses numbers {sorted(literals)}, the puzzle gives {sorted(numbers)}")
    if value != _TARGET:
        return Game24Check(False, f"evaluates to {value}, not 24")
    return Game24Check(True, "valid")


def _tokenize_game24(text: str) -> list[str]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _GAME24_TOKEN.match(text, position)
        if match is None:
            raise _InvalidExpression(f"unexpected character {text[position:].lstrip()[:1]!r} in {text!r}")
        tokens.append(match[1] or match[2])
        position = match.end()
    if not tokens:
        raise _InvalidExpression("empty expression")
    return tokens


class _Game24Parser:
    """Recursive descent over tokens: expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*;
    factor := integer | '(' expr ')'. Values are exact Fractions."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.position, self.literals = tokens, 0, []

    def parse(self) -> tuple[Fraction, list[int]]:
        value = self._expression()
        if self.position != len(self.tokens):
            raise _InvalidExpression(f"unexpected {self.tokens[self.position]!r} after a complete expression")
        return value, self.literals

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise _InvalidExpression("expression ends early")
        self.position += 1
        return token

    def _expression(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            value = value + self._term() if self._take() == "+" else value - self._term()
        return value

    def _term(self) -> Fraction:
        value = self._factor()
        while self._peek() in ("*", "/"):
            if self._take() == "*":
                value *= self._factor()
                continue
            divisor = self._factor()
            if divisor == 0:
                raise _InvalidExpression("division by zero")
            value /= divisor
        return value

    def _factor(self) -> Fraction:
        token = self._take()
        if token.isdigit():
            self.literals.append(int(token))
            return Fraction(int(token))
        if token == "(":
            value = self._expression()
            if self._take() != ")":
                raise _InvalidExpression("unbalanced parentheses")
            return value
        if token in ("+", "-"):
            raise _InvalidExpression(f"unary {token!r} is not allowed")
        raise _InvalidExpression(f"unexpected {token!r}")


# ----------------------------------------------------------------------------- LLM judge

@dataclasses.dataclass(frozen=True)
class JudgeVerdict:
    """The judge's decision, why (the judge's words or the parsing failure), and its raw output."""

    correct: bool
    reason: str
    raw: str = ""


JUDGE_SYSTEM_PROMPT = (
    "You check answers against a reference. You are given a question, its gold answer and a candidate "
    "answer; the candidate may be a short answer or a whole reply with reasoning, in which case only the "
    "final answer it commits to counts. Say whether that final answer means the same as the gold answer. "
    "Count as the same: equal numbers in any notation (3/4, 0.75, \\frac{3}{4}; 1,000 and 1000), the same "
    "entity under a fuller or shorter name, differences of case, articles, punctuation or units, and a "
    "multiple-choice letter together with its option's text. The gold answer may list alternatives "
    "separated by '; ': matching one of them is enough. A candidate that hedges between several answers, "
    "or gives none, is not the same. Write one or two sentences of analysis, then a last line that is "
    "exactly 'Verdict: True' or 'Verdict: False'.")

# Words a judge writes for its decision (parse_verdict); "not"/"no"/"n't" before a positive word negates it.
_POSITIVE = ("true", "yes", "correct", "equivalent", "right", "same", "match", "matches", "consistent")
_NEGATIVE = ("false", "no", "incorrect", "wrong", "inequivalent", "different", "mismatch", "inconsistent")
_VERDICT_WORD = re.compile(r"\b(" + "|".join(_POSITIVE + _NEGATIVE) + r")\b", re.IGNORECASE)
_NEGATION = re.compile(r"(?:\bnot|\bno|n't|\bnever)\s+(?:(?:the|a|an|quite|exactly|fully)\s+)*$", re.IGNORECASE)
_VERDICT_LABEL = re.compile(
    r"(?:verdict|judge?ment|decision|final answer|answer|result|true_false|true/false|correct|equivalent)"
    r"\s*[*_>]*\s*(?::|=|：|-|is)\s*[*_`\"'\[(\s]*(\w+(?:\s+\w+)?)", re.IGNORECASE)
_VERDICT_KEYS = ("verdict", "correct", "iscorrect", "truefalse", "equivalent", "isequivalent", "judgement",
                 "judgment", "decision", "match", "result", "label")


class LLMJudge:
    """Asks any `Engine` whether an answer is equivalent to the gold answer (the paper's reward judge).

    Engine failures (EngineError) propagate; a reply in which `parse_verdict` finds no decision counts
    as incorrect, with the reason recorded in the verdict.
    """

    def __init__(self, engine: Engine, *, max_new_tokens: int = 256):
        self.engine = engine
        self.max_new_tokens = max_new_tokens

    def judge(self, answer: str | None, gold: str, *, question: str | None = None) -> JudgeVerdict:
        """One verdict; see `judge_many`."""
        return self.judge_many([(answer, gold, question)])[0]

    def judge_many(self, items: Sequence[tuple[str | None, str, str | None]]) -> list[JudgeVerdict]:
        """Verdicts for (answer, gold, question-or-None) items, with one batched engine call."""
        to_ask = [index for index, (answer, _, _) in enumerate(items) if answer is not None]
        replies = self.engine.generate([self._request(*items[index]) for index in to_ask]) if to_ask else []
        verdicts = [JudgeVerdict(False, "no answer")] * len(items)
        for index, reply in zip(to_ask, replies):
            verdicts[index] = parse_verdict(reply.text)
        return verdicts

    def _request(self, answer: str, gold: str, question: str | None) -> GenerationRequest:
        lines = [f"Question: {question}"] if question else []
        lines += [f"Gold answer: {gold}", f"Candidate answer: {answer}"]
        return GenerationRequest(messages=({"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                                           {"role": "user", "content": "\n".join(lines)}),
                                 max_new_tokens=self.max_new_tokens, temperature=0.0)


def parse_verdict(text: str) -> JudgeVerdict:
    """The judge's decision from the forms models write; anything else counts as incorrect, reason recorded.

    Tried in order: a JSON object with a verdict key ({"correct": true}, {"verdict": "True"},
    {"true_false": "yes"}; the last such object); the last labelled decision ("Verdict: True",
    "**Verdict:** **false**", "<true_false>: True", "Answer: yes", "Final answer: incorrect"); the
    last decision word of the last line that has one ("So the candidate is correct.", "No.", "They
    are not equivalent."). Decision words: true/yes/correct/equivalent/right/same/match(es)/consistent
    and false/no/incorrect/wrong/inequivalent/different/mismatch/inconsistent; "not", "no" or "n't"
    before a positive word makes it negative.
    """
    decided = _verdict_from_json(text)
    if decided is None:
        matches = _VERDICT_LABEL.finditer(text.replace("**", ""))
        labelled = [_decision(m[1].split()[0], text[:m.start(1)]) for m in matches]
        labelled = [d for d in labelled if d is not None]
        decided = labelled[-1] if labelled else None
    if decided is None:
        for line in reversed([line for line in text.replace("**", "").splitlines() if line.strip()]):
            words = [_decision(m[1], line[:m.start()]) for m in _VERDICT_WORD.finditer(line)]
            if words:
                decided = words[-1]
                break
    if decided is None:
        snippet = text.strip()[:200]
        return JudgeVerdict(False, f"malformed judge output (no verdict such as 'Verdict: True'): {snippet!r}", text)
    return JudgeVerdict(decided, text.strip(), text)


def _decision(word: str, before: str) -> bool | None:
    """True / False for a decision word (negated by what precedes it), None for any other word."""
    word = word.lower().strip("*_`'\".,;:!)]")
    if word in _NEGATIVE:
        return False
    if word in _POSITIVE:
        return _NEGATION.search(before) is None
    return None


def _verdict_from_json(text: str) -> bool | None:
    """The decision of the last JSON object in `text` that has a verdict key (any spelling), or None."""
    decoder = json.JSONDecoder()
    found = None
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            for key, field in value.items():
                if re.sub(r"[^a-z]", "", str(key).lower()) in _VERDICT_KEYS:
                    decision = field if isinstance(field, bool) else _decision(str(field), "")
                    if decision is not None:
                        found = decision
                        break
        start = text.find("{", end)
    return found
