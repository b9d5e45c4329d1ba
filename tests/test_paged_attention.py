"""paged_decode_attention, both backends, against a float64 loop over sequences.

The Triton path runs under the interpreter on CPU (16-slot tiles, so test-sized sequences span
several tiles and splits) and natively on a GPU. Every pool slot that no sequence owns holds NaN
and unused block-table entries hold -1: a kernel that reads past a live length or through an
unused table entry fails loudly instead of adding a plausible number.
"""

from __future__ import annotations

import math

import pytest
import torch

import dsr_fast.kernels.paged_attention as PA
from dsr_fast.kernels import paged_decode_attention
from dsr_fast.kernels.paged_attention import reference_paged_decode_attention

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
if HAS_TRITON and not CUDA:
    from triton_testing import patch_interpreter_bf16_dot

    patch_interpreter_bf16_dot()

# fp32: each output is a convex combination of V rows; fp32 scores, exp and sums err by a few
# units of 2⁻²⁴ relative to max|v| per term (|v| ~ 1 here). A GPU's exp2 is the approximate
# ex2.approx (2 ulp) and sums in another order over thousands of slots: a little more room.
FP32_ATOL = 1e-5 if CUDA else 2e-6


def make_case(lengths, num_q_heads, num_kv_heads, head_dim, block_size, *, dtype=torch.float32, seed=0,
              shared_prefix_blocks=0, spare_columns=2):
    """A pool with the sequences' blocks scattered at random ids, everything else NaN.

    shared_prefix_blocks: sequences 1 and 2 (if long enough) reuse sequence 0's first blocks, as
    the samples of one prompt do.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    blocks_per_seq = [math.ceil(n / block_size) for n in lengths]
    num_blocks = sum(blocks_per_seq) + 5
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_per_seq + [1]) + spare_columns
    table = torch.full((batch, width), -1, dtype=torch.int32)  # unused entries: never a valid id
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    next_block = 0
    for b, (n, nb) in enumerate(zip(lengths, blocks_per_seq)):
        for j in range(nb):
            shared = 0 < b <= 2 and j < shared_prefix_blocks and j < blocks_per_seq[0] - 1 and (j + 1) * block_size <= n
            if shared:
                table[b, j] = table[0, j]
                continue
            table[b, j] = order[next_block]
            next_block += 1
            live = min(block_size, n - j * block_size)  # a partial last block keeps NaN past n
            k_cache[order[next_block - 1], :live] = torch.randn(live, num_kv_heads, head_dim, generator=gen)
            v_cache[order[next_block - 1], :live] = torch.randn(live, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(batch, num_q_heads, head_dim, generator=gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), table, seq_lens


def run(backend, q, k_cache, v_cache, table, seq_lens, **kwargs):
    args = (t.to(DEVICE) for t in (q, k_cache, v_cache, table, seq_lens))
    return paged_decode_attention(*args, backend=backend, **kwargs).cpu()


def assert_close(got, want, atol, name=""):
    assert got.shape == want.shape
    err = (got.double() - want).abs()
    assert bool(torch.isfinite(got).all()), f"{name}: non-finite output"
    assert float(err.max()) <= atol, f"{name}: max error {float(err.max()):.3e} > {atol:.1e}"


# ---------------------------------------------------------------------------------------------
# fp32 against the float64 reference
# ---------------------------------------------------------------------------------------------

# Ragged lengths: a single slot, a padding row, a partial second block, several tiles with a
# partial last block, exactly one block.
LENGTHS = [1, 0, 17, 70, 16]


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("heads", [(12, 2), (6, 1), (2, 2), (8, 1)], ids=["12:2", "6:1", "1:1", "8:1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, heads, num_splits):
    if backend == "torch" and num_splits != 1:
        pytest.skip("the torch path has no splits")
    q, k, v, table, lens = make_case(LENGTHS, *heads, 32, 16, seed=hash(heads) % 1000, shared_prefix_blocks=1)
    want = reference_paged_decode_attention(q, k, v, table, lens)
    got = run(backend, q, k, v, table, lens, num_splits=num_splits)
    assert got.dtype == torch.float32
    assert_close(got, want, FP32_ATOL, f"{backend} {heads} splits={num_splits}")
    assert bool((got[1] == 0).all())  # the padding row


@pytest.mark.parametrize("head_dim", [16, 40, 64, 128])
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dims(backend, head_dim):
    """16 and 128 (tiny test models, Qwen2-1.5B); 40 pads the D tile to 64 with masks."""
    q, k, v, table, lens = make_case([5, 33, 48], 12, 2, head_dim, 16, seed=head_dim)
    want = reference_paged_decode_attention(q, k, v, table, lens)
    assert_close(run(backend, q, k, v, table, lens, num_splits=2), want, FP32_ATOL, f"D={head_dim}")


@pytest.mark.parametrize("block_size", [1, 5, 16, 64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sizes(backend, block_size):
    """Tiles gather slots through the table, so any block size works, also smaller than or not
    dividing the tile (1, 5) and larger than it (64: one block spans several tiles)."""
    q, k, v, table, lens = make_case([3, 0, 41, 70], 6, 1, 32, block_size, seed=block_size)
    want = reference_paged_decode_attention(q, k, v, table, lens)
    assert_close(run(backend, q, k, v, table, lens, num_splits=3), want, FP32_ATOL, f"block_size={block_size}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_blocks_and_scale(backend):
    """Three sequences share a 3-block prompt (prefix sharing), the rest is their own; a
    non-default scale."""
    q, k, v, table, lens = make_case([60, 55, 63, 9], 12, 2, 32, 16, seed=11, shared_prefix_blocks=3)
    assert table[1, 0] == table[0, 0] and table[2, 2] == table[0, 2] and table[1, 3] != table[0, 3]
    want = reference_paged_decode_attention(q, k, v, table, lens, scale=0.3)
    assert_close(run(backend, q, k, v, table, lens, scale=0.3, num_splits=2), want, FP32_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_splits_do_not_change_the_result(backend):
    """More splits than a sequence has tiles leaves some splits empty; the merge ignores them."""
    q, k, v, table, lens = make_case([1, 90, 30], 12, 2, 32, 16, seed=5)
    outs = [run(backend, q, k, v, table, lens, num_splits=s) for s in (1, 2, 7)]
    for out in outs[1:]:
        assert_close(out, outs[0].double(), FP32_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_and_empty_batch(backend):
    q, k, v, table, lens = make_case([0, 0], 12, 2, 32, 16)
    table[1] = 10**6  # a padding row's table is never read as block ids
    assert bool((run(backend, q, k, v, table, lens, num_splits=3) == 0).all())
    q, k, v, table, lens = make_case([4], 12, 2, 32, 16)
    out = run(backend, q[:0], k, v, table[:0], lens[:0])
    assert out.shape == (0, 12, 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_query(backend):
    """q as a view into a fused QKV projection: its batch stride is not Hq·D."""
    q, k, v, table, lens = make_case([7, 40], 12, 2, 32, 16, seed=9)
    qkv = torch.randn(2, 16, 32)
    qkv[:, :12] = q
    want = reference_paged_decode_attention(q, k, v, table, lens)
    assert_close(run(backend, qkv[:, :12], k, v, table, lens, num_splits=2), want, FP32_ATOL)


def test_long_context_torch():
    """> 10K slots (the recipe's 8K–24K responses) beside short rows, on the torch path."""
    q, k, v, table, lens = make_case([10_241, 3, 0, 2_000], 12, 2, 64, 16, seed=13)
    want = reference_paged_decode_attention(q, k, v, table, lens)
    assert_close(run("torch", q, k, v, table, lens), want, FP32_ATOL)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_long_context_triton(monkeypatch):
    """> 10K slots on the Triton path; under the interpreter with 128-slot tiles (80 tiles per
    sequence, 10 per split) so that it stays a few seconds."""
    if not CUDA:
        monkeypatch.setattr(PA, "_INTERPRETER", PA.PagedAttentionConfig(block_n=128, num_warps=4, num_stages=1))
    q, k, v, table, lens = make_case([10_241, 3], 6, 1, 64, 16, seed=17)
    want = reference_paged_decode_attention(q, k, v, table, lens)
    assert_close(run("triton", q, k, v, table, lens, num_splits=8), want, FP32_ATOL)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.skipif(not CUDA, reason="the GPU tiles only compile for a GPU; see the AOT tests")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_production_tiles_on_gpu(dtype):
    q, k, v, table, lens = make_case([1, 0, 700, 3000, 129], 12, 2, 128, 16, dtype=dtype, seed=19)
    want = reference_paged_decode_attention(q, k, v, table, lens)
    got = run("triton", q, k, v, table, lens)
    assert_close(got, want, FP32_ATOL if dtype == torch.float32 else 2e-2)


@pytest.mark.skipif(not HAS_TRITON or CUDA, reason="a GPU runs its own generation's tiles")
@pytest.mark.parametrize("config_name", ["_SM90", "_SM80", "_FP32"])
def test_production_tiles_under_interpreter(monkeypatch, config_name):
    """The GPU tiles (64 and 32 slots) compute the same thing, across several tiles and splits."""
    monkeypatch.setattr(PA, "_INTERPRETER", getattr(PA, config_name))
    q, k, v, table, lens = make_case([1, 0, 150, 64, 65], 12, 2, 32, 16, seed=31)
    want = reference_paged_decode_attention(q, k, v, table, lens)
    assert_close(run("triton", q, k, v, table, lens, num_splits=2), want, FP32_ATOL)


# ---------------------------------------------------------------------------------------------
# bf16 / fp16 inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_inputs(backend, dtype):
    """Against the float64 attention of the same (exactly representable) bf16/fp16 values.

    Both paths round the output once: ≤ u·|out|. The Triton path also rounds each probability to
    the input dtype for the P·V tensor-core dot: Σ_t |δp_t|·|v_t| ≤ u·Σ_t p_t|v_t|, which is the
    reference attention over |V|. u = 2⁻⁸ (bf16) / 2⁻¹¹ (fp16), doubled for bf16 in the
    interpreter, which converts fp32 to bf16 by truncation; plus the fp32 slack.
    """
    q, k, v, table, lens = make_case(LENGTHS, 12, 2, 32, 16, dtype=dtype, seed=23)
    want = reference_paged_decode_attention(q, k, v, table, lens)
    got = run(backend, q, k, v, table, lens, num_splits=3)
    assert got.dtype == dtype
    u = torch.finfo(dtype).eps / 2
    if dtype == torch.bfloat16 and backend == "triton" and not CUDA:
        u *= 2
    bound = u * want.abs() + FP32_ATOL
    if backend == "triton":
        bound += u * reference_paged_decode_attention(q, k, v.abs(), table, lens)
    err = (got.double() - want).abs()
    assert bool(torch.isfinite(got).all())
    assert bool((err <= bound).all()), f"worst excess {float((err - bound).max()):.3e}"
    # and the error is really of the dtype's order, not zero by accident of a wider path
    assert float(err.max()) > 0


# ---------------------------------------------------------------------------------------------
# Bad input, options, backend choice
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    q, k, v, table, lens = make_case([4, 9], 12, 2, 32, 16)
    cases = [
        (dict(q=q[0]), r"q must be 3-D \[B, Hq, D\]"),
        (dict(k_cache=k[0]), r"k_cache must be 4-D"),
        (dict(v_cache=v[:, :8]), r"k_cache and v_cache must have one shape"),
        (dict(q=q[..., :16]), r"k_cache head_dim 32 != q head_dim 16"),
        (dict(q=q[:, :7]), r"Hq = 7 must be a multiple of k_cache's Hkv = 2"),
        (dict(block_table=table.long()), r"block_table must be int32, got torch.int64"),
        (dict(block_table=table[:1]), r"block_table must be \[B=2, max_blocks_per_seq\]"),
        (dict(seq_lens=lens.long()), r"seq_lens must be int32, got torch.int64"),
        (dict(seq_lens=lens[:1]), r"seq_lens must be \[B=2\]"),
        (dict(q=q.double()), r"q must be one of"),
        (dict(q=q.bfloat16()), r"q, k_cache and v_cache must share a dtype"),
    ]
    base = dict(q=q, k_cache=k, v_cache=v, block_table=table, seq_lens=lens)
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            paged_decode_attention(**{**base, **change}, backend="torch")
    with pytest.raises(ValueError, match=r"num_splits must be an int in \[1, 64\], got 0"):
        paged_decode_attention(**base, num_splits=0)
    with pytest.raises(ValueError, match=r"scale must be a finite number"):
        paged_decode_attention(**base, scale=float("nan"))
    with pytest.raises(ValueError, match=r"backend must be one of"):
        paged_decode_attention(**base, backend="cuda")


def test_torch_path_rejects_lengths_past_the_table():
    q, k, v, table, lens = make_case([4, 9], 12, 2, 32, 16, spare_columns=0)
    lens[1] = 17  # two blocks of 16, but the table holds one per sequence
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 17 needs 2 blocks of 16, but block_table has 1"):
        paged_decode_attention(q, k, v, table, lens, backend="torch")


def test_default_num_splits_depends_on_shapes_only():
    cpu = torch.device("cpu")
    assert PA.default_num_splits(1, 2, 1536, 16, cpu) == 4  # few long rows: split
    assert PA.default_num_splits(64, 2, 1536, 16, cpu) == 1  # enough programs already
    assert PA.default_num_splits(1, 1, 1, 16, cpu) == 1  # a short table: no slivers
    for batch in (1, 7, 256):
        assert 1 <= PA.default_num_splits(batch, 2, 10**5, 16, cpu) <= PA.MAX_SPLITS


def test_config_choice(monkeypatch):
    assert PA.kernel_config(torch.device("cpu"), torch.bfloat16) is PA._INTERPRETER
    assert PA.gpu_kernel_config(9, torch.bfloat16) is PA._SM90 and PA.gpu_kernel_config(8, torch.float16) is PA._SM80
    assert PA.gpu_kernel_config(9, torch.float32) is PA.gpu_kernel_config(8, torch.float32) is PA._FP32


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_with_new_lengths_and_tables():
    """Captured once with static buffers, replayed after the lengths and the table change."""
    q, k, v, table, lens = (t.cuda() for t in make_case([300, 0, 5], 12, 2, 128, 16, dtype=torch.bfloat16, seed=29))
    static_lens, static_table = lens.clone(), table.clone()
    paged_decode_attention(q, k, v, static_table, static_lens, num_splits=4)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k, v, static_table, static_lens, num_splits=4)
    new_table = table[[2, 0, 1]]  # row 1 now reads sequence 0's blocks, row 0 sequence 2's
    static_lens.copy_(torch.tensor([5, 290, 0], dtype=torch.int32))
    static_table.copy_(new_table)
    graph.replay()
    want = reference_paged_decode_attention(q, k, v, new_table, static_lens)
    assert_close(out.cpu(), want, 2e-2)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_80 and sm_90
