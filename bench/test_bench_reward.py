"""Grading throughput (responses/s): serial `score` vs the process pool, on typical answers.

    make bench PYTEST_ARGS="bench/test_bench_reward.py -s"   # or: pytest bench/test_bench_reward.py -s

The batch: every problem of the five DeepScaleR test sets answered twice, once with its own
answer (correct) and once with the next problem's (mostly wrong), each after ~4,000 characters
of reasoning: 3,120 responses, about half correct, ~12% needing sympy.  The "rl_groups" case
instead has 8 samples per problem, as a training step does (4 right and 4 wrong, identical
within each half), where de-duplication and the normaliser caches pay off.  Every round starts
with cold caches (the normalisers' and the pool's verdicts), so repeated rounds do not measure
cache hits.  The goal is >= 500 responses/s on 2 cores; each case prints its rate, and its ratio
to serial `score` measured in the same run (other load on the machine moves both alike), and
stores them in the benchmark's extra_info.  Run the serial case first (file order does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dsr_fast.grading_pool import GradingPool, shared_pool
from dsr_fast.math_normalize import clear_caches
from dsr_fast.grading import score_batch
from dsr_fast.reward import DEFAULT_TIMEOUT_S, score

SHARED_DATA = Path(os.environ.get("DSR_FAST_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TEST_SETS = ["math", "amc", "minerva", "olympiad_bench", "aime"]
REASONING = ("Let me compute step by step. We have $x^2 + 2x + 1 = (x+1)^2$, so the sum is " * 60)[:4000]


def _first(answer) -> str:
    return str(answer[0] if isinstance(answer, list) else answer)


def _response(answer: str) -> str:
    return f"<think>{REASONING}</think> The answer is $\\boxed{{{answer}}}$."


def _load(name: str) -> list[dict]:
    path = SHARED_DATA / "test" / f"{name}.json"
    if not path.exists():
        pytest.skip(f"test data not available at {path}")
    return json.loads(path.read_text())


def _typical_batch(samples_per_answer: int = 1) -> tuple[list[str], list]:
    responses, golds = [], []
    for name in TEST_SETS:
        problems = _load(name)
        for index, problem in enumerate(problems):
            other = problems[(index + 1) % len(problems)]["answer"]
            for answer in (_first(problem["answer"]), _first(other)):
                responses += [_response(answer)] * samples_per_answer
                golds += [problem["answer"]] * samples_per_answer
    return responses, golds


@pytest.fixture(scope="module")
def typical():
    return _typical_batch()


_SERIAL_RATE: dict[str, float] = {}  # responses/s of serial `score` in this run, for the ratios


def _record(benchmark, responses) -> None:
    seconds = benchmark.stats.stats.mean
    rate = len(responses) / seconds
    benchmark.extra_info["responses"] = len(responses)
    benchmark.extra_info["responses_per_s"] = round(rate)
    ratio = f" = {rate / _SERIAL_RATE['rate']:.2f}x serial (same run)" if _SERIAL_RATE and "serial" not in benchmark.name else ""
    if ratio:
        benchmark.extra_info["vs_serial"] = round(rate / _SERIAL_RATE["rate"], 2)
    print(f"\n{benchmark.name}: {len(responses)} responses in {seconds:.2f} s = {rate:.0f} responses/s{ratio}")


def _accuracy_is_about_half(result: list[float]) -> None:
    assert 0.4 < sum(result) / len(result) < 0.6


def test_serial_score(benchmark, typical) -> None:
    responses, golds = typical
    result = benchmark.pedantic(lambda: [score(r, g) for r, g in zip(responses, golds)], setup=clear_caches, rounds=3, iterations=1)
    _accuracy_is_about_half(result)
    _record(benchmark, responses)
    _SERIAL_RATE["rate"] = len(responses) / benchmark.stats.stats.mean


def test_one_off_pool(benchmark, typical) -> None:
    # Includes starting (and stopping) the 2 worker processes on every call: the cost a caller
    # pays once per process (score_batch keeps its pool afterwards).
    responses, golds = typical

    def one_off() -> list[float]:
        with GradingPool(workers=2, lazy=True) as pool:
            return pool.score(responses, golds)

    result = benchmark.pedantic(one_off, setup=clear_caches, rounds=3, iterations=1)
    _accuracy_is_about_half(result)
    _record(benchmark, responses)


def test_score_batch(benchmark, typical) -> None:
    # The shared pool score_batch keeps: its workers are up after the first call.
    responses, golds = typical
    score_batch(responses[:8], golds[:8], workers=2)

    def cold_caches() -> None:
        clear_caches()
        shared_pool(2, DEFAULT_TIMEOUT_S).clear_cache()

    result = benchmark.pedantic(lambda: score_batch(responses, golds, workers=2), setup=cold_caches, rounds=3, iterations=1)
    _accuracy_is_about_half(result)
    _record(benchmark, responses)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "all_in_workers"])
def test_persistent_pool(benchmark, typical, fast_path: bool) -> None:
    _bench_kept_pool(benchmark, *typical, fast_path=fast_path)


def test_persistent_pool_rl_groups(benchmark) -> None:
    _bench_kept_pool(benchmark, *_typical_batch(samples_per_answer=4))


def _bench_kept_pool(benchmark, responses, golds, **pool_options) -> None:
    with GradingPool(workers=2, **pool_options) as pool:
        pool.score(responses[:8], golds[:8])  # the workers are up, as a trainer's pool would be

        def cold_caches() -> None:
            clear_caches()
            pool.clear_cache()

        result = benchmark.pedantic(lambda: pool.score(responses, golds), setup=cold_caches, rounds=3, iterations=1)
        benchmark.extra_info.update(pool.stats())
    _accuracy_is_about_half(result)
    _record(benchmark, responses)
