"""Built-in rollout engine: greedy vs transformers, sampling law, seeds, stops, weight sync."""

import pytest
import torch
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2ForCausalLM

from dsr_fast.model import Qwen2
from dsr_fast.rollout import BuiltinEngine, SamplingParams, request_seeds, sample

VOCAB = 89


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    torch.manual_seed(0)
    hc = HFQwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=True, attn_implementation="eager")
    hf = Qwen2ForCausalLM(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def engine(hf_model):
    policy = Qwen2.from_pretrained(hf_model[1])
    eng = BuiltinEngine(policy.config)
    eng.sync_weights(policy)
    return eng


def prompts(seed=1, lengths=(6, 11, 2, 9)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_greedy_equals_transformers_generate(hf_model, engine):
    hf, _ = hf_model
    ps = prompts()
    out = engine.generate(ps, n=2, sampling=SamplingParams(temperature=0, max_tokens=15))
    for p, group in zip(ps, out):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=0)
        ref = ref[0, len(p):].tolist()
        assert [c.token_ids for c in group] == [ref, ref]
        assert all(c.finish_reason == "length" for c in group)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 0.95), (1.5, 0.5)])
def test_sampled_logprobs_equal_teacher_forced(hf_model, engine, temperature, top_p):
    hf, _ = hf_model
    ps = prompts(2)
    out = engine.generate(ps, n=3, sampling=SamplingParams(temperature=temperature, top_p=top_p, max_tokens=12, seed=7))
    for p, group in zip(ps, out):
        for c in group:
            ids = torch.tensor(p + c.token_ids)
            with torch.no_grad():
                logits = hf(ids[None], use_cache=False).logits[0].double() / temperature
            ref = torch.log_softmax(logits, -1)[len(p) - 1 : -1].gather(1, ids[len(p):, None])[:, 0]
            assert (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max() <= 1e-4


def test_seeds_make_requests_independent_of_batching(engine):
    ps = prompts(3)
    sp = SamplingParams(temperature=1.0, max_tokens=10, seed=11)
    together = engine.generate(ps, n=4, sampling=sp)
    seeds = request_seeds(11, len(ps) * 4).tolist()
    # prompt 2 alone, with the seeds its requests had in the big batch
    alone = engine.generate([ps[2]], n=4, sampling=sp, seeds=seeds[8:12])
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in together[2]]
    # and in a smaller max_batch (several chunks)
    small = BuiltinEngine(engine.model.config, max_batch=3)
    small.sync_weights(engine.model)
    chunked = small.generate(ps, n=4, sampling=sp)
    assert [[c.token_ids for c in g] for g in chunked] == [[c.token_ids for c in g] for g in together]
    # samples of one prompt differ from each other, and another base seed changes them
    assert len({tuple(c.token_ids) for c in together[0]}) > 1
    other = engine.generate(ps, n=4, sampling=SamplingParams(temperature=1.0, max_tokens=10, seed=12))
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in together[0]]


def test_sampling_follows_softmax_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 1.5
    n = 40_000
    seeds = request_seeds(5, n)
    rows = logits.expand(n, -1).contiguous()
    for temperature, top_p in [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)]:
        tokens, lps = sample(rows, SamplingParams(temperature=temperature, top_p=top_p), seeds, torch.zeros(n, dtype=torch.long))
        probs = torch.softmax(logits[0].double() / temperature, -1)
        if top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = order[(sorted_p.cumsum(0) - sorted_p) < top_p]
            nucleus = torch.zeros_like(probs)
            nucleus[keep] = probs[keep]
            assert set(tokens.unique().tolist()) <= set(keep.tolist())
            probs = nucleus / nucleus.sum()
        freq = torch.bincount(tokens, minlength=12).double() / n
        # 5 standard errors of a binomial proportion
        assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt() + 1e-9).all(), (freq, probs)
        full = torch.log_softmax(logits[0].double() / temperature, -1)
        assert torch.allclose(lps.double(), full[tokens], atol=1e-5)


