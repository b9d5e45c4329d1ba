"""Small kernels that exercise tests/triton_testing.py itself."""

import triton
import triton.language as tl


@triton.jit
def _twice_plus_one(x):
    return x * 2 + 1


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], _twice_plus_one(tl.dot(a, b)))
