"""GRPO on math with verifiable rewards: the DeepScaleR recipe as one loop, read top-down.

Every RL step:
  1. rollout    sample `samples_per_prompt` responses for each of `prompts_per_step` prompts
  2. reward     1 if the last \\boxed{} after </think> matches the ground truth, else 0
  3. advantage  per prompt group, A = (r - mean) / (std + 1e-6), broadcast to every response token
  4. logprobs   reference (and, with several mini-batches, old) logprobs of the sampled tokens,
                at the rollout temperature, by packed no-grad forwards
  5. update     `mini_batches` optimizer steps; each packs its sequences into micro-batches of at
                most `max_tokens_per_microbatch` tokens; loss per token = PPO-clip(ratio, A)
                + kl_coef * k3(ref) - entropy_coef * entropy, token-mean over the mini-batch
  6. sync       copy the new weights into the rollout engine, in place
  7. log        metrics.jsonl and the progress bar

Deliberate deviations from DeepScaleR (see ../shared/reference/recipe.md):
  - the loss is the token-mean over the whole mini-batch (the bundled verl fork summed
    per-micro-batch token-means, so micro-batch boundaries changed the gradient);
  - the reward needs </think> but not <think>, an empty answer is never right, and the response
    alone is graded (the prompt's template already holds <think>);
  - with one mini-batch per step the policy has not moved since the rollout, so the "old"
    logprobs are the current ones detached (equal to recomputing them, one forward cheaper).

Run:
  python -m dsr_fast.train                      # embedded default: tiny model, addition, CPU
  python -m dsr_fast.train --model DIR --data ../shared/data/train/dsr_sub.parquet \\
      --temperature 0.6 --lr 1e-6 --samples-per-prompt 8 --prompts-per-step 128 \\
      --mini-batches 2 --max-response-tokens 8192 --max-tokens-per-microbatch 32768
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import toy
from .advantages import broadcast_to_tokens, group_advantages
from .config import TrainConfig, parse_args, to_dict
from .data import DEEPSCALER_INSTRUCTION, encode_prompt, load_problems
from .errors import InputError
from .eval import grade, pass_at_1
from .kernels import fused_logprobs, grpo_loss
from .model import Qwen2
from .packing import IGNORE_INDEX, CostModel, pack, plan_microbatches
from .rollout import BuiltinEngine, SamplingParams
from .sft import response_labels, supervised_finetune

# -----------------------------------------------------------------------------
# helpers used by the loop


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}: cannot load a tokenizer ({e})") from None


def token_logprobs(model, batch, labels, temperature: float, with_entropy: bool):
    """Per-token logprob (and entropy) of `labels` from a packed forward; never builds [T, V] logits."""
    hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    return fused_logprobs(hidden, model.lm_head.weight, labels, temperature=temperature, return_entropy=with_entropy)


def engine_logprobs_at(batch, chosen, completions, prompt_lens) -> torch.Tensor:
    """The engine's logprob of each sampled token, placed at the packed position that predicts it
    (aligned with `response_labels`), 0 elsewhere."""
    out = torch.zeros(batch.num_tokens)
    for start, i in zip(batch.cu_seqlens[:-1].tolist(), chosen):
        at = start + prompt_lens[i] - 1
        out[at : at + len(completions[i].logprobs)] = torch.tensor(completions[i].logprobs)
    return out


class MetricMeans:
    """Token-weighted means of per-micro-batch metric tensors; one host sync at the end."""

    def __init__(self):
        self.sums, self.weight = {}, 0

    def add(self, metrics: dict, weight: int):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach() * weight
        self.weight += weight

    def means(self) -> dict:
        return {k: (v / max(1, self.weight)).item() for k, v in self.sums.items()}


def setup(cfg: TrainConfig, device):
    """Tokenizer, policy, training and held-out problems, and the instruction for prompts."""
    if cfg.model is None:
        tokenizer = toy.build_tokenizer()
        policy = Qwen2(toy.model_config(tokenizer))
        instruction = cfg.instruction or ""
    else:
        policy = Qwen2.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype))
        tokenizer = load_tokenizer(cfg.model)
        instruction = DEEPSCALER_INSTRUCTION if cfg.instruction is None else cfg.instruction
    if cfg.data is not None:
        train_set = load_problems(cfg.data)
    elif cfg.model is None:
        train_set = toy.make_problems(20000, seed=cfg.seed + 1)
    else:
        raise InputError("--model needs --data: a problem file (.json, .jsonl or .parquet)")
    if cfg.eval_data is not None:
        eval_set = load_problems(cfg.eval_data)[: cfg.eval_problems]
    elif cfg.data is None and cfg.model is None:
        seen = {p.problem for p in train_set}
        eval_set = [p for p in toy.make_problems(4 * cfg.eval_problems, seed=cfg.seed + 2) if p.problem not in seen]
        eval_set = eval_set[: cfg.eval_problems]
    else:  # hold out the tail of the shuffled training file
        random.Random(cfg.seed).shuffle(train_set)
        n_eval = min(cfg.eval_problems, len(train_set) // 10)
        train_set, eval_set = train_set[n_eval:], train_set[:n_eval]
    return tokenizer, policy.to(device), train_set, eval_set, instruction


def encode_all(tokenizer, problems, instruction, max_tokens, what):
    """Prompt ids of each problem; problems whose prompt is longer than max_tokens are dropped."""
    kept, ids = [], []
    for p in problems:
        x = encode_prompt(tokenizer, p.problem, instruction)
        if len(x) <= max_tokens:
            kept.append(p)
            ids.append(x)
    if len(kept) < len(problems):
        print(f"{what}: dropped {len(problems) - len(kept)} of {len(problems)} prompts longer than {max_tokens} tokens")
    if not kept:
        raise InputError(f"{what}: no prompt fits in --max-prompt-tokens {max_tokens}")
    return kept, ids


def warm_start(cfg, policy, tokenizer, problems, prompt_ids, device):
    """Supervised warm-start of the embedded model on an imperfect teacher's worked answers."""
    rng = random.Random(cfg.seed + 3)
    eos = tokenizer.eos_token_id
    examples = [
        (x, tokenizer.encode(toy.demonstration(p, cfg.warmstart_unboxed_rate, rng), add_special_tokens=False) + [eos])
        for p, x in zip(problems, prompt_ids)
    ]
    losses = supervised_finetune(
        policy, examples, steps=cfg.warmstart_steps, batch_size=cfg.warmstart_batch, lr=cfg.warmstart_lr,
        seed=cfg.seed, device=device,
    )
    return losses


