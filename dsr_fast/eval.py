"""Pass@1 evaluation: generate `samples` responses per problem, grade each, average.

Pass@1 is the mean score over problems x samples at the sampling temperature (DeepScaleR's
protocol, recipe.md section 4: 16 samples, T=0.6, top-p 0.95, 32,768 new tokens). Responses are
graded on the response text only, with special tokens kept so the grader sees `</think>`.

Grading and Pass@1 counting live in dsr_fast.grading, shared with the trainer's validation.
The command:

    python -m dsr_fast.eval --model DIR --data ../shared/data/test/aime.json,../shared/data/test/math.json \\
        --samples 16 --temperature 0.6 --top-p 0.95 --max-tokens 32768 --out runs/eval.jsonl

prints a Pass@1 table per dataset and their average (like the DeepScaleR README) and writes
every generation and verdict to --out (see dsr_fast.eval_results). Rerunning the same command
resumes: problems already in --out are not generated again. Each sample's random numbers come
from (--seed, dataset, problem, sample), so a resumed run gives what an uninterrupted one would,
whatever --batch is.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .data import DEEPSCALER_INSTRUCTION, Problem, encode_prompt, load_problems
from .errors import InputError
from .eval_results import ResultsFile, check_record_matches, format_table
from .grading import pass_at_1, response_texts
from .grading_pool import GradingPool
from .reward import DEFAULT_TIMEOUT_S, extract_answer
from .rollout import SamplingParams

# -----------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dsr_fast.eval",
        description="Pass@1 of a Qwen2 checkpoint on math problem files, DeepScaleR's protocol by default.",
    )
    parser.add_argument("--model", required=True, help="local Hugging Face Qwen2 directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--data", required=True, help="problem files, comma-separated (.json, .jsonl or .parquet with problem/answer)")
    parser.add_argument("--out", required=True, help="results file (.jsonl): every generation and verdict; rerun to resume")
    parser.add_argument("--samples", type=int, default=16, help="samples per problem (default 16)")
    parser.add_argument("--temperature", type=float, default=0.6, help="default 0.6")
    parser.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    parser.add_argument("--max-tokens", type=int, default=32768, help="most new tokens per sample (default 32768)")
    parser.add_argument("--engine", choices=["builtin", "vllm"], default="builtin", help="generation engine (default builtin)")
    parser.add_argument("--max-problems", type=int, default=None, help="only the first N problems of each file (quick runs)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--instruction", default=DEEPSCALER_INSTRUCTION, help="appended to each problem in the user message ('' for none); default DeepScaleR's")
    parser.add_argument(
        "--batch", type=int, default=4,
        help="problems generated together (default 4, i.e. 64 sequences at 16 samples; the built-in engine's KV cache "
        "holds batch x samples x (prompt + max-tokens) tokens)",
    )
    parser.add_argument("--grading-workers", type=int, default=2, help="grading processes (default 2)")
    parser.add_argument("--grading-timeout", type=float, default=DEFAULT_TIMEOUT_S, help=f"seconds per response's grading (default {DEFAULT_TIMEOUT_S})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except InputError as error:
        print(f"dsr_fast.eval: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass
class Dataset:
    name: str  # file stem, or the folder's name for generic stems (test/aime25/test.jsonl -> aime25)
    path: Path
    problems: list[Problem]  # those in scope (--max-problems)
    total: int  # problems in the file


def run(args: argparse.Namespace) -> dict[str, float]:
    """Evaluate, print the table; returns Pass@1 per dataset name (0..1)."""
    _check_numbers(args)
    _check_engine(args.engine)
    datasets = load_datasets(args.data, args.max_problems)
    device, dtype_name = _resolve_device(args.device, args.dtype)
    settings = {
        "model": str(Path(args.model).resolve()),
        "engine": args.engine,
        "dtype": dtype_name,
        "samples": args.samples,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "instruction": args.instruction,
    }
    with ResultsFile(args.out, settings) as results:
        todo = []  # (dataset, index) still to generate
        for dataset in datasets:
            finished = 0
            for index, problem in enumerate(dataset.problems):
                record = results.records.get((dataset.name, index))
                if record is None:
                    todo.append((dataset, index))
                else:
                    check_record_matches(results, record, problem.problem, problem.answer, f"{dataset.path} record {index}")
                    finished += 1
            print(f"{dataset.name}: {len(dataset.problems)} of {dataset.total} problems, {finished} already in {results.path}")
        if todo:
            _generate_and_grade(args, todo, results, device, dtype_name)
        by_dataset = {
            dataset.name: pass_at_1([[s["score"] for s in results.records[(dataset.name, i)]["samples"]]
                                     for i in range(len(dataset.problems))])
            for dataset in datasets
        }
    print()
    print(format_table(Path(args.model).name, by_dataset))
    scope = ", ".join(f"{d.name} {len(d.problems)}/{d.total}" for d in datasets)
    print(
        f"Pass@1 (%): mean over problems x {args.samples} samples; T={args.temperature}, top-p {args.top_p}, "
        f"max {args.max_tokens} new tokens, seed {args.seed}; problems: {scope}; results in {results.path}"
    )
    return by_dataset


def _check_numbers(args: argparse.Namespace) -> None:
    checks = [
        (args.samples >= 1, f"--samples must be >= 1, got {args.samples}"),
        (args.temperature >= 0, f"--temperature must be >= 0, got {args.temperature}"),
        (0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (args.max_tokens >= 1, f"--max-tokens must be >= 1, got {args.max_tokens}"),
        (args.batch >= 1, f"--batch must be >= 1, got {args.batch}"),
        (args.max_problems is None or args.max_problems >= 1, f"--max-problems must be >= 1, got {args.max_problems}"),
        (args.grading_workers >= 1, f"--grading-workers must be >= 1, got {args.grading_workers}"),
        (args.grading_timeout > 0, f"--grading-timeout must be > 0, got {args.grading_timeout}"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)


def _check_engine(engine: str) -> None:
    """Refuse an engine that cannot run here before any model is loaded."""
    # find_spec, not import: importing vLLM takes long and can fail loudly on a machine without CUDA.
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise InputError(
            "--engine vllm: vLLM is not installed in this environment (on a CUDA machine: "
            "pip install 'dsr-fast[vllm]'); use --engine builtin"
        )


_GENERIC_STEMS = {"test", "train", "val", "validation", "eval", "data"}


def load_datasets(data: str, max_problems: int | None) -> list[Dataset]:
    paths = [Path(part.strip()) for part in data.split(",") if part.strip()]
    if not paths:
        raise InputError("--data: no file given")
    datasets, seen = [], {}
    for path in paths:
        name = path.parent.name if path.stem.lower() in _GENERIC_STEMS and path.parent.name else path.stem
        if name in seen:
            raise InputError(f"--data: {seen[name]} and {path} would both be reported as {name!r}; rename one of them")
        seen[name] = path
        problems = load_problems(path)  # InputError naming the file and record
        datasets.append(Dataset(name, path, problems[:max_problems], len(problems)))
    return datasets


def _resolve_device(device: str, dtype: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def request_seed(seed: int, dataset: str, index: int, sample: int) -> int:
    """The sampling seed of one sample: fixed by what is sampled, not by batching or resuming."""
    digest = hashlib.blake2b(f"{seed}/{dataset}/{index}/{sample}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1  # 31 bits: the engine hashes the low 32


@dataclass
class LoadedModel:
    tokenizer: object
    engine: object  # generate(prompt_ids, n, sampling, seeds) -> list[list[Completion]]
    stop_token_ids: tuple[int, ...]
    context_limit: int


def load_model(model_dir: str, device: str, dtype_name: str, max_batch: int, engine_name: str = "builtin") -> LoadedModel:
    """Tokenizer and an engine (built-in, or vLLM reading the directory itself) with the checkpoint's weights."""
    import torch
    from transformers import AutoTokenizer

    from .model import Qwen2, Qwen2Config
    from .rollout import BuiltinEngine

    dtype = getattr(torch, dtype_name)
    if engine_name == "vllm":  # vLLM loads the weights itself
        config = Qwen2Config.from_json_file(Path(model_dir) / "config.json")  # InputError if missing
    else:
        model = Qwen2.from_pretrained(model_dir, dtype=dtype)  # InputError for a bad directory
        config = model.config
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise InputError(f"{model_dir}: cannot load a tokenizer ({error})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{model_dir}: the tokenizer has no chat template (tokenizer_config.json 'chat_template')")
    if engine_name == "vllm":
        from .vllm_engine import VLLMEngine

        engine = VLLMEngine(model_dir, dtype=dtype, max_batch=max_batch)
    else:
        engine = BuiltinEngine(model.config, dtype=dtype, device=device, max_batch=max_batch)
        engine.sync_weights(model)
    eos = config.eos_token_id
    stop_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    return LoadedModel(tokenizer, engine, tuple(sorted(stop_ids)), config.max_position_embeddings)


