"""Test helpers for Triton kernels on a machine without a GPU.

- The interpreter (TRITON_INTERPRET=1, set in conftest.py) stores bf16 as raw uint16 and does
  arithmetic on the bit patterns (triton-lang/triton #11584). Kernels upcast bf16 after loading,
  but `tl.dot` must keep bf16 operands for the tensor cores; `patch_interpreter_bf16_dot` makes
  the interpreter's dot read bf16 operands as the numbers they encode (tests only).
- `compile_for_gpu` compiles a kernel ahead of time for an NVIDIA target (sm_80, sm_90) with no
  GPU present and reads the cubin with the cuobjdump shipped in the Triton wheel, so register
  spills and Hopper wgmma (HGMMA) use can be asserted in CI. It runs in a child process without
  TRITON_INTERPRET, because interpreted @triton.jit functions cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


def patch_interpreter_bf16_dot() -> None:
    """Make the interpreter's tl.dot convert bf16 operands to fp32 first (idempotent)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_bf16_patched", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16:
            a = interpreter.TensorHandle(_bf16_bits_to_fp32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = interpreter.TensorHandle(_bf16_bits_to_fp32(b.data), tl.float32)
        return original(self, a, b, d, *args, **kwargs)

    create_dot._bf16_patched = True
    builder.create_dot = create_dot


def _bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    # a bf16 is the top half of an fp32: shift the 16 stored bits up
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass
class CompiledKernel:
    registers: int  # per thread
    spilled_bytes: int  # cuobjdump's LOCAL: > 0 means register spills
    stack: int
    shared_bytes: int  # from Triton's metadata (dynamic shared memory)
    num_warps: int
    sass: str

    def count(self, opcode: str) -> int:
        """How many SASS instructions start with `opcode` (e.g. "HGMMA", "HMMA")."""
        return sum(1 for line in self.sass.splitlines() if f" {opcode}." in line or f" {opcode} " in line)


def compile_for_gpu(
    module: str, kernel: str, signature: dict, constexprs: dict, capability: int, num_warps: int = 4, num_stages: int = 3
) -> CompiledKernel:
    """Compile `module.kernel` for CUDA `capability` (80 = A100, 90 = H100/H200), no GPU needed.

    signature: {arg name: "*bf16" | "*fp32" | "i32" | "i64" | "fp32" | ... | "constexpr"}.
    """
    request = dict(module=module, kernel=kernel, signature=signature, constexprs=constexprs,
                   capability=capability, num_warps=num_warps, num_stages=num_stages)
    return compile_many_for_gpu([request])[0]


def compile_many_for_gpu(requests: list[dict]) -> list[CompiledKernel]:
    """compile_for_gpu for each request (a dict of its arguments), all in one child process:
    the child's imports (torch, through most kernel modules) cost more than a compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the child imports `module` the way this process can (tests/ is on pytest's sys.path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(requests)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        names = ", ".join(f"{r['module']}.{r['kernel']} (sm_{r['capability']})" for r in requests)
        raise RuntimeError(f"compiling {names} failed:\n{out.stderr[-4000:]}")
    return [CompiledKernel(**json.loads(line)) for line in out.stdout.splitlines()[-len(requests):]]



def compile_jobs_for_gpu(jobs: list, request_of) -> dict:
    """{job: CompiledKernel} for every job, request_of(*job) giving its compile_for_gpu arguments;
    the jobs split over two child processes side by side (the machines here have 2 cores)."""
    halves = [jobs[0::2], jobs[1::2]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        compiled = pool.map(lambda half: compile_many_for_gpu([request_of(*job) for job in half]), halves)
        return {job: kernel for half, kernels in zip(halves, compiled) for job, kernel in zip(half, kernels)}

_CHILD = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
results = []
for req in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(req["module"]), req["kernel"])
    src = ASTSource(fn=fn, signature=req["signature"], constexprs=req["constexprs"])
    k = triton.compile(src, target=GPUTarget("cuda", req["capability"], 32),
                       options={"num_warps": req["num_warps"], "num_stages": req["num_stages"]})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    line = next(l for l in usage.splitlines() if "REG:" in l)
    fields = dict(re.findall(r"(\w+):(\d+)", line))
    results.append(dict(registers=int(fields["REG"]), spilled_bytes=int(fields["LOCAL"]), stack=int(fields["STACK"]),
                        shared_bytes=int(k.metadata.shared), num_warps=int(k.metadata.num_warps), sass=sass))
# printed last and together: compiler warnings cannot interleave with them
for r in results:
    print(json.dumps(r))
"""