# ---------------------------------------------------------------------------------------------

_POINTERS = {"block_table_ptr": "*i32", "seq_lens_ptr": "*i32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
_FLOATS = {"qk_scale_log2"}
# Contiguous pools and outputs: the head dim's stride is 1 and never passed; Triton's launcher
# specialises no other stride of these shapes to 1.
_AOT_JOBS = [
    (kernel, capability, dtype, block_size, single)
    for capability in (80, 90)
    for dtype in ("bf16", "fp32")
    for block_size in (16, 64)
    for kernel, single in (("_paged_decode_split_kernel", False), ("_paged_decode_split_kernel", True),
                           ("_paged_decode_merge_kernel", None))
    if kernel != "_paged_decode_merge_kernel" or (dtype == "bf16" and block_size == 16)
]


def _compile_request(kernel, capability, dtype, block_size, single):
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    if kernel == "_paged_decode_merge_kernel":
        meta = PA.merge_meta(128, 16)
    else:
        config = PA.gpu_kernel_config(capability // 10, torch_dtype)
        meta = PA.split_meta(config, 6, 128, block_size, single, aligned=True)  # Qwen2-1.5B: 12:2, D = 128
    meta = dict(meta)
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    signature = {}
    for name in getattr(PA, kernel).arg_names:
        if name in meta:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = _POINTERS.get(name, "*" + dtype)
        else:
            signature[name] = "fp32" if name in _FLOATS else "i32"
    return dict(module="dsr_fast.kernels.paged_attention", kernel=kernel, signature=signature, constexprs=meta,
                capability=capability, num_warps=num_warps, num_stages=num_stages)


@pytest.fixture(scope="module")
def compiled_kernels():
    from triton_testing import compile_jobs_for_gpu

    return compile_jobs_for_gpu(_AOT_JOBS, _compile_request)


@pytest.mark.slow
@pytest.mark.aot
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("kernel, capability, dtype, block_size, single", _AOT_JOBS)
def test_kernels_compile_without_spills(compiled_kernels, kernel, capability, dtype, block_size, single):
    compiled = compiled_kernels[(kernel, capability, dtype, block_size, single)]
    print(f"{kernel} sm_{capability} {dtype} block {block_size} single={single}: {compiled.registers} registers, "
          f"stack {compiled.stack} B, shared {compiled.shared_bytes} B, HGMMA {compiled.count('HGMMA')}, "
          f"HMMA {compiled.count('HMMA')}")
    assert compiled.spilled_bytes == 0
    assert compiled.stack == 0  # these kernels call no functions: any stack frame is spills
    assert compiled.shared_bytes <= (227 if capability == 90 else 163) * 1024
    if kernel == "_paged_decode_merge_kernel":
        return
    # M = 16 rows (the GQA group padded) is below wgmma's 64: mma.sync on both generations for
    # 16-bit inputs; fp32 inputs (IEEE) have no tensor-core instruction at all.
    assert compiled.count("HGMMA") == 0
    # the aligned gathers are vectorised into cp.async copies (software-pipelined), not 2-byte loads
    assert compiled.count("LDGSTS") > 0
    if dtype == "bf16":
        assert compiled.count("HMMA") > 0
    else:
        assert compiled.count("HMMA") == 0
