"""The embedded default: a tiny Qwen2, a character tokenizer and a synthetic arithmetic task.

Everything is built in code (no downloads), so `python -m dsr_fast.train` runs the whole RL loop
on a CPU in minutes. The task is multi-term addition answered in DeepScaleR's format:

    prompt:   <|user|>Add: 8 + 7 + 4 + 5<|assistant|><think>\n
    response: 8+7=15\n15+4=19\n19+5=24\n</think> \\boxed{24}<|endoftext|>

Each line of the thought is one running-sum step, so a small error rate per step compounds over
the terms: a model that adds roughly right gets few whole answers right, which leaves GRPO room
to show a clear rise in accuracy.
"""

from __future__ import annotations

import random
import string

from .data import Problem
from .model import Qwen2Config

SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<think>", "</think>", "<|unk|>"]
# The generation prompt opens the thought, as newer DeepSeek-R1 templates do.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|endoftext|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)


def build_tokenizer():
    """One token per printable ASCII character, plus the chat/think special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|unk|>"
    )
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


def demonstration(problem: Problem, error_rate: float = 0.0, rng: random.Random | None = None) -> str:
    """A worked response in the task's format (the warm-start's teacher).

    With error_rate > 0 each running-sum step slips by a small amount with that probability and
    the slip carries into the rest of the sum, like a flawed reasoning trace: the format is always
    right, the answer often is not.
    """
    rng = rng or random.Random(0)
    terms = [int(t) for t in problem.problem.removeprefix("Add: ").split(" + ")]
    lines, total = [], terms[0]
    for t in terms[1:]:
        result = total + t
        if rng.random() < error_rate:
            result = max(0, result + rng.choice([-3, -2, -1, 1, 2, 3]))
        lines.append(f"{total}+{t}={result}")
        total = result
    return "\n".join(lines) + f"\n</think> \\boxed{{{total}}}"
