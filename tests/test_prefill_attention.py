"""Prefill attention (csrc/attention/prefill_attention.cu) against the float32 torch
reference, over a NaN-poisoned paged cache with shuffled blocks (attention_helpers.py).
The edges of the tensor-core kernel's tiles, in both of its shapes, are in
test_prefill_tiles.py.

GPU tests skip without a GPU or without the built extension (`pip install -e .`).
Run:  pytest tests/test_prefill_attention.py -q
"""

from __future__ import annotations

import pytest
import torch

from attention_helpers import DTYPES, assert_close, make_paged_kv, needs_kernels, run_prefill
from tinyvllm.ops import KernelInputError, check_kernel_errors, reference

pytestmark = needs_kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_no_prefix(dtype, head_dim, group):
    q_lens = [100]
    out, ref = run_prefill(q_lens, q_lens, 2 * group, 2, head_dim, 16, dtype, seed=group)
    assert_close(out, ref, dtype, f"prefill {dtype} d={head_dim} group={group}")


@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_many_sequences_with_prefix(dtype, head_dim):
    # Several sequences per launch, some with a cached prefix (seq_len > q_len), lengths
    # around the 64-row/64-key tiles and the 16-token blocks, one empty query run.
    q_lens = [1, 17, 64, 65, 0, 130, 30, 1]
    ctx = [0, 0, 0, 30, 5, 870, 97, 4096]
    seq_lens = [q + c for q, c in zip(q_lens, ctx)]
    out, ref = run_prefill(q_lens, seq_lens, 6, 2, head_dim, 16, dtype, seed=head_dim)
    assert_close(out, ref, dtype, f"prefill multi {dtype} d={head_dim}")


@pytest.mark.sanitize
@pytest.mark.parametrize("group", [3, 8])
@pytest.mark.parametrize("block_size", [8, 32])
def test_prefill_gqa_block_sizes(group, block_size):
    q_lens = [50, 200]
    seq_lens = [50, 333]
    out, ref = run_prefill(q_lens, seq_lens, 2 * group, 2, 128, block_size, torch.bfloat16, seed=group + block_size)
    assert_close(out, ref, torch.bfloat16, f"prefill group={group} block_size={block_size}")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_long(head_dim):
    # 1000 and 4097 new tokens: many query tiles, the diagonal at every offset.
    out, ref = run_prefill([1000], [1000], 4, 2, head_dim, 16, torch.bfloat16, seed=1)
    assert_close(out, ref, torch.bfloat16, f"prefill 1000 d={head_dim}")
    out, ref = run_prefill([4097], [4097], 2, 1, head_dim, 16, torch.bfloat16, seed=2)
    assert_close(out, ref, torch.bfloat16, f"prefill 4097 d={head_dim}")


@pytest.mark.sanitize
def test_prefill_strided_query_and_loose_max_seqlen():
    out, ref = run_prefill([33, 70], [40, 70], 8, 2, 64, 16, torch.float16, seed=4, query_row_pad=2 * 2 * 64,
                           max_seqlen_q=200)
    assert_close(out, ref, torch.float16, "prefill strided query")


