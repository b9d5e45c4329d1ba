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

Entry points: :func:`score` (one response, in this process), :func:`grade_answer`,
:func:`extract_answer`.  Many responses at once, in worker processes with hard per-item
timeouts: :func:`dsr_fast.grading.score_batch` and :class:`dsr_fast.grading_pool.GradingPool`,
which import this module (never the other way round).

Grading runs in two stages so that a pool can keep the cheap part in the parent process:
:func:`plan_grade` does everything but sympy (normalisers, string and tuple checks, the
``should_allow_eval`` gate, integer-literal comparison) and returns either the verdict or a
:class:`SympyCheck` - the sympy comparisons the verdict hinges on - which
:func:`run_sympy_check` settles.  The split gives the original's verdicts: it only reorders
work whose results are combined by ``or``/``and``, and compares two integer literals with
``int`` where the original computes ``simplify(a - b) == 0`` on the same two integers.

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
   parser rejects long inputs, huge powers/factorials, exponential towers, many or deeply
   nested functions and high-degree expressions, so
   ``simplify`` only ever sees small expressions (the original has no timeout).
5. Inputs on which the original would raise rather than answer are simply "not equal"
   (e.g. ``nan``, where ``int(round(nan))`` raises ``ValueError``); ``None`` items of a
   ground-truth list are dropped (recipe section 2.2) rather than becoming ``"None"``.
6. Every comparison is time-bounded, and running out of time is "not equal" (score 0):
   the sympy stage of one response gets ``timeout_s`` (default :data:`DEFAULT_TIMEOUT_S`).
   In :func:`score` / :func:`grade_answer` that is a SIGALRM limit (:mod:`dsr_fast.time_limit`),
   enforced in a process's main thread only; the grading pool (:mod:`dsr_fast.grading_pool`)
   adds a hard limit by killing the worker process.  So, unlike the original, a verdict can depend
   on machine load - but only for answers that take seconds, which real answers never do
   (the slowest gold/prediction pair of the five test sets takes ~0.1 s).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
from dsr_fast.safe_sympy import (
    MAX_INPUT_CHARS,
    UnsupportedExpression,
    parse_sympy_expression,
)
from dsr_fast.time_limit import TimeLimitExceeded, time_limit

THINK_END = "</think>"
# Far above any real answer (the longest gold in the test sets is ~200 chars); keeps the
# regexes and pylatexenc of the normalisers cheap on runaway outputs.
MAX_ANSWER_CHARS = 5_000
# Seconds for the sympy stage of one response.  Real answers need well under 0.5 s even on a
# loaded machine; the parser's bounds keep adversarial ones short too, so this only catches
# what slips past them.
DEFAULT_TIMEOUT_S = 5.0

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
# Matching, stage 1: everything but sympy
# ---------------------------------------------------------------------------

# An integer literal exactly as the safe parser reads it as one number ("012" is 0*12 there).
_INTEGER_LITERAL = re.compile(r"-?(?:0|[1-9][0-9]*)")

ElementPairs = tuple[tuple[str, str], ...]  # (gold element, predicted element) pairs


@dataclass(frozen=True)
class SympyCheck:
    """The sympy comparisons a verdict hinges on: correct iff, for some candidate (one per
    ground-truth item), every (gold, pred) element pair is equal under sympy.

    Hashable and picklable: a grading pool sends it to a worker and caches its verdict.
    """

    candidates: tuple[ElementPairs, ...]


def grade_answer_mathd(pred: str, gold: str) -> bool:
    normalized_gold = normalize_mathd(gold)
    normalized_pred = normalize_mathd(pred)
    return bool(normalized_pred) and normalized_gold == normalized_pred


def plan_sympy_comparison(pred: str, gold: str) -> bool | ElementPairs:
    """``grade_answer_sympy`` up to sympy: its verdict, or the element pairs left to compare."""
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
    pending = []
    for gold_element, pred_element in zip(gold_elements, pred_elements):
        verdict = element_verdict_without_sympy(gold_element, pred_element)
        if verdict is False:
            return False  # the original's all() is False whatever the other elements give
        if verdict is None:
            pending.append((gold_element, pred_element))
    return tuple(pending) if pending else True


