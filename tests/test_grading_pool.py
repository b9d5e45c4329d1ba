"""Tests of the grading process pool (dsr_fast.grading_pool): same verdicts as the serial grader,
per-item timeouts, surviving crashed and hung workers, non-blocking submit, de-duplication."""

from __future__ import annotations

import time

import pytest
from grading_worker_hooks import (
    CRASH_MARKER,
    RAISE_MARKER,
    SLEEP_MARKER,
    STUCK_MARKER,
    UNIMPORTABLE_HOOK,
    inject_faults,
)

from dsr_fast.grading_pool import (
    CRASHED,
    ERROR,
    GRADED,
    TIMEOUT,
    GradingPool,
    WholeAnswer,
    plan_item,
)
from dsr_fast.reward import SympyCheck, score


def _response(answer: str) -> str:
    return f"<think>let me think</think> The answer is \\boxed{{{answer}}}"


# (prediction, gold, expected score): cheap verdicts, sympy verdicts, lists, no answer.
CASES = [
    ("x+1", "1+x", 1.0),  # sympy
    ("(x+1)^2", "x^2+2x+1", 1.0),  # sympy, needs simplify
    (r"\sqrt{12}", r"2\sqrt{3}", 1.0),
    (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}", 0.0),  # sympy says no
    ("5", "5", 1.0),  # string match in the caller
    ("6", "5", 0.0),  # integer literals, compared in the caller
    (r"\frac{2}{4}", r"\frac{1}{2}", 0.0),
    ("2", ["1", "2"], 1.0),
    ("y^2", ["x", "y*y"], 1.0),
]


def _batch(cases=CASES):
    return [_response(pred) for pred, _, _ in cases], [gold for _, gold, _ in cases]


def test_plan_item_keeps_cheap_verdicts_in_the_caller() -> None:
    assert plan_item("no think tag \\boxed{5}", "5") == 0.0
    assert plan_item(_response("5"), "5") == 1.0
    assert plan_item(_response("6"), "5") == 0.0
    assert plan_item(_response("x+1"), "1+x") == SympyCheck(((("1+x", "x+1"),),))
    assert plan_item(_response("x+1"), "1+x", fast_path=False) == WholeAnswer("x+1", ("1+x",))
    long_answer = "x+" * 200 + "1"
    assert isinstance(plan_item(_response(long_answer), "1"), WholeAnswer)  # too long for the caller


@pytest.mark.parametrize("fast_path", [True, False])
def test_pool_gives_the_serial_verdicts(fast_path: bool) -> None:
    responses, golds = _batch()
    with GradingPool(workers=2, timeout_s=5.0, fast_path=fast_path) as pool:
        job = pool.submit(responses, golds)
        assert job.result(timeout=60) == [expected for _, _, expected in CASES]
        assert job.statuses == [GRADED] * len(CASES)
        assert [score(r, g) for r, g in zip(responses, golds)] == job.result()
        stats = pool.stats()
    if fast_path:
        assert stats["in_caller"] == 4  # "5", "6", the unreduced fraction, "2" in a list
    else:
        assert stats.get("in_caller", 0) == 0


def test_identical_tasks_are_graded_once_and_cached() -> None:
    responses, golds = _batch(CASES[:1] * 5)
    with GradingPool(workers=1, timeout_s=5.0) as pool:
        assert pool.score(responses, golds) == [1.0] * 5
        assert pool.stats()["tasks"] == 1
        assert pool.stats()["deduplicated"] == 4
        assert pool.score(responses[:1], golds[:1]) == [1.0]
        assert pool.stats()["cached"] == 1


def test_lazy_pool_starts_no_worker_without_sympy_work() -> None:
    with GradingPool(workers=2, lazy=True) as pool:
        assert pool.score([_response("5"), "no answer"], ["5", "5"]) == [1.0, 0.0]
        assert pool.stats().get("worker_starts", 0) == 0


def test_a_killed_worker_does_not_stop_the_batch() -> None:
    cases = CASES + [(f"x+{CRASH_MARKER}", "x", 0.0)] + CASES
    responses, golds = _batch(cases)
    with GradingPool(workers=2, timeout_s=5.0, worker_hook=inject_faults, cache_size=0) as pool:
        job = pool.submit(responses, golds)
        assert job.result(timeout=60) == [expected for _, _, expected in cases]
        crashed = len(CASES)
        assert job.statuses[crashed] == CRASHED
        assert job.statuses[:crashed] + job.statuses[crashed + 1 :] == [GRADED] * (len(cases) - 1)
        stats = pool.stats()
        assert stats["crashes"] == 1
        assert stats["worker_starts"] == 3  # the dead worker was replaced
        assert pool.score(*_batch()) == [expected for _, _, expected in CASES]  # and the pool goes on


