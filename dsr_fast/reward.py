"""Math reward: DeepScaleR's rule-based grader, ported (reward 1.0 if correct, else 0.0).

Algorithm (DeepScaleR ``deepscaler_reward_fn`` / ``RewardMathFn``, see
``../shared/reference/recipe.md`` section 2.2):

1. Think gate: the solution is the text after the first ``</think>`` (up to a second one).
2. Prediction: the content of the last ``\\boxed{...}`` (brace-matched).  The original
   looks for ``\\fbox`` only when ``\\boxed`` is absent, but it returns early in that
   case, and ``\\boxed 5`` (no brace) is not accepted, so in practice only ``\\boxed{}`` counts.
3. Ground truth: a string, a number (through ``str()``, so ``142.0`` is ``"142.0"``) or a
   list of acceptable answers; ``\\boxed`` ground truths are extracted like predictions.
4. Match against any ground truth item: ``grade_answer_mathd`` (Hendrycks normaliser, string
   equality) or ``grade_answer_sympy`` (PRM800K normaliser, then per tuple element: exact
   match for fractions, no integer-vs-non-integer matches, else ``simplify(gold - pred) == 0``
   behind ``should_allow_eval``).  No numeric tolerance anywhere.

Deliberate deviations from the original:

1. The think gate needs ``</think>`` only, not ``<think>`` as well: chat templates put
   ``<think>`` in the prompt, and evaluation decodes the response alone.
2. An answer that is empty or whitespace-only, or that a normaliser maps to the empty
   string, never matches (the original grades ``""`` vs ``""`` as correct).
3. Model text is never executed.  The original parses with sympy's ``parse_expr``, which
   calls Python ``eval``; :mod:`dsr_fast.safe_sympy` is a whitelisted recursive-descent
   parser instead (anything outside the whitelist is "not equal", as a parse exception is
   in the original).
4. Bounded work: answers longer than :data:`MAX_ANSWER_CHARS` are wrong, and the sympy
   parser rejects long inputs, huge powers/factorials and high-degree expressions, so
   ``simplify`` only ever sees small expressions (the original has no timeout).
5. Inputs on which the original would raise rather than answer are simply "not equal"
   (e.g. ``nan``, where ``int(round(nan))`` raises ``ValueError``); ``None`` items of a
   ground-truth list are dropped (recipe section 2.2) rather than becoming ``"None"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Union

import sympy

from dsr_fast.math_normalize import (
    is_fraction_string,
    is_integer_string,
    normalize_mathd,
    normalize_sympy,
    should_allow_eval,
    split_tuple,
)
from dsr_fast.safe_sympy import UnsupportedExpression, parse_sympy_expression

THINK_END = "</think>"
# Far above any real answer (the longest gold in the test sets is ~200 chars); keeps the
# regexes and pylatexenc of the normalisers cheap on runaway outputs.
MAX_ANSWER_CHARS = 5_000

GroundTruth = Union[str, int, float, Iterable[Union[str, int, float, None]], None]


# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------


def last_boxed_only_string(text: str) -> str | None:
    """``\\boxed{...}`` (or ``\\fbox...``) of the last occurrence, braces matched; None if unclosed."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start : index + 1]
    return None


def remove_boxed(boxed: str | None) -> str | None:
    prefix = "\\boxed{"
    if boxed is None or not boxed.startswith(prefix) or not boxed.endswith("}"):
        return None
    return boxed[len(prefix) : -1]


def extract_boxed_answer(passage: str) -> str | None:
    """Content of the last ``\\boxed{}`` in ``passage`` (no think gate); None if absent."""
    if "\\boxed" not in passage:
        return None
    return remove_boxed(last_boxed_only_string(passage))


def extract_answer(text: str) -> str | None:
    """The last ``\\boxed{}`` answer after the first ``</think>``; None without either."""
    if THINK_END not in text:
        return None
    solution = text.split(THINK_END)[1]
    return extract_boxed_answer(solution)


# ---------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------


def grade_answer_mathd(pred: str, gold: str) -> bool:
    normalized_gold = normalize_mathd(gold)
    normalized_pred = normalize_mathd(pred)
    return bool(normalized_pred) and normalized_gold == normalized_pred


def grade_answer_sympy(pred: str, gold: str) -> bool:
    normalized_gold = normalize_sympy(gold)
    normalized_pred = normalize_sympy(pred)
    if not normalized_gold or not normalized_pred:  # deviation 2: "" never matches
        return False
    if normalized_gold == normalized_pred:
        return True

    gold_elements = split_tuple(normalized_gold)
    pred_elements = split_tuple(normalized_pred)
    # Intervals/tuples must use the same brackets: "(0,1]" is not "[0,1)".
    if len(gold_elements) > 1 and (
        normalized_gold[0] != normalized_pred[0] or normalized_gold[-1] != normalized_pred[-1]
    ):
        return False
    if len(gold_elements) != len(pred_elements):
        return False
    return all(_elements_match(g, p) for g, p in zip(gold_elements, pred_elements))


def _elements_match(gold: str, pred: str) -> bool:
    if is_fraction_string(gold) and is_fraction_string(pred):
        # Unreduced fractions must not pass, so no simplify() here.
        return gold == pred
    if is_integer_string(gold) != is_integer_string(pred):
        # An integer answer needs an exact match ("2^{10}" is not "1024").
        return False
    return are_equal_under_sympy(gold, pred)


def are_equal_under_sympy(gold: str, pred: str) -> bool:
    difference_text = f"({gold})-({pred})"
    if not should_allow_eval(difference_text):
        return False
    try:
        difference = parse_sympy_expression(difference_text)
        return bool(difference == 0 or sympy.simplify(difference) == 0)
    except UnsupportedExpression:
        return False
    except Exception:  # the original swallows every sympy failure as "not equal"
        return False


def _is_blank(text: str) -> bool:
    return not text.strip()


def _ground_truth_items(ground_truth: GroundTruth) -> list[str]:
    if ground_truth is None:
        return []
    if isinstance(ground_truth, (str, int, float)):
        ground_truth = [ground_truth]
    items: list[str] = []
    for item in ground_truth:
        if item is None:
            continue
        text = str(item)
        if "\\boxed" in text:
            extracted = extract_boxed_answer(text)
            if extracted is not None:
                items.append(extracted)
        else:
            items.append(text)
    return items


def grade_answer(pred: str, ground_truth: GroundTruth) -> bool:
    """True if ``pred`` matches the ground truth (or any item of a list of ground truths)."""
    if pred is None or _is_blank(pred) or len(pred) > MAX_ANSWER_CHARS:
        return False
    for gold in _ground_truth_items(ground_truth):
        if _is_blank(gold) or len(gold) > MAX_ANSWER_CHARS:
            continue
        if grade_answer_mathd(pred, gold) or grade_answer_sympy(pred, gold):
            return True
    return False


def score(response: str, ground_truth: GroundTruth) -> float:
    """Reward of one response: 1.0 if its final boxed answer is correct, else 0.0."""
    pred = extract_answer(response)
    if pred is None:
        return 0.0
    return 1.0 if grade_answer(pred, ground_truth) else 0.0
