"""Problem files and prompts.

A problem file holds records with a question and its ground truth, in one of:
- `.json`: a list of objects with `problem` and `answer` (DeepScaleR's train/test files);
- `.jsonl`: one such object per line;
- `.parquet`: verl's format (`prompt` = list of chat messages whose first user message is the
  question, `reward_model.ground_truth` = the answer), or flat `problem`/`answer` columns.
  A user message that ends with `" " + DEEPSCALER_INSTRUCTION` gives the question before it,
  byte for byte (trailing spaces and newlines kept), so that `user_message` rebuilds the file's
  own message exactly; any other user message is the question as a whole.
The answer may be a string, a number or a list of acceptable answers (the grader takes any).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

# DeepScaleR's prompt: the question, then this sentence, as one user message (recipe §1.5).
DEEPSCALER_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


@dataclass
class Problem:
    problem: str
    answer: Any  # str | int | float | list


def load_problems(path: str | Path) -> list[Problem]:
    """Read a problem file; a malformed file or record is an InputError naming file and record.

    Records with no answer (null or an empty string) are dropped with a printed count: MATH's
    train split has two nulls, DSR-sub one empty answer, and nothing could ever grade them correct.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: data file does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        records = _read_json(path)
    elif suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise InputError(f"{path}: unsupported data format {suffix!r} (use .json, .jsonl or .parquet)")
    problems, no_answer = [], []
    for i, rec in enumerate(records):
        problem = _to_problem(rec)
        if isinstance(problem, str):
            raise InputError(f"{path}: record {i}: {problem}")
        if problem.answer is None or (isinstance(problem.answer, str) and not problem.answer.strip()):
            no_answer.append(i)
            continue
        problems.append(problem)
    if no_answer:
        print(f"{path}: skipped {len(no_answer)} record(s) with no answer: {no_answer[:10]}")
    if not problems:
        raise InputError(f"{path}: no problems in file")
    return problems


def _read_json(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list:
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return records


def _read_parquet(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise InputError(f"{path}: cannot read parquet ({e})") from None


def _to_problem(rec: Any) -> Problem | str:
    """A Problem, or a string saying what is wrong with the record."""
    if not isinstance(rec, dict):
        return f"expected an object, got {type(rec).__name__}"
    if "problem" in rec:
        question = rec["problem"]
    elif "prompt" in rec:  # verl: a list of chat messages
        users = [m.get("content") for m in rec["prompt"] or [] if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            return "field 'prompt' has no user message"
        # exactly one separator, nothing stripped: 32 DSR-sub questions end in whitespace that the
        # original's prompt keeps ("...\n Let's think")
        question = users[0].removesuffix(" " + DEEPSCALER_INSTRUCTION)
    else:
        return f"missing field 'problem' (fields: {sorted(rec)})"
    if "answer" in rec:
        answer = rec["answer"]
    elif isinstance(rec.get("reward_model"), dict) and "ground_truth" in rec["reward_model"]:
        answer = rec["reward_model"]["ground_truth"]
    else:
        return f"missing field 'answer' (or reward_model.ground_truth) (fields: {sorted(rec)})"
    if not isinstance(question, str) or not question.strip():
        return "field 'problem' is not a non-empty string"
    if answer is not None and not isinstance(answer, (str, int, float, list)):
        return f"field 'answer' has unsupported type {type(answer).__name__}"
    return Problem(problem=question, answer=answer)


def user_message(question: str, instruction: str = DEEPSCALER_INSTRUCTION) -> str:
    """The one user message: DeepScaleR's `f"{problem} {instruction}"` (recipe §1.5), unstripped."""
    return f"{question} {instruction}" if instruction else question


def prompt_text(tokenizer, question: str, instruction: str = DEEPSCALER_INSTRUCTION) -> str:
    """The chat-templated prompt, ending where the model starts writing."""
    messages = [{"role": "user", "content": user_message(question, instruction)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, question: str, instruction: str = DEEPSCALER_INSTRUCTION) -> list[int]:
    # the template already holds any BOS token, so don't let the tokenizer add another
    return tokenizer.encode(prompt_text(tokenizer, question, instruction), add_special_tokens=False)
