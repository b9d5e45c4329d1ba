"""bench/gpu_check.py in --dry-run mode: every section runs and passes at tiny sizes on the CPU,
the JSON is complete, and the cost model reads it. A GPU run is rare; this keeps it working."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsr_fast import cost

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
SECTIONS = ["ceilings", "logprobs", "grpo_loss", "attention", "train_step", "rollout", "paged_decode", "weight_sync", "grading"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_every_section_ok(dry_run):
    out, stdout = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert list(report["sections"]) == SECTIONS
    for name, sec in report["sections"].items():
        assert sec["status"] == "ok", f"{name}: {sec.get('error')}"
        assert sec["rows"], name
    # correctness checks ran and were recorded, not only timings
    assert report["sections"]["logprobs"]["details"]["errors"]["triton/grad_weight fp32 vs fp64"] <= 1e-4
    assert report["sections"]["grpo_loss"]["details"]["errors"]["auto/loss fp32 vs fp64"] <= 1e-5
    assert report["sections"]["paged_decode"]["details"]["errors"]["graph vs eager decode logits"] <= 1e-5
    assert set(report["rates"]) == {"decode", "train", "sync", "grading"}
    assert report["ceilings"]["copy_GBps"] > 0 and report["ceilings"]["matmul_bf16_TFLOPs"] > 0
    table = (out / "table.md").read_text()
    assert "| ceilings |" in table and "| rollout |" in table and "failed" not in table
    assert "fraction" in stdout and "naive baseline" in stdout


def test_cost_model_reads_the_report(dry_run, tmp_path):
    out, _ = dry_run
    report = json.loads((out / "gpu_check.json").read_text())
    eff = cost.efficiency_from_rates(report)
    assert all(source.startswith("measured") for source in eff.sources.values())
    # train MFU is the measured FLOP/s over the CPU's own measured matmul ceiling (no spec sheet)
    expected = report["rates"]["train"]["flops_per_s"] / (report["ceilings"]["matmul_bf16_TFLOPs"] * 1e12)
    assert eff.train_mfu == pytest.approx(expected)
    result = cost.main(["--rates", str(out / "gpu_check.json"), "--plot", str(tmp_path / "p.png")])
    assert result["a100_hours"] > 0


def _load_module():
    spec = importlib.util.spec_from_file_location("gpu_check_module", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_failing_section_is_recorded_and_the_rest_run(monkeypatch):
    gc = _load_module()

    def boom(ctx):
        raise RuntimeError("out of luck")

    def fine(ctx):
        return [gc.row("x", 2.0, "u", ceiling=4.0, baseline=1.0)], {}

    def wrong(ctx):
        details = {}
        gc.check("value", 0.5, 1e-3, details)

    monkeypatch.setattr(gc, "SECTIONS", [("ceilings", fine), ("boom", boom), ("wrong", wrong), ("after", fine)])
    ctx = gc.Context(torch.device("cpu"), gc.DRY, True, {"sections": {}, "rates": {}, "ceilings": {}}, None)
    gc.run_sections(ctx, None)
    sections = ctx.report["sections"]
    assert sections["boom"]["status"] == "failed" and "out of luck" in sections["boom"]["error"]
    assert sections["wrong"]["status"] == "check failed"
    assert sections["after"]["status"] == "ok"
    r = sections["after"]["rows"][0]
    assert r["fraction"] == 0.5 and r["ratio"] == 2.0
    assert "**failed**" in gc.format_table(ctx.report)