def element_verdict_without_sympy(gold: str, pred: str) -> bool | None:
    """The original's per-element verdict where it needs no sympy; None where it does."""
    if is_fraction_string(gold) and is_fraction_string(pred):
        # Unreduced fractions must not pass, so no simplify() here.
        return gold == pred
    if is_integer_string(gold) != is_integer_string(pred):
        # An integer answer needs an exact match ("2^{10}" is not "1024").
        return False
    difference_text = f"({gold})-({pred})"
    if not should_allow_eval(difference_text) or len(difference_text) > MAX_INPUT_CHARS:
        return False  # are_equal_under_sympy refuses these before parsing
    if _INTEGER_LITERAL.fullmatch(gold) and _INTEGER_LITERAL.fullmatch(pred):
        # The parser makes Integer(gold - pred) of this, and simplify(n) == 0 iff n == 0.
        return int(gold) == int(pred)
    return None


def plan_grade(pred: str | None, golds: Sequence[str]) -> bool | SympyCheck:
    """Stage 1 of :func:`grade_answer` against prepared ground-truth items (see
    :func:`ground_truth_items`): the verdict, or the :class:`SympyCheck` it depends on."""
    if pred is None or _is_blank(pred) or len(pred) > MAX_ANSWER_CHARS:
        return False
    candidates = []
    for gold in golds:
        if _is_blank(gold) or len(gold) > MAX_ANSWER_CHARS:
            continue
        if grade_answer_mathd(pred, gold):
            return True
        planned = plan_sympy_comparison(pred, gold)
        if planned is True:
            return True
        if planned:
            candidates.append(planned)
    return SympyCheck(tuple(candidates)) if candidates else False


# ---------------------------------------------------------------------------
# Matching, stage 2: sympy
# ---------------------------------------------------------------------------


def run_sympy_check(check: SympyCheck, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Settle a :class:`SympyCheck`; running out of ``timeout_s`` counts as "not equal"."""
    try:
        return sympy_check_verdict(check, timeout_s=timeout_s)
    except TimeLimitExceeded:
        return False


def sympy_check_verdict(check: SympyCheck, *, timeout_s: float | None) -> bool:
    """Like :func:`run_sympy_check` but raises :class:`TimeLimitExceeded` on a timeout."""
    with time_limit(timeout_s):
        return any(all(are_equal_under_sympy(gold, pred) for gold, pred in pairs) for pairs in check.candidates)


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


def grade_answer_sympy(pred: str, gold: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    planned = plan_sympy_comparison(pred, gold)
    if isinstance(planned, bool):
        return planned
    return run_sympy_check(SympyCheck((planned,)), timeout_s=timeout_s)


# ---------------------------------------------------------------------------
# Ground truths, grading, scoring
# ---------------------------------------------------------------------------


def _is_blank(text: str) -> bool:
    return not text.strip()


def ground_truth_items(ground_truth: GroundTruth) -> list[str]:
    """The acceptable answers as strings: numbers through ``str()``, boxed ones extracted,
    ``None`` and unextractable boxed items dropped."""
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


def grade_items(pred: str | None, golds: Sequence[str], *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """:func:`grade_answer` against prepared ground-truth items."""
    planned = plan_grade(pred, golds)
    if isinstance(planned, bool):
        return planned
    return run_sympy_check(planned, timeout_s=timeout_s)


def grade_answer(pred: str | None, ground_truth: GroundTruth, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """True if ``pred`` matches the ground truth (or any item of a list of ground truths).

    The sympy stage gets ``timeout_s`` seconds (enforced in the main thread only; None: no
    limit); running out counts as "not equal".
    """
    return grade_items(pred, ground_truth_items(ground_truth), timeout_s=timeout_s)


def score(response: str, ground_truth: GroundTruth, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> float:
    """Reward of one response: 1.0 if its final boxed answer is correct, else 0.0."""
    pred = extract_answer(response)
    if pred is None:
        return 0.0
    return 1.0 if grade_answer(pred, ground_truth, timeout_s=timeout_s) else 0.0
