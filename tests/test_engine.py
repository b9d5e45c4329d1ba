"""The paged engine: completions vs a full-forward reference loop, under any budget (preemption),
shared prompt blocks, live-length decode, bucket padding, bad requests, the block pool."""

import pytest
import torch

from dsr_fast.engine import BuiltinEngine, SamplingParams, request_seeds, sample
from dsr_fast.engine.blocks import BlockPool
from dsr_fast.engine.graphs import DecodeGraphs, batch_buckets, bucket_for
from dsr_fast.model import Qwen2, Qwen2Config
from dsr_fast.packing import pack

VOCAB = 97


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    model = Qwen2(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def engine_for(policy, **kwargs):
    eng = BuiltinEngine(policy.config, **kwargs)
    eng.sync_weights(policy)
    return eng


def prompts(seed=1, lengths=(6, 19, 2, 9)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def tokens(out):
    return [[c.token_ids for c in g] for g in out]


@torch.no_grad()
def reference_loop(model, ps, n, sp: SamplingParams):
    """The pre-paging semantics without any cache: each token from a full-sequence forward of
    prompt + tokens so far, sampled with the request's seed at its position."""
    seeds = request_seeds(sp.seed, len(ps) * n)
    out = []
    for i, p in enumerate(ps):
        group = []
        for j in range(n):
            ids, lps, reason = list(p), [], "length"
            while len(ids) - len(p) < sp.max_tokens:
                b = pack([ids])
                hidden = model(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen)
                logits = model.logits(hidden[-1:]).float()
                tok, lp = sample(logits, sp, seeds[i * n + j : i * n + j + 1], torch.tensor([len(ids)]))
                ids.append(int(tok))
                lps.append(float(lp))
                if int(tok) in sp.stop_token_ids:
                    reason = "stop"
                    break
            group.append((ids[len(p):], lps, reason))
        out.append(group)
    return out


def assert_same(out, ref, tol=1e-5):
    assert tokens(out) == [[r[0] for r in g] for g in ref]
    for g, rg in zip(out, ref):
        for c, r in zip(g, rg):
            assert c.finish_reason == r[2]
            assert c.logprobs == pytest.approx(r[1], abs=tol)


@pytest.mark.parametrize("block_size", [4, 16])
def test_completions_equal_full_forward_reference(policy, block_size):
    ps = prompts()
    sp = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=14, seed=3)
    free = engine_for(policy, block_size=block_size).generate(ps, n=3, sampling=sp)
    stops = tuple({g[1].token_ids[3] for g in free})  # some requests stop early: a ragged batch
    sp = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=14, seed=3, stop_token_ids=stops)
    eng = engine_for(policy, block_size=block_size)
    out = eng.generate(ps, n=3, sampling=sp)
    assert_same(out, reference_loop(policy, ps, 3, sp))
    assert len({len(c.token_ids) for g in out for c in g}) > 2
    assert eng.stats["preemptions"] == 0 and eng.stats["decode_steps"] > 0


def test_preemption_keeps_completions(policy):
    ps = prompts(2, lengths=(5, 23, 12, 3, 17))
    sp = SamplingParams(temperature=1.0, max_tokens=20, seed=9)
    roomy = engine_for(policy, block_size=4)
    want = roomy.generate(ps, n=3, sampling=sp)
    assert roomy.stats["preemptions"] == 0
    # 48 tokens: the longest request (23 + 20) fits alone, but not next to the others
    tight = engine_for(policy, block_size=4, kv_cache_tokens=48)
    got = tight.generate(ps, n=3, sampling=sp)
    assert tight.stats["preemptions"] > 0
    assert tight.stats["peak_kv_tokens"] <= tight.stats["kv_capacity_tokens"] == 48
    assert tokens(got) == tokens(want)
    for g1, g2 in zip(got, want):
        for a, b in zip(g1, g2):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5) and a.finish_reason == b.finish_reason
    # and both equal the cache-free reference
    assert_same(got, reference_loop(policy, ps, 3, sp))


