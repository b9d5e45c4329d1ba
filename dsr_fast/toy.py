"""The embedded default: a tiny Qwen2, a byte tokenizer and a synthetic addition task.

Everything is built in code (no downloads), so `python -m dsr_fast.train` runs the whole RL loop
on a CPU in minutes. Problems are sums of 3-5 single-digit terms, answered in DeepScaleR's format:

    prompt:   <|user|>Add: 8 + 7 + 4 + 5<|assistant|><think>\n
    response: 8+7=15\n15+4=19\n19+5=24\n</think> \\boxed{24}<|endoftext|>

and graded by the real reward (dsr_fast.reward). The warm-start teacher always adds correctly but
states most of its totals in words ("The answer is 24.") instead of in \\boxed{}, which the
grader cannot read. So the warm-started model can add but is mostly scored wrong, and GRPO has to
discover from the reward alone which way of answering pays: the format lesson that comes first
in real RL runs on reasoning models, with the arithmetic (sampled at T=1) to sharpen besides.
"""

from __future__ import annotations

import random

from .data import Problem
from .model import Qwen2Config

SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<think>", "</think>"]
# The generation prompt opens the thought, as newer DeepSeek-R1 templates do.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|endoftext|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)


def build_tokenizer():
    """Qwen2's byte-level BPE with no merges: one token per byte, plus the chat/think tokens.

    Being a real Qwen2Tokenizer, it saves and reloads through AutoTokenizer unchanged (transformers
    picks the tokenizer class from the model's config.json, which says qwen2).
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(tokenizer) -> Qwen2Config:
    """~0.8M parameters: small enough for a CPU, big enough to learn the task."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, as Qwen2-1.5B (12 query / 2 kv heads)
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.05,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_problems(count: int, seed: int, min_terms: int = 3, max_terms: int = 5, max_value: int = 9) -> list[Problem]:
    """Random addition problems; the same seed gives the same problems."""
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        terms = [rng.randint(1, max_value) for _ in range(rng.randint(min_terms, max_terms))]
        problems.append(Problem(problem="Add: " + " + ".join(map(str, terms)), answer=str(sum(terms))))
    return problems


def demonstration(problem: Problem, unboxed_rate: float = 0.0, rng: random.Random | None = None) -> str:
    """A worked response: correct running sums, then the total.

    With probability unboxed_rate the total is stated in words instead of \\boxed{}, which the
    grader cannot read (as DeepScaleR's grader, it scores only the last boxed answer).
    """
    rng = rng or random.Random(0)
    terms = [int(t) for t in problem.problem.removeprefix("Add: ").split(" + ")]
    lines, total = [], terms[0]
    for t in terms[1:]:
        lines.append(f"{total}+{t}={total + t}")
        total += t
    answer = f"The answer is {total}." if rng.random() < unboxed_rate else f"\\boxed{{{total}}}"
    return "\n".join(lines) + f"\n</think> {answer}"