def _generate_and_grade(args, todo: list[tuple[Dataset, int]], results: ResultsFile, device: str, dtype_name: str) -> None:
    loaded = load_model(args.model, device, dtype_name, max_batch=args.batch * args.samples, engine_name=args.engine)
    tokenizer = loaded.tokenizer
    prompts = {}
    for dataset, index in todo:
        ids = encode_prompt(tokenizer, dataset.problems[index].problem, args.instruction)
        if len(ids) + args.max_tokens > loaded.context_limit:
            raise InputError(
                f"{dataset.path} record {index}: prompt of {len(ids)} tokens + --max-tokens {args.max_tokens} exceeds the "
                f"model's context of {loaded.context_limit} tokens (max_position_embeddings in {args.model}/config.json)"
            )
        prompts[(dataset.name, index)] = ids
    sampling = SamplingParams(args.temperature, args.top_p, args.max_tokens, loaded.stop_token_ids, seed=args.seed)
    print(f"generating {len(todo)} problems x {args.samples} samples on {device} ({dtype_name}), {args.batch} problems at a time")
    start = time.time()
    # Grading runs between generation batches, not alongside: it takes well under a second per
    # batch, and writing each batch as soon as it is graded keeps what a kill can lose small.
    with GradingPool(args.grading_workers, args.grading_timeout, lazy=True) as pool:
        for first in range(0, len(todo), args.batch):
            batch = todo[first : first + args.batch]
            seeds = [request_seed(args.seed, d.name, i, j) for d, i in batch for j in range(args.samples)]
            groups = loaded.engine.generate([prompts[(d.name, i)] for d, i in batch], n=args.samples, sampling=sampling, seeds=seeds)
            texts = [text for group in response_texts(tokenizer, groups) for text in group]
            answers = [d.problems[i].answer for d, i in batch for _ in range(args.samples)]
            job = pool.submit(texts, answers)
            scores, statuses = job.result(), job.statuses
            for k, ((dataset, index), group) in enumerate(zip(batch, groups)):
                rows = range(k * args.samples, (k + 1) * args.samples)
                samples = [
                    {
                        "score": scores[r],
                        "status": statuses[r],
                        "extracted": extract_answer(texts[r]),
                        "finish_reason": completion.finish_reason,
                        "num_tokens": len(completion.token_ids),
                        "text": texts[r],
                    }
                    for r, completion in zip(rows, group)
                ]
                problem = dataset.problems[index]
                results.add(
                    {
                        "dataset": dataset.name,
                        "file": str(dataset.path),
                        "index": index,
                        "problem": problem.problem,
                        "answer": problem.answer,
                        "pass_at_1": pass_at_1([[s["score"] for s in samples]]),
                        "samples": samples,
                    }
                )
            done = first + len(batch)
            print(f"  {done}/{len(todo)} problems generated and graded ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