# -----------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig) -> dict:
    t_start = time.time()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    print(json.dumps(to_dict(cfg)))

    # ---- model, tokenizer, problems
    tokenizer, policy, train_set, eval_set, instruction = setup(cfg, device)
    train_set, train_prompts = encode_all(tokenizer, train_set, instruction, cfg.max_prompt_tokens, "train")
    eval_set, eval_prompts = encode_all(tokenizer, eval_set, instruction, cfg.max_prompt_tokens, "eval")
    stop_ids = tuple({tokenizer.eos_token_id} | set(_as_list(policy.config.eos_token_id)))
    print(f"policy: {policy.num_params() / 1e6:.2f}M parameters on {device}; {len(train_set)} train / {len(eval_set)} eval problems")

    if cfg.model is None and cfg.warmstart_steps > 0:
        t0 = time.time()
        losses = warm_start(cfg, policy, tokenizer, train_set, train_prompts, device)
        print(f"warm-start: {cfg.warmstart_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {time.time() - t0:.0f}s")

    # ---- engine, frozen reference, optimizer
    infer_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine = BuiltinEngine(policy.config, dtype=infer_dtype, device=device, max_batch=cfg.rollout_batch,
                           model=policy if cfg.rollout_shares_weights else None)
    engine.sync_weights(policy)
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    sampling = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_response_tokens, stop_ids, seed=cfg.seed)
    cost_model = CostModel.for_qwen2(policy.config)

    def evaluate(tag: str) -> dict:
        # its own seed, so that evaluating never shifts the training rollouts' random numbers
        eval_sampling = replace(sampling, seed=cfg.seed + 10**6)
        greedy = replace(sampling, temperature=0.0, top_p=1.0)
        res = pass_at_1(engine, tokenizer, eval_set, eval_prompts, samples=cfg.eval_samples, sampling=eval_sampling)
        res_greedy = pass_at_1(engine, tokenizer, eval_set, eval_prompts, samples=1, sampling=greedy)
        print(f"eval {tag}: pass@1 {res.pass_at_1:.3f} (T={cfg.temperature}, {cfg.eval_samples} samples x {len(eval_set)}), greedy {res_greedy.pass_at_1:.3f}")
        return {"pass@1": res.pass_at_1, "greedy": res_greedy.pass_at_1}

    results = {"before": evaluate("before RL")}
    metrics_file = open(out_dir / "metrics.jsonl", "w")
    order = list(range(len(train_set)))
    rng = random.Random(cfg.seed)
    rng.shuffle(order)
    cursor = 0

    bar = tqdm(range(cfg.steps), desc="GRPO", dynamic_ncols=True, file=sys.stdout)
    for step in bar:
        times = {}
        # ---- 1. rollout
        t0 = time.time()
        if cursor + cfg.prompts_per_step > len(order):  # next epoch
            rng.shuffle(order)
            cursor = 0
        picked = order[cursor : cursor + cfg.prompts_per_step]
        cursor += cfg.prompts_per_step
        problems = [train_set[i] for i in picked]
        prompts = [train_prompts[i] for i in picked]
        groups = engine.generate(prompts, n=cfg.samples_per_prompt, sampling=replace(sampling, seed=cfg.seed * 7919 + step))
        times["rollout"] = time.time() - t0

        # ---- 2. reward
        t0 = time.time()
        rewards = torch.tensor(grade(tokenizer, groups, problems), dtype=torch.float32).flatten()  # [P * n]
        times["reward"] = time.time() - t0

        # ---- 3. advantage, and the packed sequences it applies to
        advantages = group_advantages(rewards, cfg.samples_per_prompt, estimator=cfg.advantage)
        seqs, prompt_lens, completions = [], [], []
        for x, group in zip(prompts, groups):
            for c in group:
                seqs.append(x + c.token_ids)
                prompt_lens.append(len(x))
                completions.append(c)

        # ---- 4. plan mini/micro-batches, then reference (and old) logprobs, no grad
        t0 = time.time()
        perm = torch.randperm(len(seqs)).tolist()
        mini_batches = [perm[i :: cfg.mini_batches] for i in range(cfg.mini_batches)]
        plan = []  # per mini-batch: list of (packed batch, labels, token advantages, response tokens)
        for mb in mini_batches:
            micro = []
            microbatches = plan_microbatches([len(seqs[i]) for i in mb], cfg.max_tokens_per_microbatch, cost=cost_model)
            for idx in microbatches.rank(0):
                chosen = [mb[i] for i in idx]
                batch = pack([seqs[i] for i in chosen])
                labels = response_labels([prompt_lens[i] for i in chosen], batch)
                adv = broadcast_to_tokens(advantages[chosen], batch.cu_seqlens)
                engine_lp = engine_logprobs_at(batch, chosen, completions, prompt_lens)
                micro.append({"batch": batch.to(device), "labels": labels.to(device), "adv": adv.to(device),
                              "engine_lp": engine_lp.to(device)})
            plan.append(micro)
        with torch.no_grad():
            for mb in plan:
                for m in mb:
                    if reference is not None:
                        m["ref"], _ = token_logprobs(reference, m["batch"], m["labels"], cfg.temperature, False)
                    if cfg.mini_batches > 1:
                        m["old"], _ = token_logprobs(policy, m["batch"], m["labels"], cfg.temperature, False)
        times["logprobs"] = time.time() - t0

        # ---- 5. update
        t0 = time.time()
        policy.train()
        means, drift, losses, grad_norms, skipped, trained_tokens = MetricMeans(), MetricMeans(), [], [], 0, 0
        engine.sleep()  # the KV cache is not needed while training
        for mb in plan:
            n_tokens = sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in mb)
            optimizer.zero_grad(set_to_none=True)
            mb_loss = 0.0
            for m in mb:
                mask = m["labels"] != IGNORE_INDEX
                logprobs, entropy = token_logprobs(policy, m["batch"], m["labels"], cfg.temperature, True)
                old = m["old"] if "old" in m else logprobs.detach()
                # sync drift: the engine sampled with the weights the trainer had before this update
                drift.add({"sync_drift": ((old - m["engine_lp"]).abs() * mask).sum() / mask.sum().clamp(min=1)},
                          int(mask.sum()))
                loss, metrics = grpo_loss(
                    logprobs, old, m["adv"], m["batch"].cu_seqlens, ref_logprobs=m.get("ref"), entropy=entropy,
                    loss_mask=mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_coef=cfg.kl_coef,
                    kl_type=cfg.kl_type, entropy_coef=cfg.entropy_coef, agg=cfg.loss_agg, num_global_tokens=n_tokens,
                )
                loss.backward()
                mb_loss += loss.detach()
                means.add(metrics, int(mask.sum()))
                trained_tokens += m["batch"].num_tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            if torch.isfinite(grad_norm):  # host sync, once per optimizer step
                optimizer.step()
            else:  # a NaN/inf gradient would poison Adam's moments: skip this step and say so
                skipped += 1
            grad_norms.append(grad_norm.item())
            losses.append(float(mb_loss))
        policy.eval()
        times["update"] = time.time() - t0

        # ---- 6. sync
        t0 = time.time()
        engine.sync_weights(policy)
        engine.wake()
        times["sync"] = time.time() - t0

        # ---- 7. log
        lengths = [len(c.token_ids) for c in completions]
        record = {
            "step": step,
            "reward": rewards.mean().item(),
            "accuracy": (rewards > 0.5).float().mean().item(),
            "response_len_mean": sum(lengths) / len(lengths),
            "response_len_max": max(lengths),
            "truncated": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "grad_norm": max(grad_norms),
            "skipped_steps": skipped,
            "loss": sum(losses) / len(losses),
            **means.means(),
            **drift.means(),
            **{f"time_{k}": round(v, 4) for k, v in times.items()},
            "train_tokens_per_s": trained_tokens / max(times["update"], 1e-9),
        }
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            record["eval"] = evaluate(f"step {step + 1}")
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record.get('kl_mean', 0):.4f}", len=f"{record['response_len_mean']:.0f}")

    metrics_file.close()
    results["after"] = evaluate("after RL")

    # ---- final checkpoint, in Hugging Face format
    final_dir = out_dir / "final"
    policy.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    results["minutes"] = (time.time() - t_start) / 60
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    results["out_dir"] = out_dir
    print(
        f"held-out pass@1 {results['before']['pass@1']:.3f} -> {results['after']['pass@1']:.3f} "
        f"(greedy {results['before']['greedy']:.3f} -> {results['after']['greedy']:.3f}); "
        f"{results['minutes']:.1f} min; checkpoint in {final_dir}"
    )
    return results


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except InputError as e:
        raise SystemExit(f"dsr_fast.train: error: {e}") from None


if __name__ == "__main__":
    main()
