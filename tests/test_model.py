"""Our packed Qwen2 against transformers' Qwen2ForCausalLM, and HF checkpoint round trips."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM
from transformers import Qwen2Config as HFQwen2Config

from dsr_fast.errors import InputError
from dsr_fast.model import KVCache, Qwen2, Qwen2Config
from dsr_fast.packing import pack

CONFIGS = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=1e6),
    "mqa-theta500": dict(num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500.0),
}


def make_hf_model(name, seed=0, vocab=101, hidden=48, layers=2):
    torch.manual_seed(seed)
    hc = HFQwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=80, num_hidden_layers=layers,
        max_position_embeddings=256, rms_norm_eps=1e-6, attn_implementation="eager", **CONFIGS[name],
    )
    hf = Qwen2ForCausalLM(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():  # larger than the default init so attention patterns are not flat
            p.normal_(0, 0.25)
    return hf


def ours_from_hf(hf) -> Qwen2:
    """Our model with the HF model's weights, built in memory."""
    c = hf.config
    cfg = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_parameters["rope_theta"],
        tie_word_embeddings=c.tie_word_embeddings, rms_norm_eps=c.rms_norm_eps,
    )
    model = Qwen2(cfg)
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(params=list(CONFIGS))
def hf_and_ours(request, tmp_path):
    hf = make_hf_model(request.param)
    hf.save_pretrained(tmp_path / "hf")
    return hf, Qwen2.from_pretrained(tmp_path / "hf").eval()


def test_hidden_and_logits_match_transformers(hf_and_ours):
    hf, ours = hf_and_ours
    torch.manual_seed(1)
    seqs = [torch.randint(0, 101, (n,)).tolist() for n in (7, 1, 19, 12)]
    batch = pack(seqs)
    with torch.no_grad():
        hidden = ours(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        logits = ours.logits(hidden)
        for i, s in enumerate(seqs):
            out = hf(torch.tensor([s]), use_cache=False, output_hidden_states=True)
            lo, hi = batch.cu_seqlens[i], batch.cu_seqlens[i + 1]
            assert rel_err(hidden[lo:hi], out.hidden_states[-1][0]) <= 1e-5
            assert rel_err(logits[lo:hi], out.logits[0]) <= 1e-5


def test_packed_forward_and_grads_equal_each_sequence_alone():
    model = ours_from_hf(make_hf_model("gqa-untied"))
    torch.manual_seed(0)
    seqs = [torch.randint(0, 101, (n,)).tolist() for n in (5, 11, 3)]
    batch = pack(seqs)
    hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    g = torch.randn_like(hidden)
    (hidden * g).sum().backward()
    # forward stops before the lm_head: every other parameter gets a gradient
    assert [n for n, p in model.named_parameters() if p.grad is None] == ["lm_head.weight"]
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    alone = []
    for i, s in enumerate(seqs):
        b = pack([s])
        h = model(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen)
        (h * g[batch.cu_seqlens[i] : batch.cu_seqlens[i + 1]]).sum().backward()
        alone.append(h.detach())
    torch.testing.assert_close(hidden.detach(), torch.cat(alone), rtol=1e-5, atol=1e-6)
    for n, grad in packed_grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, grad, rtol=1e-4, atol=1e-6, msg=n)


def test_save_then_transformers_loads_same_logits(tmp_path):
    for name in CONFIGS:
        torch.manual_seed(3)
        cfg = Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                          num_attention_heads=CONFIGS[name]["num_attention_heads"],
                          num_key_value_heads=CONFIGS[name]["num_key_value_heads"],
                          tie_word_embeddings=CONFIGS[name]["tie_word_embeddings"],
                          rope_theta=CONFIGS[name]["rope_theta"], initializer_range=0.2)
        ours = Qwen2(cfg).eval()
        ours.save_pretrained(tmp_path / name)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / name, attn_implementation="eager").eval()
        assert hf.config.tie_word_embeddings == cfg.tie_word_embeddings
        ids = torch.randint(0, 97, (13,))
        b = pack([ids.tolist()])
        with torch.no_grad():
            ref = hf(ids[None], use_cache=False).logits[0]
            got = ours.logits(ours(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen))
        assert rel_err(got, ref) <= 1e-5, name
        # and back: our loader reads what we wrote
        again = Qwen2.from_pretrained(tmp_path / name)
        for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2)


