"""Packed batches: layout, shifted labels, inverse, micro-batch planning."""

import pytest
import torch
import torch.nn.functional as F

from dsr_fast.packing import (
    IGNORE_INDEX,
    pack,
    plan_microbatches,
    sequence_ids,
    unpack,
    varlen_attention,
)


def test_pack_layout_and_labels_stay_within_sequences():
    seqs = [[5, 6, 7], [8], [9, 10]]
    b = pack(seqs)
    assert b.input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert b.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and b.cu_seqlens.dtype == torch.int32
    assert b.max_seqlen == 3
    assert b.labels.tolist() == [6, 7, IGNORE_INDEX, IGNORE_INDEX, 10, IGNORE_INDEX]
    assert sequence_ids(b.cu_seqlens).tolist() == [0, 0, 0, 1, 2, 2]
    assert [t.tolist() for t in unpack(b.input_ids, b.cu_seqlens)] == seqs


def test_pack_rejects_empty():
    with pytest.raises(ValueError, match="no sequences"):
        pack([])
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pack([[1], []])


def test_varlen_attention_equals_masked_dense_attention():
    torch.manual_seed(0)
    lens = [4, 1, 6]
    T, Hq, Hkv, D = sum(lens), 4, 2, 8
    q, k, v = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, max(lens))
    # dense reference: block-diagonal causal mask over the whole packed batch
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    pos = torch.arange(T)
    mask = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
    kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    scores = torch.einsum("thd,shd->hts", q, kk) / D**0.5
    ref = torch.einsum("hts,shd->thd", F.softmax(scores.masked_fill(~mask, float("-inf")), -1), vv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_plan_microbatches_respects_budget_and_covers_everything():
    lengths = [7, 3, 9, 1, 5, 5, 2, 10]
    bins = plan_microbatches(lengths, max_tokens=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 5  # 42 tokens need >= 5 bins of 10; first-fit decreasing finds 5
    with pytest.raises(ValueError, match="sequence 2 has 9 tokens"):
        plan_microbatches([1, 2, 9], max_tokens=8)