# ------------------------------------------------------------------------------ opcheck
def test_opcheck_prefill():
    kc, vc, tables, lens = make_paged_kv([5, 37], 2, 64, 16, torch.bfloat16, 0)
    kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)
    query = torch.randn((5 + 20, 4, 64), device="cuda").to(torch.bfloat16)
    cu = torch.tensor([0, 5, 25], dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    for impl in (-1, 1, 2):
        torch.library.opcheck(
            torch.ops.tinyvllm.prefill_attention.default, (out, query, kc, vc, tables, cu, lens, 20, 0.125, impl)
        )


# ------------------------------------------------------------------------------ bad input
def test_prefill_bad_inputs():
    kc, vc, tables, lens = make_paged_kv([5, 37], 2, 64, 16, torch.bfloat16, 0)
    query = torch.randn((25, 4, 64), device="cuda").to(torch.bfloat16)
    out = torch.empty_like(query)
    cu = torch.tensor([0, 5, 25], dtype=torch.int32, device="cuda")
    op = torch.ops.tinyvllm.prefill_attention
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        op(out, query, kc, vc, tables, cu.long(), lens, 20, 0.125)
    with pytest.raises(RuntimeError, match="cu_seqlens_q"):
        op(out, query, kc, vc, tables, cu[:2], lens, 20, 0.125)
    with pytest.raises(RuntimeError, match="head_dim"):
        q96 = torch.randn((25, 4, 96), device="cuda").to(torch.bfloat16)
        op(torch.empty_like(q96), q96, kc, vc, tables, cu, lens, 20, 0.125)
    with pytest.raises(RuntimeError, match="value_cache"):
        op(out, query, kc, vc.half(), tables, cu, lens, 20, 0.125)
    with pytest.raises(RuntimeError, match="max_seqlen_q"):
        op(out, query, kc, vc, tables, cu, lens, -1, 0.125)


# ------------------------------------------------------------------------------ bad indices in device data
# cu_seqlens_q, the block table and seq_lens live on the GPU: the kernel checks each index
# before it follows it, never follows a bad one, and raises a flag that
# tinyvllm.ops.check_kernel_errors() turns into an error.
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_prefill_seq_len_outside_the_block_table_is_clamped_and_reported(dtype):
    check_kernel_errors()
    kc, vc, tables, lens = make_paged_kv([30, 50, 20], 2, 64, 16, dtype, seed=6)  # 4 blocks a row: capacity 64
    q = torch.randn((60, 8, 64), device="cuda").to(dtype)
    cu = torch.tensor([0, 20, 50, 60], dtype=torch.int32, device="cuda")
    ref = torch.empty((60, 8, 64), dtype=torch.float32, device="cuda")
    reference.prefill_attention(ref, q.float(), kc.float(), vc.float(), tables, cu, lens, 30, 0.125)
    op = torch.ops.tinyvllm.prefill_attention
    for bad in (65, -1):
        bad_lens = lens.clone()
        bad_lens[1] = bad
        out = torch.full_like(q, float("nan"))
        op(out, q, kc, vc, tables, cu, bad_lens, 30, 0.125)
        with pytest.raises(KernelInputError, match="seq_lens: an entry below 0"):
            check_kernel_errors()
            pytest.fail(f"not reported: seq_len {bad}")
        assert_close(out[:20], ref[:20], dtype, f"prefill next to a seq_len of {bad}")
        assert_close(out[50:], ref[50:], dtype, f"prefill next to a seq_len of {bad}")
        with pytest.raises(ValueError, match="seq_lens: an entry below 0"):
            reference.prefill_attention(ref.clone(), q.float(), kc.float(), vc.float(), tables, cu, bad_lens, 30, 0.125)


@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_prefill_bad_block_table_entries_and_query_runs_are_reported_not_followed(dtype):
    check_kernel_errors()
    kc, vc, tables, lens = make_paged_kv([30, 50, 20], 2, 64, 16, dtype, seed=4)
    q = torch.randn((60, 8, 64), device="cuda").to(dtype)  # runs of 20, 30 and 10 rows
    cu = torch.tensor([0, 20, 50, 60], dtype=torch.int32, device="cuda")
    op = torch.ops.tinyvllm.prefill_attention
    out = torch.full_like(q, float("nan"))
    op(out, q, kc, vc, tables, cu, lens, 30, 0.125)
    check_kernel_errors()
    ref = torch.empty((60, 8, 64), dtype=torch.float32, device="cuda")
    reference.prefill_attention(ref, q.float(), kc.float(), vc.float(), tables, cu, lens, 30, 0.125)
    assert_close(out, ref, dtype, "prefill before the bad inputs")

    bad_tables = tables.clone()
    bad_tables[1, 2] = 1 << 30  # tokens 32-47 of sequence 1
    out2 = out.clone()
    op(out2, q, kc, vc, bad_tables, cu, lens, 30, 0.125)
    with pytest.raises(KernelInputError, match="block_tables"):
        check_kernel_errors()
    assert_close(out2[:20], ref[:20], dtype, "prefill next to a sequence with a bad entry")
    assert_close(out2[50:], ref[50:], dtype, "prefill next to a sequence with a bad entry")

    cases = {
        "a run past the query": torch.tensor([0, 20, 50, 70], dtype=torch.int32, device="cuda"),
        "a run that ends before it starts": torch.tensor([0, 20, 10, 60], dtype=torch.int32, device="cuda"),
        "a run longer than max_seqlen_q": torch.tensor([0, 20, 55, 60], dtype=torch.int32, device="cuda"),
        "a run longer than its sequence": torch.tensor([0, 20, 35, 60], dtype=torch.int32, device="cuda"),
    }
    for what, bad_cu in cases.items():
        op(torch.full_like(q, float("nan")), q, kc, vc, tables, bad_cu, lens, 30, 0.125)
        with pytest.raises(KernelInputError, match="cu_seqlens_q"):
            check_kernel_errors()
            pytest.fail(f"not reported: {what}")
        with pytest.raises(ValueError, match="cu_seqlens_q"):
            reference.prefill_attention(ref, q.float(), kc.float(), vc.float(), tables, bad_cu, lens, 30, 0.125)
