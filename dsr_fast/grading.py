"""Batch grading and Pass@1 counting: the one place the trainer and the eval command share.

Imports run one way, so each layer can be read (and tested) without the ones above it:

    train.py, eval.py  ->  grading.py  ->  grading_pool.py  ->  reward.py  ->  safe_sympy.py

reward.py grades one response in this process; grading_pool.py grades many in worker processes
with hard timeouts; this module turns the engine's completions into texts, scores them (serially
or through a pool) and counts Pass@1 the way DeepScaleR does: the mean score over every
problem x sample (recipe.md section 4), so each problem weighs the same when all have the same
sample count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .grading_pool import GradingPool, shared_pool
from .reward import DEFAULT_TIMEOUT_S, GroundTruth, score


@dataclass
class GradedSamples:
    scores: list[list[float]]  # [problem][sample]
    completions: list  # [problem][sample] rollout.Completion

    @property
    def pass_at_1(self) -> float:
        return pass_at_1(self.scores)


def score_batch(
    responses: Sequence[str],
    ground_truths: Sequence[GroundTruth],
    *,
    workers: int = 2,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[float]:
    """Rewards of many responses, in order, graded by a pool of ``workers`` processes.

    Each response whose verdict needs sympy gets ``timeout_s`` seconds in a worker; one that
    overruns, or whose worker dies, scores 0 and the rest go on. The pool is kept for later calls
    with the same settings (:func:`dsr_fast.grading_pool.shared_pool`); a trainer that wants to
    overlap grading with GPU work, or per-item statuses, keeps its own GradingPool and submits.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"score_batch: {len(responses)} responses but {len(ground_truths)} ground truths")
    return shared_pool(workers, timeout_s).score(responses, ground_truths)


def response_texts(tokenizer, completions: Sequence[Sequence]) -> list[list[str]]:
    """What the grader reads: the response alone, special tokens kept so that `</think>` is seen."""
    return [[tokenizer.decode(c.token_ids, skip_special_tokens=False) for c in group] for group in completions]


def grade(tokenizer, completions: Sequence[Sequence], problems: Sequence, *, pool: GradingPool | None = None) -> list[list[float]]:
    """Scores [problem][sample] of each problem's group of completions.

    Without a pool, graded in this process (SIGALRM time limit in the main thread); with one, in
    its worker processes (hard timeouts, crash recovery).
    """
    if len(completions) != len(problems):
        raise ValueError(f"grade: {len(completions)} groups of completions but {len(problems)} problems")
    texts = response_texts(tokenizer, completions)
    if pool is None:
        return [[score(text, p.answer) for text in group] for group, p in zip(texts, problems)]
    flat = pool.score([t for group in texts for t in group], [p.answer for group, p in zip(texts, problems) for _ in group])
    scores, start = [], 0
    for group in texts:
        scores.append(flat[start : start + len(group)])
        start += len(group)
    return scores


def score_totals(scores: Sequence[Sequence[float]]) -> tuple[float, int]:
    """(sum of scores, number of samples): what ranks add up before dividing."""
    return float(sum(map(sum, scores))), sum(map(len, scores))


def pass_at_1(scores: Sequence[Sequence[float]]) -> float:
    """Mean score over all problems x samples; 0.0 for no samples."""
    total, count = score_totals(scores)
    return total / count if count else 0.0


def sample_and_grade(engine, tokenizer, problems: Sequence, prompt_ids: Sequence[list[int]], *, samples: int, sampling,
                     seeds: list[int] | None = None, pool: GradingPool | None = None) -> GradedSamples:
    """Generate `samples` responses per problem and grade them."""
    completions = engine.generate(list(prompt_ids), n=samples, sampling=sampling, seeds=seeds)
    return GradedSamples(grade(tokenizer, completions, problems, pool=pool), completions)
