"""Pass@1 evaluation: generate `samples` responses per problem, grade each, average.

Pass@1 is the mean score over problems x samples at the sampling temperature (DeepScaleR's
protocol: 16 samples, T=0.6, top-p 0.95). Responses are graded on the response text only, with
special tokens kept so the grader sees `</think>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .data import Problem
from .reward import score
from .rollout import Completion, SamplingParams


@dataclass
class EvalResult:
    pass_at_1: float
    scores: list[list[float]]  # [problem][sample]
    completions: list[list[Completion]]


def grade(tokenizer, completions: Sequence[Sequence[Completion]], problems: Sequence[Problem]) -> list[list[float]]:
    return [
        [score(tokenizer.decode(c.token_ids, skip_special_tokens=False), p.answer) for c in group]
        for group, p in zip(completions, problems)
    ]


def pass_at_1(engine, tokenizer, problems: Sequence[Problem], prompt_ids: Sequence[list[int]], *, samples: int, sampling: SamplingParams) -> EvalResult:
    completions = engine.generate(prompt_ids, n=samples, sampling=sampling)
    scores = grade(tokenizer, completions, problems)
    flat = [s for group in scores for s in group]
    return EvalResult(sum(flat) / max(1, len(flat)), scores, completions)
