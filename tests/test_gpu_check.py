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
SECTIONS = ["ceilings", "logprobs", "logprobs_bf16", "grpo_loss", "attention", "train_step", "rollout", "paged_decode",
            "weight_sync", "grading", "triton_tests", "fallbacks"]


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
    # the bf16 paths: both backward GEMM engines inside the bf16 envelope, grpo_loss on bf16 inputs
    bf16 = report["sections"]["logprobs_bf16"]["details"]
    for engine in ("triton", "cublas"):
        for name in ("grad_hidden", "grad_weight"):
            assert bf16["envelope_excess"][f"{engine}/{name} bf16 vs fp64"] <= 0
        assert f"{engine}/logprobs bf16 vs fp64 (abs)" in bf16["errors"]
    assert "triton/grad_logprobs bf16" in report["sections"]["grpo_loss"]["details"]["errors"]
    # both GEMM engines timed and compared (the GPU run writes the BACKWARD_GEMMS line)
    gemms = report["sections"]["logprobs"]["details"]["backward_gemms"]
    assert set(gemms["seconds"]) == {"triton", "cublas"} and gemms["winner"] in gemms["seconds"]
    # GRPO loss: a per-call time at the small T and a bandwidth at the large one
    units = [r["unit"] for r in report["sections"]["grpo_loss"]["rows"]]
    assert units == ["µs", "GB/s"]
    # rollout: more requests queued than rows, so rows are refilled
    for run in report["sections"]["rollout"]["details"]["runs"].values():
        assert run["requests"] == 2 * run["rows"] and run["tokens"] > 0
    # the native Triton test section ran tests (interpreted in the dry run) and none failed
    native = report["sections"]["triton_tests"]["details"]
    assert native["counts"]["passed"] >= 3 and not native["failed"]
    # the dry run itself takes both fallbacks: spec-sheet ceilings, pylatexenc from the carried wheel
    fallbacks = report["sections"]["fallbacks"]["details"]
    assert "spec-sheet ceiling" in fallbacks["spec_fallback_row"]["note"]
    assert ".whl" in fallbacks["carried_wheel"]["file"]
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


def test_failed_ceilings_fall_back_to_the_spec_sheet(monkeypatch):
    """section_ceilings fails: later sections still run, on the spec sheet's ceilings, and each
    row that uses one says so (and the report records where the ceilings came from)."""
    gc = _load_module()

    def broken_ceilings(ctx):
        raise RuntimeError("CUDA error: out of memory (simulated)")

    sections = dict(gc.SECTIONS)
    monkeypatch.setattr(gc, "SECTIONS", [("ceilings", broken_ceilings), ("grpo_loss", sections["grpo_loss"]),
                                         ("weight_sync", sections["weight_sync"])])
    spec = cost.gpu_by_name("NVIDIA H200")
    report = {"sections": {}, "rates": {}, "ceilings": {}, "device": {"name": "cpu"}, "date": "2026-12-04"}
    ctx = gc.Context(torch.device("cpu"), gc.DRY, True, report, spec)
    gc.run_sections(ctx, None)
    sections = ctx.report["sections"]
    assert sections["ceilings"]["status"] == "failed"
    assert sections["grpo_loss"]["status"] == "ok" and sections["weight_sync"]["status"] == "ok"
    bandwidth = [r for r in sections["grpo_loss"]["rows"] if r["unit"] == "GB/s"][0]
    assert bandwidth["ceiling"] == spec.hbm_gbps and gc.SPEC_NOTE in bandwidth["note"]
    sync = sections["weight_sync"]["rows"][0]
    assert sync["ceiling"] == spec.hbm_gbps and gc.SPEC_NOTE in sync["note"]
    assert ctx.report["ceiling_sources"]["copy_GBps"].startswith("spec sheet")
    # a device with no spec sheet: the section fails with a message saying why, the run goes on
    ctx = gc.Context(torch.device("cpu"), gc.DRY, True, dict(report, sections={}, ceilings={}), None)
    gc.run_sections(ctx, None)
    assert ctx.report["sections"]["grpo_loss"]["status"] == "check failed"
    assert "no spec sheet" in ctx.report["sections"]["grpo_loss"]["error"]
    assert ctx.report["sections"]["weight_sync"]["status"] == "check failed"


_HIDE_PYLATEXENC = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pylatexenc" or name.startswith("pylatexenc."):
            # found only in sys.path entries that are wheels (the carried one), hidden elsewhere
            from importlib.machinery import PathFinder
            wheels = [p for p in sys.path if p.endswith(".whl")]
            spec = PathFinder.find_spec(name, path if path is not None else wheels) if wheels else None
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r}")
            return spec
        return None
sys.meta_path.insert(0, Hide())
sys.argv = ["gpu_check.py", "--dry-run", "--only", "grading", "--out", sys.argv[1]]
import runpy
runpy.run_path(sys.argv[0] if False else %r, run_name="__main__")
"""


def test_grading_runs_without_pylatexenc_installed(tmp_path):
    """The GPU image has no pylatexenc: the grading section imports it from bench/wheels/ (a zip
    on sys.path, nothing installed) and says so; no other section needs it."""
    code = _HIDE_PYLATEXENC % str(SCRIPT)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    grading = report["sections"]["grading"]
    assert grading["status"] == "ok", grading.get("error")
    assert grading["details"]["carried_wheels"] == ["pylatexenc-2.10-py3-none-any.whl"]
    assert ".whl" in grading["details"]["pylatexenc_file"]  # imported from the zip, not site-packages
    assert (SCRIPT.parent / "wheels" / "pylatexenc-2.10-py3-none-any.whl").stat().st_size < 200_000