def test_group_stores_its_prompt_once(policy):
    bs, n, prompt_len, new = 8, 8, 37, 10
    eng = engine_for(policy, block_size=bs)
    (p,) = prompts(4, lengths=(prompt_len,))
    eng.generate([p], n=n, sampling=SamplingParams(temperature=1.0, max_tokens=new, seed=1))
    # each sample caches prompt + new - 1 tokens (the last sampled token is never fed back)
    full = prompt_len // bs
    own = -(-(prompt_len + new - 1) // bs) - full  # the copied partial block and the response's blocks
    assert eng.stats["peak_kv_tokens"] == (full + n * own) * bs
    assert eng.stats["peak_kv_tokens"] <= prompt_len + n * new + (n + 1) * bs  # prompt once + n responses, a block each
    assert eng.stats["peak_kv_tokens"] < n * prompt_len


def test_group_forks_across_admissions(policy):
    # max_batch 3 < n: later samples of a prompt fork from a running sibling (its blocks and the
    # kept prompt logits) instead of prefilling again; results still those of the reference
    ps = prompts(5, lengths=(13, 6))
    sp = SamplingParams(temperature=1.0, max_tokens=9, seed=4, stop_token_ids=(3, 7, 11))
    eng = engine_for(policy, block_size=4, max_batch=3)
    out = eng.generate(ps, n=4, sampling=sp)
    assert_same(out, reference_loop(policy, ps, 4, sp))
    assert eng.stats["prefill_tokens"] < 4 * (13 + 6)
    assert eng.stats["peak_running"] == 3


def test_decode_reads_live_blocks_only(policy, monkeypatch):
    ps = prompts(6, lengths=(7, 12))
    sp = SamplingParams(temperature=1.0, max_tokens=10, seed=2)
    outs, widths = [], []
    for capacity in (64, 8192):
        eng = engine_for(policy, block_size=4, kv_cache_tokens=capacity)
        runner = eng._runner()
        step = runner.decode_step

        def spy(input_ids, seq_lens, block_table, step=step):
            widths.append((capacity, block_table.shape[1], int(seq_lens.max())))
            return step(input_ids, seq_lens, block_table)

        monkeypatch.setattr(runner, "decode_step", spy)
        outs.append(tokens(eng.generate(ps, n=2, sampling=sp)))
    assert outs[0] == outs[1]
    # every step gathers exactly the blocks of the longest live sequence, whatever the capacity
    assert all(width == -(-longest // 4) for _, width, longest in widths)
    assert max(w for _, w, _ in widths) <= -(-(12 + 10) // 4)


def test_bucket_padding_equals_unpadded_step(policy):
    assert batch_buckets(12) == [1, 2, 4, 8, 12] and batch_buckets(1) == [1] and batch_buckets(16) == [1, 2, 4, 8, 16]
    assert [bucket_for(n, batch_buckets(12)) for n in (1, 3, 8, 9, 12)] == [1, 4, 8, 12, 12]
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(13, batch_buckets(12))
    eng = engine_for(policy, block_size=4, max_batch=12)
    eng.generate(prompts(), n=2, sampling=SamplingParams(max_tokens=6))  # some K/V in the pool
    runner = eng.runner
    graphs = DecodeGraphs(runner.decode_step, 12, runner.max_blocks_per_seq, runner.device, capture=False)
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([5, 9, 1, 13, 7], dtype=torch.int32)
    table = torch.randint(1, runner.num_blocks, (5, 4), generator=g, dtype=torch.int32)
    ids = torch.randint(0, VOCAB, (5,), generator=g)
    before = runner.k_pool.clone()
    want = runner.decode_step(ids, lens, table)
    after_unpadded = runner.k_pool.clone()
    runner.k_pool.copy_(before)
    got = graphs.run(ids, lens, table)  # padded to bucket 8 with 3 rows of length 0
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the padded step wrote the live rows' slots and, for the padding rows, only the null block
    by_block = lambda pool: pool.movedim(runner.block_axis, 0)  # noqa: E731  [num_blocks, ...]
    torch.testing.assert_close(by_block(runner.k_pool)[1:], by_block(after_unpadded)[1:], rtol=1e-5, atol=1e-5)
    written = set((by_block(runner.k_pool) != by_block(before)).flatten(1).any(-1).nonzero().flatten().tolist())
    last_blocks = {int(table[r, (int(lens[r]) - 1) // 4]) for r in range(5)}
    assert written == last_blocks | {0}


def test_request_that_cannot_fit_the_pool(policy):
    ps = prompts(7, lengths=(5, 40, 8))
    sp = SamplingParams(temperature=1.0, max_tokens=12, seed=6)
    eng = engine_for(policy, block_size=4, kv_cache_tokens=48)
    with pytest.raises(ValueError, match=r"prompt 1: 40 tokens \+ max_tokens 12 cannot fit in the KV pool \(48 tokens\)"):
        eng.generate(ps, n=2, sampling=sp)
    # nothing was started: the engine serves the other requests, with the seeds they had
    seeds = request_seeds(6, 6).tolist()
    rest = eng.generate([ps[0], ps[2]], n=2, sampling=sp, seeds=seeds[:2] + seeds[4:])
    alone = [reference_loop(policy, [p], 2, sp)[0] for p in (ps[0], ps[2])]
    assert tokens(rest)[0] == [r[0] for r in reference_loop(policy, [ps[0]], 2, sp)[0]]
    assert tokens(rest)[1] != [r[0] for r in alone[1]]  # other seeds than a batch of its own ...
    ref = engine_for(policy, block_size=4).generate(ps, n=2, sampling=sp)
    assert tokens(rest) == [tokens(ref)[0], tokens(ref)[2]]  # ... but those of the full batch


def test_stats_are_refreshed_per_call(policy):
    eng = engine_for(policy, block_size=8, kv_cache_tokens=1024)
    assert eng.stats == {}
    eng.generate(prompts(), n=2, sampling=SamplingParams(max_tokens=5))
    first = dict(eng.stats)
    assert {"peak_kv_tokens", "kv_capacity_tokens", "block_size", "preemptions", "decode_steps"} <= first.keys()
    assert first["kv_capacity_tokens"] == 1024 and first["block_size"] == 8 and first["decode_steps"] == 4
    eng.generate(prompts(lengths=(3,)), n=1, sampling=SamplingParams(max_tokens=2))
    assert eng.stats["decode_steps"] == 1 and eng.stats["peak_kv_tokens"] == 8 < first["peak_kv_tokens"]


def test_sleep_frees_the_pool_and_wake_restores_it(policy):
    eng = engine_for(policy, kv_cache_tokens=256)
    sp = SamplingParams(temperature=1.0, max_tokens=8, seed=1)
    before = eng.generate(prompts(), n=2, sampling=sp)
    eng.sleep()
    assert eng.runner is None
    eng.wake()
    assert eng.runner is not None and eng.stats["kv_capacity_tokens"] == 256
    assert tokens(eng.generate(prompts(), n=2, sampling=sp)) == tokens(before)


def test_shared_weights_engine_runs_unfused(policy):
    sp = SamplingParams(temperature=1.0, max_tokens=8, seed=1)
    own = engine_for(policy)
    shared = BuiltinEngine(policy.config, model=policy)
    assert own.fused is not None and shared.fused is None
    assert tokens(shared.generate(prompts(), n=2, sampling=sp)) == tokens(own.generate(prompts(), n=2, sampling=sp))
    # the own copy's q/k/v are views of one fused tensor, so the sync by name fills the fused GEMM
    attn = own.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 4
    assert torch.equal(own.fused[0].qkv_weight, torch.cat([p.self_attn.q_proj.weight for p in policy.layers[:1]]
                                                          + [policy.layers[0].self_attn.k_proj.weight,
                                                             policy.layers[0].self_attn.v_proj.weight]))


def test_block_pool_refcounts():
    pool = BlockPool(6, 4)
    assert pool.capacity_blocks == 5 and pool.num_free == 5
    a = pool.allocate(3)
    assert 0 not in a and pool.num_used == 3
    pool.share(a[:2])
    pool.release(a)
    assert pool.num_free == 3 and pool.refs[a[0]] == 1  # shared blocks survive one release
    pool.release(a[:2])
    assert pool.num_free == 5 and pool.peak_used == 3
    with pytest.raises(AssertionError):
        pool.release(a[:1])
    with pytest.raises(AssertionError):
        pool.allocate(6)


def test_kernel_attention_path_agrees(policy):
    pytest.importorskip("dsr_fast.kernels.paged_attention")
    sp = SamplingParams(temperature=1.0, max_tokens=10, seed=8)
    ps = prompts(9, lengths=(4, 21, 10))
    gather = engine_for(policy, block_size=8).generate(ps, n=2, sampling=sp)
    kernel = engine_for(policy, block_size=8, attention="kernel").generate(ps, n=2, sampling=sp)
    assert tokens(kernel) == tokens(gather)


def test_cost_memory_plan_follows_the_budget_rule():
    from dsr_fast.cost import DEEPSCALER, QWEN2_1_5B, Workload, kv_memory_plan

    workload = Workload()
    for stage in DEEPSCALER:
        m = kv_memory_plan(stage, workload, QWEN2_1_5B)
        params = QWEN2_1_5B.weight_bytes / 2
        left = 80e9 - 20 * params / stage.gpus - QWEN2_1_5B.weight_bytes - 6e9
        assert m["pool_tokens"] == int(0.85 * left // QWEN2_1_5B.kv_bytes_per_token)
        assert m["pool_tokens"] * 28_672 <= 0.85 * left  # Qwen2-1.5B's K+V per token in bf16
        assert m["rows_at_mean"] > m["rows_at_cap"] > 0


def test_gather_decode_attention_scores_in_fp32():
    """The CPU decode path on a bf16 pool: scores in fp32, so only the probabilities' and the
    output's bf16 roundings remain (≤ 2⁻⁹ relative each), against float64 attention on the same
    bf16 values."""
    from dsr_fast.engine.runner import gather_decode_attention

    g = torch.Generator().manual_seed(0)
    Hkv, Hq, D, bs, W = 2, 4, 64, 16, 13  # 208 slots per row
    k_pool = (torch.randn(Hkv, W * 2, bs, D, generator=g) * 2).bfloat16()
    v_pool = torch.randn(Hkv, W * 2, bs, D, generator=g).bfloat16()
    q = (torch.randn(2, Hq, D, generator=g) * 3).bfloat16()
    table = torch.stack([torch.arange(W), torch.arange(W, 2 * W)])
    lengths = torch.tensor([200, 37])
    past = torch.arange(W * bs)[None, :] >= lengths[:, None]
    got = gather_decode_attention(q, k_pool, v_pool, table.flatten(), past, D**-0.5).double()
    u = 2.0**-9
    for b in range(2):
        n = int(lengths[b])
        k = k_pool[:, table[b]].reshape(Hkv, -1, D)[:, :n].double().repeat_interleave(Hq // Hkv, 0)
        v = v_pool[:, table[b]].reshape(Hkv, -1, D)[:, :n].double().repeat_interleave(Hq // Hkv, 0)
        probs = ((q[b].double()[:, None, :] @ k.transpose(1, 2))[:, 0] * D**-0.5).softmax(-1)
        want = (probs[:, None, :] @ v)[:, 0]
        bound = u * (want.abs() + v.abs().max()) + 1e-6
        assert bool(((got[b] - want).abs() <= bound).all()), float(((got[b] - want).abs() - bound).max())


def test_staged_decode_equals_full_gather(policy, monkeypatch):
    """The CPU path keeps the last step's gathered K/V and appends one token per step while the
    batch stays the same; under preemptions, forks, stops and batch changes its completions are
    bit for bit those of gathering every live block at every step (the old path)."""
    ps = prompts(7, lengths=(5, 19, 11, 8))
    sp = SamplingParams(temperature=1.0, max_tokens=14, seed=5, stop_token_ids=(3,))
    outs, reused = [], []
    for staged in (True, False):
        eng = engine_for(policy, block_size=4, kv_cache_tokens=96)
        runner = eng._runner()
        step = runner.decode_step

        def spy(input_ids, seq_lens, block_table, step=step, staged=staged, runner=runner):
            if not staged:
                runner._reuse_staged = False
            reused.append((staged, runner._reuse_staged))
            return step(input_ids, seq_lens, block_table)

        monkeypatch.setattr(runner, "decode_step", spy)
        outs.append(eng.generate(ps, n=3, sampling=sp))
        assert eng.stats["preemptions"] > 0
    assert tokens(outs[0]) == tokens(outs[1])
    assert [[c.logprobs for c in g] for g in outs[0]] == [[c.logprobs for c in g] for g in outs[1]]
    assert any(r for s, r in reused if s) and not any(r for s, r in reused if not s)