def test_a_hang_times_out_scores_zero_and_the_worker_lives_on() -> None:
    # Sleeping in Python: the worker's own SIGALRM limit (0.8 x timeout) ends the task.
    responses, golds = _batch([(f"x+{SLEEP_MARKER}", "x", 0.0)] + CASES)
    with GradingPool(workers=2, timeout_s=1.0, worker_hook=inject_faults) as pool:
        start = time.monotonic()
        job = pool.submit(responses, golds)
        assert job.result(timeout=60) == [0.0] + [expected for _, _, expected in CASES]
        assert job.statuses[0] == TIMEOUT
        assert time.monotonic() - start < 30  # not the hook's 600 s
        assert pool.stats()["timeouts"] == 1
        assert pool.stats()["worker_starts"] == 2  # no restart needed


def test_a_stuck_worker_is_killed_and_replaced() -> None:
    # Signals blocked, as in one long C call: only the parent's kill at timeout_s ends it.
    responses, golds = _batch([(f"x+{STUCK_MARKER}", "x", 0.0)] + CASES)
    with GradingPool(workers=2, timeout_s=1.0, worker_hook=inject_faults) as pool:
        job = pool.submit(responses, golds)
        assert job.result(timeout=60) == [0.0] + [expected for _, _, expected in CASES]
        assert job.statuses[0] == TIMEOUT
        assert pool.stats()["worker_starts"] == 3


def test_a_grader_exception_scores_zero() -> None:
    responses, golds = _batch([(f"x+{RAISE_MARKER}", "x", 0.0), CASES[0]])
    with GradingPool(workers=1, timeout_s=5.0, worker_hook=inject_faults) as pool:
        job = pool.submit(responses, golds)
        assert job.result(timeout=60) == [0.0, 1.0]
        assert job.statuses == [ERROR, GRADED]


def test_submit_does_not_block_while_workers_are_busy() -> None:
    stuck = _batch([(f"x+{STUCK_MARKER}", "x", 0.0)])
    with GradingPool(workers=1, timeout_s=2.0, worker_hook=inject_faults) as pool:
        first = pool.submit(*stuck)
        start = time.monotonic()
        second = pool.submit(*_batch())
        assert time.monotonic() - start < 1.0  # only the caller's cheap share of the work
        assert not second.done()
        with pytest.raises(TimeoutError):
            second.result(timeout=0.01)
        assert second.result(timeout=60) == [expected for _, _, expected in CASES]
        assert first.result() == [0.0] and first.statuses == [TIMEOUT]


def test_workers_that_cannot_start_break_the_pool_with_a_clear_error() -> None:
    with GradingPool(workers=1, timeout_s=5.0, worker_hook=UNIMPORTABLE_HOOK) as pool:
        job = pool.submit(*_batch(CASES[:1]))
        with pytest.raises(RuntimeError, match="failed to start 3 times"):
            job.result(timeout=60)
        with pytest.raises(RuntimeError, match="broken"):
            pool.submit(*_batch(CASES[:1]))


def test_closed_pool_and_bad_arguments() -> None:
    pool = GradingPool(workers=1, lazy=True)
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        pool.submit(["a", "b"], ["1"])
    pool.close()
    pool.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(["a"], ["1"])
    with pytest.raises(ValueError, match="workers"):
        GradingPool(workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        GradingPool(timeout_s=0)


def test_closing_fails_unfinished_jobs() -> None:
    pool = GradingPool(workers=1, timeout_s=30.0, worker_hook=inject_faults)
    job = pool.submit(*_batch([(f"x+{STUCK_MARKER}", "x", 0.0)]))
    pool.close()
    with pytest.raises(RuntimeError, match="closed before"):
        job.result(timeout=10)


@pytest.mark.parametrize(("marker", "status"), [(CRASH_MARKER, CRASHED), (STUCK_MARKER, TIMEOUT)])
def test_a_failure_inside_a_chunk_fails_only_that_item(marker: str, status: str) -> None:
    # One worker and 40 distinct sympy tasks: they travel in chunks of up to 16, so the faulty
    # task has others queued behind it in the same message.  Those must be graded, not lost.
    cases = [(f"x+{k}", f"{k}+x", 1.0) for k in range(1, 41)]
    cases[3] = (f"x+{marker}", "x", 0.0)
    responses, golds = _batch(cases)
    with GradingPool(workers=1, timeout_s=1.5, worker_hook=inject_faults) as pool:
        job = pool.submit(responses, golds)
        assert job.result(timeout=120) == [expected for _, _, expected in cases]
        assert job.statuses == [GRADED] * 3 + [status] + [GRADED] * 36
        stats = pool.stats()
        assert stats["tasks"] == 40 and stats["worker_starts"] == 2
