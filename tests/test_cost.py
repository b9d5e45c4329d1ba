"""The cost model's arithmetic against hand-computed cases, and its command line.

The toy cases use a model and a GPU with small round numbers so that every expected figure is
worked out by hand in the comments, step by step, rather than by re-running the formulas.
"""

import importlib.util
import json
import subprocess
import sys

import pytest

from dsr_fast.cost import (
    GPU,
    GPUS,
    QWEN2_1_5B,
    Efficiency,
    ModelShape,
    Stage,
    Workload,
    decode_rates,
    decode_seconds,
    efficiency_from_rates,
    main,
    response_lengths,
    stage_cost,
    stage_passes,
    total_passes,
    train_flops,
)

# 50 weights per token, 1 layer of attention width 1, 10 bytes of KV per token, 100 bytes of weights
TOY = ModelShape(matmul_params=50, layers=1, attn_width=1, kv_bytes_per_token=10, weight_bytes=100)
# 1,000 bytes/s; so many FLOP/s that compute never binds
BANDWIDTH_BOUND = GPU("toy-bw", bf16_tflops=1e6, hbm_gbps=1e-6)
# 1 FLOP/s; so many bytes/s that bandwidth never binds
COMPUTE_BOUND = GPU("toy-flops", bf16_tflops=1e-12, hbm_gbps=1e6)


def test_decode_bandwidth_bound_two_slots():
    # prompt 1; request A makes 2 tokens (contexts 1, 2), B makes 4 (contexts 1, 2, 3, 4).
    # Together: step 1 reads 100 + 10·(1+1) = 120 B, step 2: 100 + 10·(2+2) = 140,
    # then B alone: 100 + 10·3 = 130, 100 + 10·4 = 140. 530 B at 1,000 B/s.
    seconds, steps = decode_seconds([2, 4], prompt=1, slots=2, shape=TOY, gpu=BANDWIDTH_BOUND, fraction=1.0)
    assert steps == 4
    assert seconds == pytest.approx(0.530)


def test_decode_one_slot_runs_requests_back_to_back():
    # A: 110 + 120; B: 110 + 120 + 130 + 140. 730 B.
    seconds, steps = decode_seconds([2, 4], prompt=1, slots=1, shape=TOY, gpu=BANDWIDTH_BOUND, fraction=1.0)
    assert steps == 6
    assert seconds == pytest.approx(0.730)


def test_decode_fraction_scales_time():
    seconds, _ = decode_seconds([2, 4], prompt=1, slots=2, shape=TOY, gpu=BANDWIDTH_BOUND, fraction=0.5)
    assert seconds == pytest.approx(1.060)


def test_decode_compute_bound():
    # FLOPs per step = 2·50 per row + 4·1·1 per context token read:
    # 200 + 4·2 = 208, 200 + 4·4 = 216, 100 + 4·3 = 112, 100 + 4·4 = 116 → 652 FLOPs at 1 FLOP/s
    seconds, _ = decode_seconds([2, 4], prompt=1, slots=2, shape=TOY, gpu=COMPUTE_BOUND, fraction=1.0)
    assert seconds == pytest.approx(652.0)


def test_forward_and_train_flops():
    shape = ModelShape(matmul_params=1000, layers=2, attn_width=3, kv_bytes_per_token=1, weight_bytes=1)
    # L = 4: matmuls 2·1000·4 = 8,000; causal attention 2·2·3·4·5 = 240
    assert shape.forward_flops(4) == 8240
    # five forward-equivalents over two sequences of 4 tokens
    assert train_flops([4, 4], shape, passes=5) == 82_400


def test_qwen2_1_5b_shape():
    # per layer: q 1536·1536, k and v 1536·256 each, o 1536·1536, MLP 3·1536·8960 = 46,792,704;
    # ×28 = 1,310,195,712; lm_head 1536·151,936 = 233,373,696
    assert QWEN2_1_5B.matmul_params == 1_543_569_408
    assert QWEN2_1_5B.weight_bytes == 2 * 1_543_569_408
    # K and V × 28 layers × 2 KV heads × 128 dims × 2 bytes
    assert QWEN2_1_5B.kv_bytes_per_token == 28_672
    assert QWEN2_1_5B.attn_width == 1536


def test_response_lengths_mean_cap_and_count():
    lengths = response_lengths(4500, 8192, 1024, sigma=0.6)
    assert len(lengths) == 1024
    assert abs(lengths.mean() - 4500) < 1.0
    assert lengths.max() == 8192 and lengths.min() >= 1
    assert (lengths == 8192).mean() > 0.05  # a lognormal of this mean spills past the cap
    assert (response_lengths(9000, 8192, 16, sigma=0.6) == 8192).all()


