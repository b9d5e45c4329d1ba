"""Tests of the math reward (dsr_fast.reward): golden verdicts, extraction, scoring, real
ground truths from the DeepScaleR test sets, and safety (no code execution, bounded time)."""

from __future__ import annotations

import ast
import builtins
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import sympy
from conftest import SHARED_DATA
from grading_worker_hooks import CONTROL_MARKER, EXECUTION_MARKER, forbid_code_execution
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsr_fast.reward as reward
from dsr_fast.grading_pool import GradingPool
from dsr_fast.grading import score_batch
from dsr_fast.reward import DEFAULT_TIMEOUT_S, extract_answer, grade_answer, score
from dsr_fast.time_limit import TimeLimitExceeded, can_limit_time, time_limit

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA_DIR = SHARED_DATA / "test"


# ---------------------------------------------------------------------------
# Golden verdicts of the original grader (recipe.md section 3)
# ---------------------------------------------------------------------------

GOLDEN_TRUE = [
    ("0.5", r"\frac{1}{2}"),
    ("0.75", r"\dfrac{3}{4}"),
    (r"\frac{3}{6}", "0.5"),
    (r"\frac{1}{2}", "1/2"),
    ("1/3", r"\frac{1}{3}"),
    ("5.0", "5"),
    ("5", "05"),
    ("1,000", "1000"),
    (r"10\%", "10"),
    (r"\$10", "10"),
    (r"45^\circ", "45"),
    (r"28\text{ inches}", "28"),  # unit stripping
    (r"12 \text{ cm}^2", "12"),
    ("x=2", "2"),  # short left-hand side dropped
    (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2"),
    (r"\sqrt{12}", r"2\sqrt{3}"),  # needs sympy
    (r"\text{(A)}", "A"),
    ("E", "e"),  # lower-cased
    ("x = 2, x = -3", "x = 2, x = -3"),
]

GOLDEN_FALSE = [
    (r"\frac{2}{4}", r"\frac{1}{2}"),  # unreduced fraction
    ("(2,1)", "(1,2)"),  # order-sensitive
    ("-3, 2", "2, -3"),
    ("3.14", "3.14159"),  # no tolerance
    ("0.3333", r"\frac{1}{3}"),
    ("10^{6}", "1000000"),  # "^{" blocks sympy
    ("2^{10}", "1024"),
    ("(0,1]", "[0,1)"),  # bracket check
    (r"\textbf{(C)}\ 28", "28"),
]


@pytest.mark.parametrize(("pred", "gold"), GOLDEN_TRUE)
def test_golden_true_verdicts(pred: str, gold: str) -> None:
    assert grade_answer(pred, gold) is True


@pytest.mark.parametrize(("pred", "gold"), GOLDEN_FALSE)
def test_golden_false_verdicts(pred: str, gold: str) -> None:
    assert grade_answer(pred, gold) is False


@pytest.mark.parametrize(("pred", "gold"), [("", ""), ("  ", ""), ("", "5"), (" ", " "), (r"\$", r"\%")])
def test_empty_answers_never_match(pred: str, gold: str) -> None:
    # Deviation 2: the original grades "" vs "" (and anything normalising to "") as correct.
    assert grade_answer(pred, gold) is False


# More verdicts that exercise the sympy path; each one agrees with the original grader run
# with sympy's parse_expr (checked when this port was written).
MORE_TRUE = [
    (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"),
    (r"2\pi", r"\pi \cdot 2"),
    ("(x+1)^2", "x^2+2x+1"),
    ("x^2-1", "(x-1)(x+1)"),
    (r"\frac{x}{2}", r"\frac{1}{2}x"),
    (r"3\sqrt{2}", r"\sqrt{18}"),
    ("xy", "yx"),
    ("1/(1+sqrt(2))", "sqrt(2)-1"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \frac{\pi}{2})"),
    (r"\frac{7}{2}", r"3\frac{1}{2}"),  # mixed number
    ("-0.5", r"-\frac{1}{2}"),
    (r"\frac{-1}{2}", r"-\frac{1}{2}"),
    (r"2 \text{ and } 3", "2, 3"),
    (r"\$1,000", "1000"),
    ("1.5", r"\frac{3}{2}"),
    (r"\textbf{(B)}", "B"),
]
MORE_FALSE = [
    ("7", "7.5"),
    (r"2^{1/2}", r"\sqrt{2}"),  # "^{" blocks sympy
    ("5!", "120"),  # integer gold needs an integer string
    ("2\\times 10^3", "2000"),
    (r"\pi", "3.14159"),
    (r"\{1,2\}", r"\{2,1\}"),
    # Nested brackets stop split_tuple, and sympy cannot subtract tuples (a quirk).
    (r"(1, \frac{\sqrt{3}}{3})", r"(1, \frac{1}{\sqrt{3}})"),
]


# Logarithms (sympy's parser reads ln as log): the original's verdicts, re-derived below with
# parse_expr on these hand-written constants.  Of the elementary functions only ln passes the
# original's gate (at most two distinct letters), so exp/log/sin answers stay "not equal" there.
FUNCTION_TRUE = [
    (r"2\ln(2)", r"\ln(4)"),
    (r"\ln(2)+\ln(3)", r"\ln(6)"),
    (r"3\ln(2)", r"\ln(8)"),
    (r"\ln(\frac{1}{2})", r"-\ln(2)"),
    (r"\frac{\ln(2)}{2}", r"\ln(\sqrt{2})"),
    (r"\ln(12)-\ln(3)", r"2\ln(2)"),
    (r"\ln(2)\ln(3)", r"\ln(3)\ln(2)"),
    (r"\ln 4", r"2\ln 2"),  # quirk: "ln4" is 4*l*n for sympy too, and so is "2ln2"
    (r"\frac{1}{\ln(2)}", r"\frac{2}{\ln(4)}"),
]
FUNCTION_FALSE = [
    (r"\ln(2)", r"\ln(3)"),
    (r"\ln(2)", "0.693"),  # no tolerance
    (r"\ln(2)+\ln(3)", r"\ln(5)"),
    (r"\log(8)", r"3\log(2)"),  # "log" has three letters: the gate refuses it, as in the original
    (r"e^{\ln 2}", "2"),  # "^{" blocks sympy
    (r"\exp(2)", r"\exp(2)\cdot 1"),  # three letters again
    (r"\ln(4)", "4"),  # integer gold needs an integer string
]


def original_verdict(pred: str, gold: str) -> bool:
    """grade_answer_mathd or grade_answer_sympy of the original, for one-element answers, with
    sympy's parse_expr (which evals: only ever called on the constants above)."""
    from sympy.parsing import sympy_parser

    from dsr_fast.math_normalize import normalize_mathd, normalize_sympy, should_allow_eval

    if normalize_mathd(pred) == normalize_mathd(gold):
        return True
    gold_n, pred_n = normalize_sympy(gold), normalize_sympy(pred)
    if gold_n == pred_n:
        return True
    if gold_n.lstrip("-").isdigit() != pred_n.lstrip("-").isdigit():
        return False
    expr = f"({gold_n})-({pred_n})"
    if not should_allow_eval(expr):
        return False
    transformations = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)
    try:
        return sympy.simplify(sympy_parser.parse_expr(expr.replace("^", "**"), transformations=transformations)) == 0
    except Exception:
        return False


@pytest.mark.parametrize(("pred", "gold"), FUNCTION_TRUE + FUNCTION_FALSE)
def test_function_verdicts_agree_with_the_original(pred: str, gold: str) -> None:
    expected = (pred, gold) in FUNCTION_TRUE
    assert original_verdict(pred, gold) is expected
    assert grade_answer(pred, gold) is expected
    assert grade_answer(gold, pred) is expected


@pytest.mark.parametrize(("pred", "gold"), MORE_TRUE)
def test_more_true_verdicts(pred: str, gold: str) -> None:
    assert grade_answer(pred, gold) is True


@pytest.mark.parametrize(("pred", "gold"), MORE_FALSE)
def test_more_false_verdicts(pred: str, gold: str) -> None:
    assert grade_answer(pred, gold) is False


# ---------------------------------------------------------------------------
# extract_answer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"<think>x</think> so \boxed{1} or rather \boxed{2}", "2"),  # last boxed wins
        (r"</think>\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"</think>\boxed{\left(1, \{2\}\right)} done.", r"\left(1, \{2\}\right)"),
        (r"</think>\boxed{\frac{1}{2}", None),  # unclosed
        (r"</think>\boxed 5", None),  # no brace
        (r"</think>\fbox{5}", None),  # \fbox is never accepted
        (r"</think>\boxed{3} and \fbox{5}", "3"),
        (r"<think>\boxed{5}", None),  # no </think>
        (r"\boxed{5}", None),
        (r"<think>\boxed{1}</think> no answer", None),  # boxed only inside the thinking
        (r"</think>\boxed{}", ""),
        # Only the part between the first and the second </think> counts.
        (r"<think>a</think>\boxed{1}</think>\boxed{2}", "1"),
        (r"<think>a</think>nothing</think>\boxed{2}", None),
        (r"prompt <think> reasoning </think> The answer is $\boxed{42}$.", "42"),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


# ---------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------


def _response(answer: str) -> str:
    return f"<think>let me think</think> The answer is \\boxed{{{answer}}}"


@pytest.mark.parametrize(
    ("response", "ground_truth", "expected"),
    [
        (_response("142"), 142.0, 1.0),  # float gold goes through str(): "142.0"
        (_response("142.0"), 142.0, 1.0),
        (_response("143"), 142.0, 0.0),
        (_response("7"), 7, 1.0),
        (_response("2"), ["1", "2"], 1.0),  # any item of a list
        (_response("3"), ["1", "2"], 0.0),
        (_response(r"\frac{1}{2n+2}"), [r"$\frac{1}{2 n+2}$"], 1.0),  # OlympiadBench style
        (_response("2^{1009}"), ["$2^{1009}$"], 1.0),
        (_response("9.6"), ["9.6\n"], 1.0),  # Minerva style
        (_response("5"), [], 0.0),
        (_response("5"), [None, "5"], 1.0),
        (_response("None"), [None], 0.0),  # None items are dropped, not "None"
        (_response("5"), None, 0.0),
        (_response("5"), r"the solution is \boxed{5}", 1.0),  # boxed gold is extracted
        (_response("5"), [r"\boxed{5"], 0.0),  # unextractable boxed gold is dropped
        ("The answer is \\boxed{5}", "5", 0.0),  # no </think>
        ("</think> The answer is \\boxed{5}", "5", 1.0),  # <think> may be in the prompt
        (_response(""), "", 0.0),
        ("<think>\\boxed{5}</think> I give up", "5", 0.0),
    ],
)
def test_score(response: str, ground_truth, expected: float) -> None:
    assert score(response, ground_truth) == expected


def test_score_returns_float() -> None:
    assert isinstance(score(_response("1"), "1"), float)
    assert isinstance(score("no answer", "1"), float)


# ---------------------------------------------------------------------------
# Real ground truths of the DeepScaleR test sets (read in place, never copied)
# ---------------------------------------------------------------------------

TEST_SETS = ["math", "amc", "minerva", "olympiad_bench", "aime"]


def _load_test_set(name: str) -> list[dict]:
    path = TEST_DATA_DIR / f"{name}.json"
    if not path.exists():
        pytest.skip(f"test data not available at {path}")
    return json.loads(path.read_text())


def _first_answer(answer) -> str:
    return str(answer[0] if isinstance(answer, list) else answer)


def _restated(answer: str, name: str) -> str:
    """The gold written the way a model would box it."""
    if name == "amc":
        return str(int(float(answer)))  # 142.0 -> "142"
    return answer.strip().strip("$").strip()  # OlympiadBench "$...$", Minerva "...\n"


@pytest.mark.parametrize("name", TEST_SETS)
def test_own_answer_scores_one(name: str) -> None:
    problems = _load_test_set(name)
    failures = []
    for problem in problems:
        gold = problem["answer"]
        for boxed in {_first_answer(gold), _restated(_first_answer(gold), name)}:
            if score(_response(boxed), gold) != 1.0:
                failures.append((boxed, gold))
    print(f"{name}: {len(failures)} of {len(problems)} own answers fail: {failures}")
    # Observed when written: no failures in any of the five sets.
    assert failures == []


@pytest.mark.parametrize("name", TEST_SETS)
def test_other_problems_answer_scores_zero(name: str) -> None:
    problems = _load_test_set(name)
    same_answer, matches = [], []
    for index, problem in enumerate(problems):
        gold = problem["answer"]
        other = _first_answer(problems[(index + 1) % len(problems)]["answer"])
        if any(reward.grade_answer_mathd(other, str(item)) for item in _as_list(gold)):
            same_answer.append(other)  # neighbours with the same answer ("7" and "7.0")
        elif score(_response(other), gold) == 1.0:
            matches.append((other, gold))
    print(f"{name}: {len(same_answer)} neighbours share the answer: {same_answer}")
    print(f"{name}: {len(matches)} different answers still match: {matches}")
    # Observed: no different answer matches; 3/500, 4/83, 1/272, 4/675, 0/30 are shared.
    assert matches == []
    assert len(same_answer) <= len(problems) // 10


def _as_list(answer) -> list:
    return answer if isinstance(answer, list) else [answer]


# ---------------------------------------------------------------------------
# Safety: model text is never executed, and no answer can hang the grader
# ---------------------------------------------------------------------------

INJECTIONS = [
    "__import__('os').system('touch {marker}')",
    "__import__(\"os\").system(\"touch {marker}\")",
    "().__class__.__bases__[0].__subclasses__()",
    "exec(\"open('{marker}', 'w').write('x')\")",
    "eval('1+1')",
    "open('{marker}','w')",
    "lambda: __import__('os').system('touch {marker}')",
    "[x for x in ().__class__.__mro__]",
    "__builtins__",
    "a.b",
    "(1).real",
    "1 if 1 else 2",
    "f'{{1}}'",
]


@pytest.fixture()
def execution_spy(monkeypatch, tmp_path):
    """Records shell commands and every eval/exec of *text* while the grader runs.

    Code objects are let through unrecorded: the import system execs them when sympy or
    pylatexenc load a submodule lazily.
    """
    shell_calls: list[str] = []
    evaluated_texts: list[str] = []

    def refuse(name):
        def spy(*args, **kwargs):
            shell_calls.append(f"{name}{args}")
            raise RuntimeError(f"{name} must not be called by the grader")

        return spy

    monkeypatch.setattr(os, "system", refuse("os.system"))
    monkeypatch.setattr(subprocess, "Popen", refuse("subprocess.Popen"))

    def recording(real):
        def spy(source, *args, **kwargs):
            if isinstance(source, (str, bytes)):
                evaluated_texts.append(str(source))
            return real(source, *args, **kwargs)

        return spy

    monkeypatch.setattr(builtins, "eval", recording(builtins.eval))
    monkeypatch.setattr(builtins, "exec", recording(builtins.exec))
    return shell_calls, evaluated_texts, tmp_path / "pwned"


@pytest.mark.parametrize("template", INJECTIONS)
@pytest.mark.parametrize("bypass_gate", [False, True])
def test_injected_code_is_a_wrong_answer_and_never_runs(template, bypass_gate, execution_spy, monkeypatch):
    shell_calls, evaluated_texts, marker = execution_spy
    injection = template.format(marker=marker)
    if bypass_gate:
        # should_allow_eval already rejects most code (too many letters); without it the
        # text reaches the parser, which must refuse it by itself.
        monkeypatch.setattr(reward, "should_allow_eval", lambda expr: True)
    for gold in ["2", "x", r"\frac{1}{2}"]:
        assert score(_response(injection), gold) == 0.0
        assert score(_response(gold), injection) == 0.0
    assert reward.are_equal_under_sympy("0", injection) is False
    assert not marker.exists()
    assert shell_calls == []
    assert [text for text in evaluated_texts if injection in text or "__" in text] == []


def test_grader_modules_never_call_eval_like_functions() -> None:
    forbidden_builtins = {"eval", "exec", "compile", "__import__"}  # re.compile is fine
    forbidden_anywhere = {"sympify", "parse_expr", "parse_latex", "S"}
    for module in ["reward.py", "math_normalize.py", "safe_sympy.py"]:
        tree = ast.parse((REPO_ROOT / "dsr_fast" / module).read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Name):
                assert node.func.id not in forbidden_builtins | forbidden_anywhere, (module, node.lineno)
            elif isinstance(node.func, ast.Attribute):
                assert node.func.attr not in forbidden_anywhere, (module, node.lineno)


BOMBS = [
    "exp(exp(exp(1000)))",
    r"\ln(\ln(\ln(\ln(2))))",
    "ln(10^1000)",
    "exp(1000)^1000",
    "+".join(f"ln(x+{k})" for k in range(2, 12)),
    "9**9**9**9",
    "9^9^9^9",
    "2**(10**100)",
    "2^(10^100)",
    "2**-99999999999",
    "(2**10**6)x",
    "x**(10**100)",
    "2**(10**100*sqrt(2))",
    "sqrt(2)**(10**100*sqrt(3))",
    "(1000!)!",
    "99999!",
    "1e999999999",
    "sqrt(" + "7" * 900 + ")",
    "*".join(f"(x+y+{k})" for k in range(1, 40)),
    "+".join(f"1/(x+{k})" for k in range(1, 40)),
    "((x+y+1)**9)**9",
    "(" * 600 + "x" + ")" * 600,
    "x" * 100_000,
    r"\frac{1}{" * 2_000 + "2" + "}" * 2_000,
    r"\frac{1}{" * 400 + "2" + "}" * 400,  # under the answer length limit: pylatexenc recursion
    r"\sqrt{" * 400 + "2" + "}" * 400,
]


@pytest.mark.parametrize("bomb", BOMBS, ids=lambda bomb: bomb[:30])
@pytest.mark.parametrize("bypass_gate", [False, True])
def test_bombs_are_wrong_and_fast(bomb: str, bypass_gate: bool, monkeypatch) -> None:
    if bypass_gate:
        monkeypatch.setattr(reward, "should_allow_eval", lambda expr: True)
    for gold in ["x", r"\frac{1}{2}", "x+y"]:
        start = time.perf_counter()
        assert grade_answer(bomb, gold) is False
        assert grade_answer(gold, bomb) is False
        assert time.perf_counter() - start < 2.0, (bomb[:40], gold)


def test_score_accepts_no_limit_and_returns_the_same_verdicts() -> None:
    for pred, gold in GOLDEN_TRUE + MORE_TRUE:
        assert grade_answer(pred, gold, timeout_s=None) is True
    for pred, gold in GOLDEN_FALSE + MORE_FALSE:
        assert grade_answer(pred, gold, timeout_s=None) is False


# ---------------------------------------------------------------------------
# Time bounds in this process (the pool's hard bound is in test_grading_pool.py)
# ---------------------------------------------------------------------------


def test_slow_sympy_is_cut_off_in_process(monkeypatch) -> None:
    assert grade_answer("(x+1)^2", "x^2+2x+1") is True  # needs simplify()
    monkeypatch.setattr(sympy, "simplify", lambda expr: time.sleep(60))
    start = time.perf_counter()
    assert grade_answer("(x+1)^2", "x^2+2x+1", timeout_s=0.3) is False
    assert score(_response("(x+1)^2"), "x^2+2x+1", timeout_s=0.3) == 0.0
    assert time.perf_counter() - start < 5.0


def test_time_limit_raises_past_the_limit_and_restores_an_outer_timer() -> None:
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *args: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        with pytest.raises(TimeLimitExceeded):
            with time_limit(0.05):
                time.sleep(5)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0  # the outer timer is back, with its time left
        assert signal.getsignal(signal.SIGALRM) is not previous and not fired
        # An outer limit due sooner than an inner one still ends the work in time.
        signal.setitimer(signal.ITIMER_REAL, 0)
        start = time.perf_counter()
        with pytest.raises(TimeLimitExceeded):
            with time_limit(0.1):
                with time_limit(30):
                    time.sleep(5)
        assert time.perf_counter() - start < 2.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_time_limit_is_skipped_off_the_main_thread() -> None:
    outcome = []

    def work() -> None:
        outcome.append(can_limit_time())
        with time_limit(0.01):
            time.sleep(0.1)
        outcome.append(grade_answer("x+1", "1+x"))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert outcome == [False, True]


# ---------------------------------------------------------------------------
# score_batch: the serial verdicts, from a process pool
# ---------------------------------------------------------------------------


def test_score_batch_gives_the_serial_scores_on_the_test_sets() -> None:
    responses, golds = [], []
    for name in TEST_SETS:
        problems = _load_test_set(name)[::3]
        for index, problem in enumerate(problems):
            other = problems[(index + 1) % len(problems)]["answer"]
            for answer in (_first_answer(problem["answer"]), _first_answer(other)):
                responses.append(_response(answer))
                golds.append(problem["answer"])
    serial = [score(response, gold) for response, gold in zip(responses, golds)]
    assert score_batch(responses, golds, workers=2) == serial
    assert 0.4 < sum(serial) / len(serial) < 0.6  # own answers right, neighbours' wrong


def test_score_batch_edge_cases() -> None:
    assert score_batch([], []) == []
    assert score_batch([_response("5"), "no answer"], [5, "5"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="1 responses but 2 ground truths"):
        score_batch([_response("5")], ["5", "6"])


# ---------------------------------------------------------------------------
# Injection and bomb corpus: >= 200 payloads that must never run and never need the timeout
# ---------------------------------------------------------------------------

# Written with "{marker}" (a path ending in EXECUTION_MARKER), filled in by str.replace.
MORE_INJECTIONS = [
    "__import__('subprocess').call(['touch', '{marker}'])",
    "getattr(__builtins__, 'ev'+'al')(\"open('{marker}','w')\")",
    "globals()['__builtins__'].exec(\"open('{marker}','w')\")",
    "sympify(\"open('{marker}','w')\")",
    "parse_expr(\"open('{marker}','w')\")",
    "S(\"open('{marker}','w')\")",
    "Symbol('x').__class__.__init__.__globals__['os'].system('touch {marker}')",
    "(lambda: open('{marker}', 'w'))()",
    "import os; os.system('touch {marker}')",
    "x; __import__('os').system('touch {marker}')",
    "x\n__import__('os').system('touch {marker}')",
    "Lambda(x, open('{marker}','w'))",
    "Function('f')(open('{marker}','w'))",
    "E**open('{marker}','w')",
    "breakpoint()",
    "input()",
    r"\immediate\write18{touch {marker}}",
    r"\input{{marker}}",
    "$(touch {marker})",
    "`touch {marker}`",
    "{{ ''.__class__.__mro__[1].__subclasses__() }} {marker}",
    "!!python/object/apply:os.system ['touch {marker}']",
    "%(open('{marker}','w'))s",
    "\x00\x01 {marker} \u202e",
    "{marker}",
]

MORE_BOMBS = [
    "10^10^10^10",
    "2^2^2^2^2^2",
    "(9^9)^(9^9)",
    "9!!!!!!",
    "((((9!)!)!)!)",
    "x^(2^100)",
    "sqrt(" * 300 + "2" + ")" * 300,
    "1/0",
    "0/0",
    "(-1)^(1/3)*10^999",
    "1e308*1e308",
    "10^(10^6)",
    r"\frac{1}{0}",
    r"x^{10^{100}}",
    r"\underbrace{" * 200 + "x" + "}" * 200,
    r"\begin{matrix}" * 200,
    "{" * 4_000,
    r"\left(" * 500,
    "(" * 2_000 + ")" * 2_000,
    "2" * 4_990,
    "1,000," * 800,
]

WRAPPERS = ["{}", "${}$", r"\text{{{}}}", "(1, {})", r"\frac{{{}}}{{2}}"]


def _payload_corpus(marker: str) -> list[str]:
    bases = [template.format(marker=marker) for template in INJECTIONS]
    bases += [template.replace("{marker}", marker) for template in MORE_INJECTIONS]
    bases += BOMBS + MORE_BOMBS
    return [wrapper.format(base) for base in bases for wrapper in WRAPPERS]


def test_the_corpus_has_at_least_200_distinct_payloads() -> None:
    assert len(set(_payload_corpus(EXECUTION_MARKER))) >= 200


@pytest.mark.parametrize("index", range(len(INJECTIONS) + len(MORE_INJECTIONS) + len(BOMBS) + len(MORE_BOMBS)))
def test_corpus_payload_is_wrong_fast_and_never_runs_in_process(index: int, execution_spy) -> None:
    shell_calls, evaluated_texts, marker = execution_spy
    corpus = _payload_corpus(str(marker.parent / EXECUTION_MARKER))
    for payload in corpus[index * len(WRAPPERS) : (index + 1) * len(WRAPPERS)]:
        for gold in ["2", "x", r"\frac{1}{2}"]:
            start = time.perf_counter()
            assert score(_response(payload), gold, timeout_s=None) == 0.0
            assert score(_response(gold), payload, timeout_s=None) == 0.0
            # The size bounds alone end every payload, far inside the default time limit.
            assert time.perf_counter() - start < 2.0, payload[:60]
    assert not (marker.parent / EXECUTION_MARKER).exists()
    assert shell_calls == []
    assert [text for text in evaluated_texts if EXECUTION_MARKER in text or "__" in text] == []


@pytest.fixture(scope="module")
def guarded_pool():
    """Workers that die (item "crashed") if grading starts a process or evals marker text; no
    fast path, so every payload is parsed in a worker."""
    with GradingPool(workers=2, timeout_s=DEFAULT_TIMEOUT_S, fast_path=False, worker_hook=forbid_code_execution) as pool:
        yield pool


def test_corpus_never_runs_in_workers_nor_needs_the_timeout(guarded_pool, tmp_path) -> None:
    marker = tmp_path / EXECUTION_MARKER
    corpus = _payload_corpus(str(marker))
    responses, golds = [], []
    for payload in corpus:
        responses += [_response(payload), _response("x+1")]
        golds += ["x+1", payload]
    # A control item: the guard hook itself evals the marker, so the guard must catch it.
    responses.append(_response(f"x+{CONTROL_MARKER}"))
    golds.append("x")
    job = guarded_pool.submit(responses, golds)
    scores = job.result(timeout=600)
    assert job.statuses[-1] == "crashed"
    assert scores[:-1] == [0.0] * (len(responses) - 1)
    assert set(job.statuses[:-1]) == {"graded"}  # none ran code, none hit a timeout
    assert not marker.exists()


CODE_PIECES = [
    "__import__", "('os')", ".system", "('touch {marker}')", "open", "('{marker}','w')", "eval", "exec",
    "lambda", ":", "(", ")", "[", "]", "'", '"', ".", ",", ";", "__class__", "__subclasses__()",
    "__globals__", "getattr", "sympify", "x", "y", "2", "\\frac", "\\sqrt", "{", "}", "^", "**", "!",
    "9", "10^", "100", "sqrt(", "pi", "e", "i", " ", "\\text{", "$", "=", "%", "\\",
]


def _payloads(marker: str):
    pieces = [piece.replace("{marker}", marker) for piece in CODE_PIECES]
    return st.lists(st.sampled_from(pieces), min_size=1, max_size=16).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_payloads_never_run_in_process(data, execution_spy) -> None:
    shell_calls, evaluated_texts, marker = execution_spy
    payload = data.draw(_payloads(str(marker.parent / EXECUTION_MARKER)))
    start = time.perf_counter()
    for gold in ["x", "2"]:
        assert score(_response(payload), gold, timeout_s=None) in (0.0, 1.0)
        assert score(_response(gold), payload, timeout_s=None) in (0.0, 1.0)
    assert time.perf_counter() - start < 2.0
    assert not (marker.parent / EXECUTION_MARKER).exists()
    assert shell_calls == []
    assert [text for text in evaluated_texts if EXECUTION_MARKER in text or "__" in text] == []


@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_generated_payloads_never_run_in_workers(data, guarded_pool, tmp_path_factory) -> None:
    marker = tmp_path_factory.mktemp("payloads") / EXECUTION_MARKER
    payloads = data.draw(st.lists(_payloads(str(marker)), min_size=40, max_size=40))
    job = guarded_pool.submit([_response(p) for p in payloads] + [_response("x")] * 40, ["x"] * 40 + payloads)
    job.result(timeout=600)
    assert set(job.statuses) == {"graded"}
    assert not marker.exists()