def test_stop_tokens_and_max_tokens(engine):
    ps = prompts(4)
    free = engine.generate(ps, n=1, sampling=SamplingParams(temperature=0, max_tokens=12))
    # stop at the third greedy token of prompt 0: output ends with it (included), reason "stop"
    stop = free[0][0].token_ids[2]
    out = engine.generate(ps, n=1, sampling=SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop,)))
    for before, after in zip(free, out):
        toks = before[0].token_ids
        if stop in toks:
            k = toks.index(stop) + 1
            assert after[0].token_ids == toks[:k] and after[0].finish_reason == "stop"
            assert len(after[0].logprobs) == k
        else:
            assert after[0].token_ids == toks and after[0].finish_reason == "length"
    short = engine.generate(ps, n=2, sampling=SamplingParams(temperature=1.0, max_tokens=3))
    assert all(len(c.token_ids) == 3 and c.finish_reason == "length" for g in short for c in g)


def test_sync_weights_changes_outputs_in_place(hf_model):
    policy = Qwen2.from_pretrained(hf_model[1])
    eng = BuiltinEngine(policy.config)
    eng.sync_weights(policy)
    pointers = [p.data_ptr() for p in eng.model.parameters()]
    sp = SamplingParams(temperature=0, max_tokens=8)
    before = eng.generate(prompts(), sampling=sp)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    eng.sync_weights(policy)
    assert [p.data_ptr() for p in eng.model.parameters()] == pointers
    for a, b in zip(eng.model.state_dict().values(), policy.state_dict().values()):
        assert torch.equal(a, b)
    assert eng.generate(prompts(), sampling=sp) != before


def test_bad_requests(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], sampling=SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="model limit"):
        engine.generate([[1] * 250], sampling=SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="one per request"):
        engine.generate([[1]], n=2, sampling=SamplingParams(max_tokens=4), seeds=[1])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_synced_engine_equals_a_fresh_engine_from_the_new_weights(hf_model):
    policy = Qwen2.from_pretrained(hf_model[1])
    eng = BuiltinEngine(policy.config)
    eng.sync_weights(policy)
    sp = SamplingParams(temperature=1.0, max_tokens=10, seed=3)
    eng.generate(prompts(), n=2, sampling=sp)  # a warm cache from the old weights
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.1).add_(0.05)
    eng.sync_weights(policy)
    fresh = BuiltinEngine(policy.config)
    fresh.sync_weights(policy)
    got = eng.generate(prompts(), n=2, sampling=sp)
    want = fresh.generate(prompts(), n=2, sampling=sp)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]


def test_sleep_wake_and_shared_weights_keep_outputs(hf_model):
    policy = Qwen2.from_pretrained(hf_model[1]).eval()
    eng = BuiltinEngine(policy.config)
    eng.sync_weights(policy)
    sp = SamplingParams(temperature=0.8, max_tokens=12, seed=5)
    before = eng.generate(prompts(), n=3, sampling=sp)
    eng.sleep()
    assert eng.runner is None
    eng.wake()
    assert eng.runner is not None
    after = eng.generate(prompts(), n=3, sampling=sp)
    shared = BuiltinEngine(policy.config, model=policy)
    shared.sync_weights(policy)  # a no-op: same module
    with_shared = shared.generate(prompts(), n=3, sampling=sp)
    tokens = lambda out: [[c.token_ids for c in g] for g in out]  # noqa: E731
    assert tokens(before) == tokens(after) == tokens(with_shared)


def test_slots_are_refilled_as_requests_finish(engine):
    # 3 slots for 12 requests with very different lengths: every request still gets exactly its
    # own tokens (those of a roomy engine) while finished slots take the next waiting request
    ps = prompts(6, lengths=(3, 17, 5, 9))
    free = engine.generate(ps, n=3, sampling=SamplingParams(temperature=1.0, max_tokens=14, seed=2))
    stops = tuple({g[0].token_ids[1] for g in free})  # make some requests end early
    sp = SamplingParams(temperature=1.0, max_tokens=14, seed=2, stop_token_ids=stops)
    roomy = engine.generate(ps, n=3, sampling=sp)
    tight = BuiltinEngine(engine.model.config, max_batch=3)
    tight.sync_weights(engine.model)
    refilled = tight.generate(ps, n=3, sampling=sp)
    lengths = {len(c.token_ids) for g in roomy for c in g}
    assert len(lengths) > 2  # the workload really is ragged
    for g1, g2 in zip(roomy, refilled):
        for a, b in zip(g1, g2):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