def test_stage_cost_hand_computed():
    # 2 prompts × 2 samples on 2 GPUs; every response is 3 tokens (mean = cap); prompt 1 token.
    stage = Stage("toy", steps=10, prompts=2, samples=2, max_response=3, mean_response=3.0, gpus=2)
    # five passes: update 3, reference 1, old log-probs for both mini-batches 1, nothing recomputed
    workload = Workload(stages=(stage,), prompt_tokens=1, mini_batches=2, kl=True, recompute="none",
                        old_logprobs_first_minibatch=True)
    gpu = GPU("toy", bf16_tflops=1e-8, hbm_gbps=1e-6)  # 10,000 FLOP/s, 1,000 B/s
    eff = Efficiency(decode_fraction=1.0, train_mfu=1.0, sync_s=0.1, grading_per_s_per_gpu=8.0)
    cost = stage_cost(stage, workload, eff, shape=TOY, gpu=gpu)
    assert cost.slots == 2
    # Rollout, per GPU: 2 rows of 3 tokens at contexts 1, 2, 3 → 120 + 140 + 160 B = 0.42 s
    # (FLOPs: 208, 216, 224 = 0.065 s, below). Prefill: 1 prompt of 1 token, 2·50 + 2·1·1·1·2
    # = 104 FLOPs = 0.0104 s. Both GPUs: 2 × 0.4304 = 0.8608 GPU-s per step.
    assert cost.rollout_wall_s == pytest.approx(0.4304)
    assert cost.decode_steps == 3
    # Training: 4 sequences of 1 + 3 tokens, 2·50·4 + 2·1·1·4·5 = 440 FLOPs each, 5 passes:
    # 8,800 FLOPs = 0.88 GPU-s. Sync: 2 GPUs × 0.1 s. Grading: 4 responses at 8/s = 0.5 GPU-s.
    hours = {k: v * 3600 / 10 for k, v in cost.gpu_hours.items()}  # back to GPU-s per step
    assert hours["rollout"] == pytest.approx(0.8608)
    assert hours["train"] == pytest.approx(0.88)
    assert hours["sync"] == pytest.approx(0.2)
    assert hours["grading"] == pytest.approx(0.5)
    assert cost.total == pytest.approx(2.4408 * 10 / 3600)
    assert cost.truncated_fraction == 1.0


def test_passes_follow_the_trainer_configuration():
    lengths = [1000, 3000]
    base = dict(recompute="none", kl=True, mini_batches=2)
    # the first of m mini-batches takes its old log-probs from the update itself: (m-1)/m of a forward
    assert total_passes(stage_passes(lengths, Workload(**base))) == 3 + 1 + 0.5
    assert total_passes(stage_passes(lengths, Workload(**base, old_logprobs_first_minibatch=True))) == 5
    assert total_passes(stage_passes(lengths, Workload(**dict(base, mini_batches=4)))) == 3 + 1 + 0.75
    assert total_passes(stage_passes(lengths, Workload(**dict(base, mini_batches=1)))) == 4
    assert total_passes(stage_passes(lengths, Workload(**dict(base, kl=False)))) == 3 + 0.5


def test_recompute_passes_are_the_recomputed_flops_in_forwards():
    # Qwen2-1.5B, one sequence of L = 1000: per layer qkv 2·L·1536·2048, attention 4·1536·L(L+1)/2,
    # o_proj 2·L·1536², gate+up 2·L·2·1536·8960, down 2·L·8960·1536; lm_head 2·L·1536·151,936.
    L, h, i, layers = 1000, 1536, 8960, 28
    qkv, attn, o = 2 * L * h * 2048, 4 * h * L * (L + 1) / 2, 2 * L * h * h
    gate_up, down, head = 2 * L * 2 * h * i, 2 * L * i * h, 2 * L * h * 151_936
    forward = layers * (qkv + attn + o + gate_up + down) + head
    full = stage_passes([L], Workload(recompute="full"))
    selective = stage_passes([L], Workload(recompute="selective"))
    # full reruns the layer but down_proj (checkpoint stops once it has what backward needs)
    assert full["recompute"] == pytest.approx(layers * (qkv + attn + o + gate_up) / forward)
    assert selective["recompute"] == pytest.approx(layers * (qkv + gate_up) / forward)
    assert (full["plan_full"], selective["plan_selective"]) == (28, 28)
    # auto with room for everything stores everything; with none at all it recomputes everything
    assert stage_passes([L], Workload(recompute="auto", recompute_budget_gb=1e3))["recompute"] == 0
    assert stage_passes([L], Workload(recompute="auto", recompute_budget_gb=1e-6))["plan_full"] == 28


def test_report_prints_the_passes_next_to_the_hours(tmp_path, capsys):
    main(["--plot", str(tmp_path / "p.png"), "--recompute", "full", "--old-logprobs-first-minibatch"])
    out = capsys.readouterr().out
    assert "recompute full" in out and "old log-probs for every mini-batch" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("8K") and "full" in line)
    assert row.split()[1:4] == ["3.00", "1.00", "1.00"]


def test_decode_rates_toy():
    # 10 rows at 1,000 tokens/s: a step is 10 ms; it reads 100 + 10·10·5 = 600 B and does
    # 2·50·10 + 4·1·1·10·5 = 1,200 FLOPs
    bytes_per_s, flops_per_s = decode_rates(1000.0, rows=10, mean_context=5.0, shape=TOY)
    assert bytes_per_s == pytest.approx(60_000)
    assert flops_per_s == pytest.approx(120_000)