def test_sharded_checkpoint_round_trip(tmp_path):
    hf = make_hf_model("gqa-untied")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = Qwen2.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    for (n1, p1), (n2, p2) in zip(hf.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_kv_cache_decode_equals_full_forward():
    model = ours_from_hf(make_hf_model("mqa-theta500")).eval()
    cfg = model.config
    torch.manual_seed(0)
    seqs = [torch.randint(0, 101, (n,)).tolist() for n in (9, 4)]
    prompt_len, cache = [5, 2], KVCache(cfg, rows=2, max_len=16, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        full = model(*(lambda b: (b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen))(pack(seqs)))
        prompts = pack([s[:n] for s, n in zip(seqs, prompt_len)])
        rows = torch.repeat_interleave(torch.arange(2), torch.tensor(prompt_len))
        model(prompts.input_ids, prompts.position_ids, prompts.cu_seqlens, prompts.max_seqlen, cache, rows)
        # decode the rest of each sequence one token per step (row 1 runs past its end: ignored)
        for step in range(max(len(s) - n for s, n in zip(seqs, prompt_len))):
            pos = torch.tensor([n + step for n in prompt_len])
            tok = torch.tensor([s[min(n + step, len(s) - 1)] for s, n in zip(seqs, prompt_len)])
            h = model.decode(tok, pos, cache)
            for r, (s, n) in enumerate(zip(seqs, prompt_len)):
                if n + step < len(s):
                    offset = [0, len(seqs[0])][r]
                    torch.testing.assert_close(h[r], full[offset + n + step], rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# bad input


def test_missing_model_dir(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Qwen2.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"model_type": "llama"}', "model_type is 'llama'"),
        ('{"model_type": "qwen2", "vocab_size": 10}', "missing required field"),
        ('{"model_type": "qwen2", "vocab_size": 10, "hidden_size": 48, "intermediate_size": 8, "num_hidden_layers": 1,'
         ' "num_attention_heads": 4, "num_key_value_heads": 3}', "not a multiple"),
        ('{"model_type": "qwen2", "rope_scaling": {"rope_type": "yarn"}}', "rope type 'yarn'"),
    ],
)
def test_malformed_config(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(InputError, match=message) as err:
        Qwen2.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


def test_checkpoint_that_does_not_match_config(tmp_path):
    hf = make_hf_model("gqa-untied")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="missing .*layers.2"):
        Qwen2.from_pretrained(tmp_path)


def test_no_weights(tmp_path):
    make_hf_model("gqa-untied").config.save_pretrained(tmp_path)
    with pytest.raises(InputError, match="no \\*.safetensors"):
        Qwen2.from_pretrained(tmp_path)


def test_forward_with_labels_and_gradient_checkpointing_match_the_plain_head():
    # reference: the full logits through transformers' lm_head convention, log_softmax in fp64
    model = ours_from_hf(make_hf_model("gqa-untied"))
    torch.manual_seed(1)
    batch = pack([torch.randint(0, 101, (n,)).tolist() for n in (7, 4)])
    args = (batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    labels = batch.labels.clone()
    hidden = model(*args)
    logp = torch.log_softmax(model.logits(hidden).double() / 0.6, dim=-1)
    valid = labels != -100
    want = torch.where(valid, logp.gather(1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    want.float().sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    model.gradient_checkpointing = True
    got, entropy = model(*args, labels=labels, temperature=0.6, return_entropy=True)
    got.sum().backward()
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    # ignored positions give 0 for the entropy too (the kernel's contract)
    want_entropy = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    torch.testing.assert_close(entropy, want_entropy.float(), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def _bf16_scores_attend(cache, layer, q, positions):
    """KVCache.attend as it was before fp32 scores: q·k rounded to bf16, then cast (the old path)."""
    B, Hq, D = q.shape
    keys, values = cache.k[layer], cache.v[layer]
    qg = q.view(B, keys.shape[1], Hq // keys.shape[1], D)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * D**-0.5
    visible = torch.arange(cache.max_len)[None, :] <= positions[:, None]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(-1).to(values.dtype), values).view(B, Hq, D)


def test_decode_attention_scores_in_fp32():
    """Engine-side decode attention on a bf16 cache vs float64 attention over the same bf16 values.

    With q·k accumulated and kept in fp32, the only bf16 roundings left are the probabilities
    (≤ 2⁻⁹ relative each, so ≤ 2⁻⁹·max|v| on the output) and the output itself (≤ 2⁻⁹·|out|):
    the error bound below. Scores rounded to bf16 (the old path) err by up to 2⁻⁹·|q·k|/√D in
    the logits, which at |q·k|/√D ~ 10 moves the probabilities by ~2%: it exceeds the bound, and
    the drift it adds to the engine's logprobs feeds the importance ratio's baseline."""
    cfg = Qwen2Config(vocab_size=8, hidden_size=256, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    g = torch.Generator().manual_seed(0)
    cache = KVCache(cfg, rows=3, max_len=200, dtype=torch.bfloat16, device="cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=g) * 2)
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    q = (torch.randn(3, 4, 64, generator=g) * 3).bfloat16()
    positions = torch.tensor([199, 120, 7])
    want = torch.empty(3, 4, 64, dtype=torch.float64)
    for b in range(3):
        n = int(positions[b]) + 1
        k, v = (x[0, b, :, :n].double().repeat_interleave(2, 0) for x in (cache.k, cache.v))  # GQA: 2 q heads per kv head
        probs = ((q[b].double()[:, None, :] @ k.transpose(1, 2))[:, 0] / 8).softmax(-1)
        want[b] = (probs[:, None, :] @ v)[:, 0]
    u = 2.0**-9  # bf16 unit roundoff (8 significand bits, round to nearest)
    bound = u * (want.abs() + cache.v[0].abs().amax(dim=(1, 2, 3)).double()[:, None, None]) + 1e-6
    got = cache.attend(0, q, positions).double()
    assert bool(((got - want).abs() <= bound).all()), float(((got - want).abs() - bound).max())
    old = _bf16_scores_attend(cache, 0, q, positions).double()
    assert not bool(((old - want).abs() <= bound).all())  # the check can fail: bf16 scores do
    assert float((got - want).abs().max()) < 0.5 * float((old - want).abs().max())


def _decode_logprobs(model, cfg, seq, prompt_len, attend):
    """Engine-side logprobs: prefill prompt_len tokens into a bf16 cache, then decode one token per
    step with `attend` as KVCache.attend, reading log p(seq[t+1]) from each step's logits."""
    original = KVCache.attend
    KVCache.attend = attend
    try:
        cache = KVCache(cfg, rows=1, max_len=len(seq), dtype=torch.bfloat16, device="cpu")
        with torch.no_grad():
            b = pack([seq[:prompt_len]])
            model(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen, cache, torch.zeros(prompt_len, dtype=torch.long))
            return torch.stack([
                torch.log_softmax(model.logits(model.decode(torch.tensor([seq[t]]), torch.tensor([t]), cache)).double(),
                                  -1)[0, seq[t + 1]]
                for t in range(prompt_len, len(seq) - 1)
            ])
    finally:
        KVCache.attend = original


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_engine_decode_logprobs_drift_less_from_float64(seed):
    """bf16 engine decode vs a float64 teacher-forced forward of the same weights: with fp32
    attention scores the mean |Δ logprob| over ~115 decode steps is smaller than with the old
    bf16 scores (same model, same cache, every other rounding shared). Large q/k weights make
    the scores large, as trained attention heads' often are."""
    import copy

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = Qwen2(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.mul_(12)
            if "lm_head" in name:
                p.mul_(20)
    teacher = copy.deepcopy(model).double().eval()
    engine_model = model.to(torch.bfloat16).eval()
    seq, prompt_len = torch.randint(0, 64, (120,)).tolist(), 4
    with torch.no_grad():
        b = pack([seq])
        logp = torch.log_softmax(teacher.logits(teacher(b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen)), -1)
    want = torch.stack([logp[t, seq[t + 1]] for t in range(prompt_len, len(seq) - 1)])
    drift = (_decode_logprobs(engine_model, cfg, seq, prompt_len, KVCache.attend) - want).abs().mean()
    old = (_decode_logprobs(engine_model, cfg, seq, prompt_len,
                            lambda self, layer, q, positions, length=None: _bf16_scores_attend(self, layer, q, positions))
           - want).abs().mean()
    assert drift < old, (float(drift), float(old))
