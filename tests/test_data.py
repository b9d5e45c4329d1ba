"""Problem files, prompts, and the bad-input messages a user sees."""

import pytest
from conftest import SHARED_DATA as SHARED

from dsr_fast import toy
from dsr_fast.data import (
    DEEPSCALER_INSTRUCTION,
    encode_prompt,
    load_problems,
    prompt_text,
    user_message,
)
from dsr_fast.errors import InputError

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")


@needs_shared
def test_reads_the_deepscaler_files():
    aime = load_problems(SHARED / "test" / "aime.json")
    assert len(aime) == 30 and all(isinstance(p.answer, str) for p in aime)
    amc = load_problems(SHARED / "test" / "amc.json")
    assert len(amc) == 83 and isinstance(amc[0].answer, float)
    minerva = load_problems(SHARED / "test" / "minerva.json")
    assert len(minerva) == 272 and all(isinstance(p.answer, list) for p in minerva)
    aime25 = load_problems(SHARED / "test" / "aime25" / "test.jsonl")
    assert len(aime25) == 30


@needs_shared
def test_verl_parquet_gives_the_bare_question():
    dsr = load_problems(SHARED / "train" / "dsr_sub.parquet")
    assert len(dsr) == 1209 - 1  # record 265 has an empty ground truth
    assert not any(p.problem.endswith(DEEPSCALER_INSTRUCTION) for p in dsr)
    assert all(isinstance(p.answer, str) and p.answer for p in dsr)


@needs_shared
def test_dsr_sub_prompts_are_byte_identical_to_the_files_own_user_messages():
    """Every prompt we build equals the original's user message (the verl file stores it), over all rows."""
    import pyarrow.parquet as pq

    path = SHARED / "train" / "dsr_sub.parquet"
    rows = [r for r in pq.read_table(path).to_pylist() if r["reward_model"]["ground_truth"].strip()]
    problems = load_problems(path)
    assert len(problems) == len(rows) == 1208
    tok = toy.build_tokenizer()
    trailing_space = 0
    for i, (row, problem) in enumerate(zip(rows, problems)):
        (original,) = row["prompt"]
        assert original["role"] == "user"
        assert user_message(problem.problem) == original["content"], f"row {i}"
        rendered = tok.apply_chat_template([original], tokenize=False, add_generation_prompt=True)
        assert prompt_text(tok, problem.problem) == rendered, f"row {i}"
        trailing_space += problem.problem != problem.problem.rstrip()
    assert trailing_space == 32  # the questions a strip() would have changed are in the set


def test_verl_message_without_the_instruction_is_the_question(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = ["What is 2+2?\n " + DEEPSCALER_INSTRUCTION, "Plain question.  ", "Q? Answer in \\boxed{}."]
    table = pa.table({"prompt": [[{"role": "user", "content": m}] for m in messages],
                      "reward_model": [{"ground_truth": "4", "style": "rule"}] * 3})
    pq.write_table(table, tmp_path / "v.parquet")
    got = [p.problem for p in load_problems(tmp_path / "v.parquet")]
    assert got == ["What is 2+2?\n", "Plain question.  ", "Q? Answer in \\boxed{}."]
    assert user_message(got[0]) == messages[0]


@needs_shared
def test_records_without_answer_are_skipped_and_counted(capsys):
    math_train = load_problems(SHARED / "train" / "math.json")
    assert len(math_train) == 7474 - 4  # two null and two empty answers
    assert "skipped 4 record(s) with no answer" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.json", "{broken", "not valid JSON"),
        ("a.json", '{"problem": "x"}', "expected a JSON list"),
        ("a.json", '[{"problem": "1+1", "answer": "2"}, {"question": "x", "answer": "1"}]', "record 1: missing field 'problem'"),
        ("a.json", '[{"problem": "1+1"}]', "record 0: missing field 'answer'"),
        ("a.json", '[{"problem": "", "answer": "1"}]', "record 0: field 'problem' is not a non-empty string"),
        ("a.json", '[{"problem": "x", "answer": {"a": 1}}]', "unsupported type dict"),
        ("a.jsonl", '{"problem": "x", "answer": "1"}\n{oops\n', "a.jsonl:2: not valid JSON"),
        ("a.csv", "problem,answer\n", "unsupported data format '.csv'"),
        ("a.json", "[]", "no problems"),
    ],
)
def test_bad_files_name_file_and_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        load_problems(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_problems(tmp_path / "nope.json")


def test_prompt_has_instruction_and_generation_prompt():
    tok = toy.build_tokenizer()
    text = prompt_text(tok, "What is 1+1?")
    assert text == f"<|user|>What is 1+1? {DEEPSCALER_INSTRUCTION}<|assistant|><think>\n"
    ids = encode_prompt(tok, "What is 1+1?", instruction="")
    assert tok.decode(ids) == "<|user|>What is 1+1?<|assistant|><think>\n"


def test_toy_task_demonstrations_are_graded_by_the_real_reward():
    from dsr_fast.reward import score

    problems = toy.make_problems(50, seed=0)
    assert problems == toy.make_problems(50, seed=0)
    for p in problems:
        assert score(toy.demonstration(p), p.answer) == 1.0
        terms = [int(t) for t in p.problem.removeprefix("Add: ").split(" + ")]
        assert int(p.answer) == sum(terms) and 3 <= len(terms) <= 5
    # a teacher that never boxes its answer is never graded right
    assert all(score(toy.demonstration(p, unboxed_rate=1.0), p.answer) == 0.0 for p in problems)
