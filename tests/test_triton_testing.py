"""The Triton test helpers themselves: the bf16 interpreter dot patch and AOT compilation."""

import pytest
import torch

pytest.importorskip("triton")

from _triton_example_kernels import dot_kernel  # noqa: E402
from triton_testing import compile_for_gpu, patch_interpreter_bf16_dot  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only")
def test_interpreter_bf16_dot_is_exact_after_patch():
    patch_interpreter_bf16_dot()
    torch.manual_seed(0)
    a = torch.randn(32, 16).bfloat16()
    b = torch.randn(16, 32).bfloat16()
    c = torch.empty(32, 32)
    dot_kernel[(1,)](a, b, c, 32, 32, 16)
    torch.testing.assert_close(c, (a.float() @ b.float()) * 2 + 1, rtol=1e-6, atol=1e-5)


@pytest.mark.aot
@pytest.mark.parametrize("capability", [80, 90])
def test_aot_compile_reports_registers_and_tensor_cores(capability):
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "M": "constexpr", "N": "constexpr", "K": "constexpr"}
    k = compile_for_gpu("_triton_example_kernels", "dot_kernel", sig, {"M": 64, "N": 64, "K": 64}, capability)
    assert k.registers > 0 and k.spilled_bytes == 0 and k.num_warps == 4
    assert (k.count("HGMMA") > 0) == (capability == 90)
    assert capability == 90 or k.count("HMMA") > 0
