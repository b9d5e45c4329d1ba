"""Batch grading and Pass@1 counting (dsr_fast.grading), and the package's import arrows."""

import ast
from pathlib import Path

import pytest

from dsr_fast import toy
from dsr_fast.data import Problem
from dsr_fast.grading import GradedSamples, grade, pass_at_1, sample_and_grade, score_totals
from dsr_fast.grading_pool import GradingPool
from dsr_fast.reward import score
from dsr_fast.rollout import Completion

PACKAGE = Path(__file__).resolve().parents[1] / "dsr_fast"


def package_imports() -> dict[str, set[str]]:
    """module -> the dsr_fast modules it imports anywhere in its file (function-level imports too)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for name in modules:
        targets = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module is None:  # from . import a, b
                    targets |= {alias.name for alias in node.names}
                elif node.level == 1:
                    targets.add(node.module.split(".")[0])
                elif node.module and node.module.startswith("dsr_fast."):
                    targets.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                targets |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dsr_fast.")}
        graph[name] = targets & modules
    return graph


def test_import_arrows_run_one_way():
    graph = package_imports()
    # grader -> pool -> batch grading -> trainer / eval command, never back
    assert not graph["reward"] & {"grading_pool", "grading", "eval", "train"}
    assert not graph["grading_pool"] & {"grading", "eval", "train"}
    assert not graph["grading"] & {"eval", "train"}
    assert "eval" not in graph["train"], "the trainer imports dsr_fast.grading, not the eval command"
    assert {"grading"} <= graph["train"] and {"grading"} <= graph["eval"]
    # and no cycle anywhere in the package (depth-first search with colours)
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_pass_at_1_is_the_mean_over_problems_and_samples():
    scores = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    assert score_totals(scores) == (6.0, 12)
    assert pass_at_1(scores) == 0.5
    assert pass_at_1([[1.0], [0.0, 0.0, 0.0]]) == 0.25  # per sample, as DeepScaleR's mean over all scores
    assert pass_at_1([]) == 0.0


RESPONSES = [
    ["</think> so \\boxed{\\frac{1}{2}}", "</think> \\boxed{0.5}", "no think gate \\boxed{1/2}", "</think> \\boxed{2/4}"],
    ["</think> \\boxed{2\\sqrt{3}}", "</think> \\boxed{\\sqrt{12}}", "</think> \\boxed{}", "</think> nothing"],
]
ANSWERS = ["\\frac{1}{2}", "\\sqrt{12}"]


class FakeEngine:
    """Returns canned responses (as token ids of the toy tokenizer), n per prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompt_ids, n, sampling=None, seeds=None):
        assert len(prompt_ids) == len(RESPONSES) and n == len(RESPONSES[0])
        return [[Completion(self.tokenizer.encode(text, add_special_tokens=False), [], "stop") for text in group]
                for group in RESPONSES]


def test_grade_serial_and_pooled_agree_with_the_one_response_grader():
    tokenizer = toy.build_tokenizer()
    completions = FakeEngine(tokenizer).generate([[1], [2]], n=4)
    problems = [Problem("q1", ANSWERS[0]), Problem("q2", ANSWERS[1])]
    expected = [[score(text, answer) for text in group] for group, answer in zip(RESPONSES, ANSWERS)]
    assert expected == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    assert grade(tokenizer, completions, problems) == expected
    with GradingPool(workers=1, timeout_s=5.0) as pool:
        assert grade(tokenizer, completions, problems, pool=pool) == expected
    result = sample_and_grade(FakeEngine(tokenizer), tokenizer, problems, [[1], [2]], samples=4, sampling=None)
    assert isinstance(result, GradedSamples) and result.scores == expected and result.pass_at_1 == 0.5
    with pytest.raises(ValueError, match="2 groups of completions but 1 problems"):
        grade(tokenizer, completions, problems[:1])