def test_efficiency_from_h200_rates():
    report = {
        "device": {"name": "NVIDIA H200"},
        "rates": {
            "decode": {"bytes_per_s": 2.4e12, "flops_per_s": 1e13},  # 2.4/4.8 TB/s = 50% (bandwidth-bound)
            "train": {"flops_per_s": 395.6e12},  # 395.6 / 989 = 40% MFU
            "sync": {"seconds": 0.01},  # bandwidth-bound: × 4,800 / 2,039 on an A100
            "grading": {"responses_per_s": 300.0, "processes": 1},  # × 2 cores per GPU
        },
    }
    eff = efficiency_from_rates(report)
    assert eff.decode_fraction == pytest.approx(0.5)
    assert eff.train_mfu == pytest.approx(0.4)
    assert eff.sync_s == pytest.approx(0.01 * 4800 / 2039)
    assert eff.grading_per_s_per_gpu == pytest.approx(600.0)
    assert all(s.startswith("measured") for s in eff.sources.values())


def test_unknown_device_uses_measured_ceilings():
    report = {"device": {"name": "cpu"}, "ceilings": {"copy_GBps": 10.0, "matmul_bf16_TFLOPs": 0.5},
              "rates": {"train": {"flops_per_s": 0.1e12}}}
    assert efficiency_from_rates(report).train_mfu == pytest.approx(0.2)
    with pytest.raises(ValueError):
        efficiency_from_rates({"device": {"name": "cpu"}, "rates": {"train": {"flops_per_s": 1.0}}})


def test_main_with_rates_json(tmp_path, capsys):
    base = main(["--plot", str(tmp_path / "a.png")])
    rates = {"device": {"name": "NVIDIA H200"}, "rates": {"train": {"flops_per_s": 0.8 * GPUS["H200"].flops}}}
    path = tmp_path / "rates.json"
    path.write_text(json.dumps(rates))
    fast = main(["--rates", str(path), "--plot", str(tmp_path / "b.png"), "--json-out", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert "measured on H200" in out and "80.0% MFU" in out
    # twice the default 40% MFU: training hours halve; rollout moves only by its small
    # compute-bound prefill, sync and grading not at all
    for b, f in zip(base["stages"], fast["stages"]):
        assert f["gpu_hours"]["train"] == pytest.approx(b["gpu_hours"]["train"] / 2)
        assert f["gpu_hours"]["rollout"] == pytest.approx(b["gpu_hours"]["rollout"], rel=2e-3)
        assert f["gpu_hours"]["rollout"] < b["gpu_hours"]["rollout"]
        assert f["gpu_hours"]["sync"] == pytest.approx(b["gpu_hours"]["sync"])
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["a100_hours"] == pytest.approx(sum(s["total"] for s in written["stages"]))


def test_flag_rates_match_json_rates(tmp_path):
    args = ["--measured-on", "H200", "--decode-tokens-per-s", "20000", "--decode-rows", "128",
            "--decode-context", "300", "--plot", str(tmp_path / "p.png")]
    from_flags = main(args)
    b, f = decode_rates(20000.0, 128, 300.0)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"device": {"name": "H200"}, "rates": {"decode": {"bytes_per_s": b, "flops_per_s": f}}}))
    from_json = main(["--rates", str(path), "--plot", str(tmp_path / "q.png")])
    assert from_flags["a100_hours"] == pytest.approx(from_json["a100_hours"])


def test_cli_prints_assumptions_and_writes_png(tmp_path):
    png = tmp_path / "breakdown.png"
    out = subprocess.run([sys.executable, "-m", "dsr_fast.cost", "--plot", str(png), "--gpus", "8,8,8"],
                         capture_output=True, text=True, check=True).stdout
    assert "assumption" in out and "3,800" in out and "Projected:" in out
    assert "8 GPUs" in out and "32 GPUs" not in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in out


def test_cli_rejects_wrong_stage_count(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dsr_fast.cost", "--gpus", "8,8", "--plot", str(tmp_path / "x.png")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "3 comma-separated" in r.stderr


def test_decode_rows_come_from_the_paged_memory_plan():
    """The rows the decode model runs are the memory plan's rows at the mean length wherever the
    KV pool, not the requests or the rollout_batch ceiling, is what binds."""
    from dsr_fast.cost import DEEPSCALER, QWEN2_1_5B, Workload, decode_slots

    stage = DEEPSCALER[2]  # 24K: the longest rows
    plenty = 10**6
    for share in (0.85, 0.3):
        workload = Workload(kv_cache_memory=share, max_rows=10**6)
        params = QWEN2_1_5B.weight_bytes / 2
        left = 80e9 - 20 * params / stage.gpus - QWEN2_1_5B.weight_bytes - workload.memory_reserve_gb * 1e9
        want = int(share * left // QWEN2_1_5B.kv_bytes_per_token) // int(workload.prompt_tokens + stage.mean_response)
        assert decode_slots(stage, workload, QWEN2_1_5B, plenty) == want
    assert decode_slots(stage, Workload(max_rows=64), QWEN2_1_5B, plenty) == 64
    assert decode_slots(stage, Workload(), QWEN2_1_5B, 10) == 10
