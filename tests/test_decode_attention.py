"""Paged decode attention (csrc/attention/: paged_attention.cu and the decode_* files)
against the float32 torch reference, over a NaN-poisoned paged cache with shuffled blocks
(attention_helpers.py says how the poison catches reads past the end and unwritten outputs).

The op's `impl` hook picks the kernel: 0 CUDA cores (float32 caches), 1 tensor cores with a
block's warps sharing a kv head, 3 tensor cores with one kv head per warp; -1 (the product's)
lets the plan choose. The bf16 CUDA-core kernel and the TMA loader live in dev/cuda/, which
checks them itself. The plan's choices are pinned by test_decode_plan.py, the CUDA-graph
replay by test_decode_graphs.py.

GPU tests skip without a GPU or without the built extension (`pip install -e .`).
Run:  pytest tests/test_decode_attention.py -q
"""

from __future__ import annotations

import pytest
import torch

from attention_helpers import (DTYPES, TENSOR_CORE_IMPLS, assert_close, decode, head_per_warp_pays, llama_plan,
                               decode_plan, make_paged_kv, needs_kernels, run_decode)
from tinyvllm.ops import KernelInputError, check_kernel_errors, reference

pytestmark = needs_kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_decode_dtypes_heads_gqa(dtype, head_dim, group):
    num_kv_heads = 2
    seq_lens = [1, 15, 16, 17, 100]
    out, ref = run_decode(seq_lens, num_kv_heads * group, num_kv_heads, head_dim, 16, dtype, seed=group)
    assert_close(out, ref, dtype, f"decode {dtype} d={head_dim} group={group} lens={seq_lens}")


@pytest.mark.sanitize
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_decode_long_contexts_split(dtype, head_dim):
    # Few sequences, long contexts: many flash-decoding splits and the merge kernel.
    seq_lens = [1000, 4097, 1, 17]
    out, ref = run_decode(seq_lens, 32, 8, head_dim, 16, dtype, seed=7)
    assert_close(out, ref, dtype, f"decode long {seq_lens}")


def test_decode_single_sequence_single_kv_head():
    # batch 1 and one kv head: the most splits the planner makes (small base).
    out, ref = run_decode([4097], 8, 1, 128, 16, torch.bfloat16, seed=11)
    assert_close(out, ref, torch.bfloat16, "decode 1x4097 kv_heads=1")


@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_decode_batches_llama_1b_shape(batch):
    g = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, 600, (batch,), generator=g).tolist()
    seq_lens[0] = 1000 if batch <= 8 else seq_lens[0]
    out, ref = run_decode(seq_lens, 32, 8, 64, 16, torch.bfloat16, seed=batch)
    assert_close(out, ref, torch.bfloat16, f"decode batch={batch}")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 16])
def test_decode_cuda_core_kernel_splits_and_merges(head_dim, group):
    # impl=0 forces the CUDA-core kernel (what float32 caches run); lengths up to 4097
    # split and merge. (Its bfloat16/float16 version: dev/cuda/paged_attention_decode.cu.)
    seq_lens = [1, 15, 17, 100, 1000, 4097]
    out, ref = run_decode(seq_lens, 2 * group, 2, head_dim, 16, torch.float32, seed=group, impl=0)
    assert_close(out, ref, torch.float32, f"decode CUDA cores d={head_dim} group={group}")


def test_decode_impl_choice_errors_name_the_problem():
    a = _decode_args()
    args = (a["out"], a["query"], a["key_cache"], a["value_cache"], a["block_tables"], a["seq_lens"], a["scale"])
    with pytest.raises(RuntimeError, match="impl must be -1"):
        decode(*args, 4)
    with pytest.raises(RuntimeError, match=r"impl=2 \(tensor cores with TMA loads\) is no longer .* dev/cuda"):
        decode(*args, 2)
    with pytest.raises(RuntimeError, match=r"impl=0 \(CUDA cores\) runs float32 caches only"):
        decode(*args, 0)
    capacity = a["block_tables"].shape[1] * a["key_cache"].shape[2]  # tokens the table can hold per sequence
    with pytest.raises(RuntimeError, match=rf"sum_seq_lens must be .* 2 x {capacity} = {2 * capacity} .* got"):
        decode(*args, -1, 2 * capacity + 1)
    f = _decode_args()
    f32 = {k: f[k].float() for k in ("out", "query", "key_cache", "value_cache")}
    for impl in (1, 3):
        with pytest.raises(RuntimeError, match=rf"impl={impl} \(tensor cores\) needs a bfloat16 or float16 cache"):
            decode(f32["out"], f32["query"], f32["key_cache"], f32["value_cache"], f["block_tables"], f["seq_lens"],
                   f["scale"], impl)


# The tensor-core kernel with its two shapes of block (TENSOR_CORE_IMPLS). The NaN-poisoned
# cache tail checks that rows past a sequence's end never reach the output.
@pytest.mark.parametrize("impl", TENSOR_CORE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32, 128])
def test_decode_tensor_core_kernel_block_sizes_and_lengths(impl, dtype, head_dim, block_size):
    seq_lens = [1, 7, 8, 9, 15, 16, 17, block_size + 1, 100, 1000, 4097]
    out, ref = run_decode(seq_lens, 8, 2, head_dim, block_size, dtype, seed=block_size + head_dim, impl=impl)
    assert_close(out, ref, dtype, f"decode impl={impl} {dtype} d={head_dim} block_size={block_size}")


@pytest.mark.parametrize("impl", TENSOR_CORE_IMPLS)
@pytest.mark.parametrize("group", [1, 12, 32])
def test_decode_tensor_core_kernel_groups(impl, group):
    if impl == 3 and group > 16:  # a warp holds at most 16 query heads (one mma row block)
        with pytest.raises(RuntimeError, match=r"impl=3 \(one kv head per warp\) needs at most 16 query heads "
                                               r"per kv head, got 32"):
            run_decode([1, 33], group * 2, 2, 128, 16, torch.bfloat16, impl=impl)
        return
    out, ref = run_decode([1, 33, 700, 2100], group * 2, 2, 128, 16, torch.bfloat16, seed=group, impl=impl)
    assert_close(out, ref, torch.bfloat16, f"decode impl={impl} group={group}")


@pytest.mark.sanitize
@pytest.mark.parametrize("impl", TENSOR_CORE_IMPLS)
def test_decode_tensor_core_kernel_split_and_unsplit(impl):
    # Batch 2 splits the 3000-token sequence; 64 sequences fill the GPU unsplit, and
    # sequence 5 (2100 tokens) then walks past 32 tiles of block-table entries per warp.
    out, ref = run_decode([3000, 17], 32, 8, 64, 16, torch.bfloat16, seed=31, impl=impl)
    assert_close(out, ref, torch.bfloat16, f"decode split impl={impl}")
    g = torch.Generator().manual_seed(impl)
    seq_lens = torch.randint(1, 200, (64,), generator=g).tolist()
    seq_lens[5] = 2100
    out, ref = run_decode(seq_lens, 32, 8, 64, 8, torch.bfloat16, seed=32, impl=impl)
    assert_close(out, ref, torch.bfloat16, f"decode unsplit impl={impl}")


@pytest.mark.sanitize
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_unsplit_long_sequence_refills_block_table_entries(head_dim):
    # 64 sequences x 8 kv heads fill the GPU without splitting, so one block walks the
    # whole 5000-token sequence: each warp takes 79 tiles of 16 tokens, past the 32
    # tiles whose block-table entries the tensor-core kernel holds at a time.
    g = torch.Generator().manual_seed(head_dim)
    seq_lens = torch.randint(1, 300, (64,), generator=g).tolist()
    seq_lens[5] = 5000
    out, ref = run_decode(seq_lens, 32, 8, head_dim, 16, torch.bfloat16, seed=head_dim + 1)
    assert_close(out, ref, torch.bfloat16, f"decode unsplit long d={head_dim}")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [4, 12])
def test_decode_wide_blocks_replace_a_few_splits(head_dim, group):
    # When 4-warp blocks would cut the context into 2 to 4 partitions, the plan runs one
    # block of 8 or 16 warps per sequence instead (head_dim 64; at 128, 16 warps do not
    # fit shared memory and those shapes stay split). Which batches land in that range
    # depends on the SM count, so sweep batch 1..48 with a 1024-token table (the
    # capacity sizes the plan) and ragged real lengths; on an H100/H200 the sweep
    # covers 8, 16 and 4 warps, split and unsplit.
    g = torch.Generator().manual_seed(head_dim + group)
    for batch in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48):
        seq_lens = torch.randint(1, 1025, (batch,), generator=g).tolist()
        seq_lens[0] = 1024
        out, ref = run_decode(seq_lens, 2 * group, 2, head_dim, 16, torch.bfloat16, seed=batch, table_width=64)
        assert_close(out, ref, torch.bfloat16, f"decode batch={batch} group={group} d={head_dim}")


@pytest.mark.sanitize
def test_decode_wide_blocks_under_the_sanitizer():
    # Llama-1B heads on an H100/H200: batch 8 x 512 runs 16-warp blocks, 32 x 1024 8-warp blocks.
    for batch, width in ((8, 32), (32, 64)):
        g = torch.Generator().manual_seed(batch)
        seq_lens = torch.randint(1, width * 16 + 1, (batch,), generator=g).tolist()
        out, ref = run_decode(seq_lens, 32, 8, 64, 16, torch.bfloat16, seed=batch, table_width=width)
        assert_close(out, ref, torch.bfloat16, f"decode wide blocks batch={batch}")


@pytest.mark.sanitize
def test_decode_with_blocks_per_sm_held_down_matches_reference():
    # The first batch (Llama heads, 512-token table) whose plan holds the blocks per SM
    # down, with ragged lengths: the padded launch computes what the normal one does.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    fit = llama_plan(4 * sms, 512)["blocks_per_sm"]
    batch = next((b for b in range(fit * sms // 8, 2 * fit * sms // 8 + 1)
                  if llama_plan(b, 512)["blocks_per_sm"] < fit), None)
    if batch is None:
        pytest.skip(f"no batch holds the blocks per SM down on this GPU ({fit} fit)")
    g = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, 513, (batch,), generator=g).tolist()
    seq_lens[0] = 512
    out, ref = run_decode(seq_lens, 32, 8, 64, 16, torch.bfloat16, seed=batch, table_width=32)
    assert_close(out, ref, torch.bfloat16, f"decode batch={batch} with fewer blocks per SM")


@pytest.mark.sanitize
@pytest.mark.parametrize("num_kv_heads", [8, 6])
def test_decode_one_kv_head_per_warp_matches_reference(num_kv_heads):
    # The automatic plan at the first batch it picks, lengths about equal (the sum
    # passed, as the engine does). 6 kv heads: each sequence's second block has 2 idle warps.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    q = torch.empty(4 * sms, num_kv_heads * 4, 64, device="cuda", dtype=torch.bfloat16)
    fit = decode_plan(q, num_kv_heads, 160, impl=3)["blocks_per_sm"]
    batch = next(b for b in range(sms, 4 * sms) if head_per_warp_pays(b, sms, fit, num_kv_heads))
    g = torch.Generator().manual_seed(num_kv_heads)
    seq_lens = torch.randint(130, 161, (batch,), generator=g).tolist()
    seq_lens[0] = 160
    width = 160 // 16
    qb = torch.empty(batch, num_kv_heads * 4, 64, device="cuda", dtype=torch.bfloat16)
    assert decode_plan(qb, num_kv_heads, width * 16, sum_seq_lens=sum(seq_lens))["head_per_warp"]
    out, ref = run_decode(seq_lens, num_kv_heads * 4, num_kv_heads, 64, 16, torch.bfloat16, seed=batch,
                          table_width=width, sum_seq_lens=sum(seq_lens))
    assert_close(out, ref, torch.bfloat16, f"decode one kv head per warp, batch={batch}")


@pytest.mark.sanitize
def test_decode_length_hint_never_changes_the_result():
    # sum_seq_lens only picks the plan. Right, absent, or wrong (a ragged batch said to be
    # of equal lengths), the output is the reference's.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch = -(-5 * sms // 16)  # about 2.5 blocks per SM at 8 kv heads (42 on 132 SMs)
    g = torch.Generator().manual_seed(batch)
    ragged = torch.randint(1, 1025, (batch,), generator=g).tolist()
    ragged[0] = 1024
    for seq_lens in ([1024] * batch, ragged):
        for hint in (-1, sum(seq_lens), batch * 1024):
            out, ref = run_decode(seq_lens, 32, 8, 64, 16, torch.bfloat16, seed=batch, table_width=64,
                                  sum_seq_lens=hint)
            assert_close(out, ref, torch.bfloat16, f"decode batch={batch} sum_seq_lens={hint}")
    # A batch with more than 4 blocks per SM (never split by the count), mostly short with a
    # few long sequences: skewed, so the long ones are cut and merged. Right, absent, and wrong sums
    # (said to be equal; said to be far shorter, which cuts every context into 256-token partitions).
    big = 4 * sms // 8 + 8
    seq_lens = torch.randint(1, 200, (big,), generator=g).tolist()
    seq_lens[3] = seq_lens[big // 2] = 1024
    seq_lens[-1] = 1000
    for hint in (-1, sum(seq_lens), big * 1024, big):
        out, ref = run_decode(seq_lens, 32, 8, 64, 16, torch.bfloat16, seed=big, table_width=64, sum_seq_lens=hint)
        assert_close(out, ref, torch.bfloat16, f"decode ragged batch={big} sum_seq_lens={hint}")
    # A small skewed batch: one 8192-token sequence among 1024s, cut into short pieces
    # (32 of 256 tokens on a 132-SM GPU) where the plan without the sum runs 8 splits.
    seq_lens = [1024] * 8
    seq_lens[3] = 8192
    for hint in (-1, sum(seq_lens)):
        out, ref = run_decode(seq_lens, 32, 8, 64, 16, torch.bfloat16, seed=8, sum_seq_lens=hint)
        assert_close(out, ref, torch.bfloat16, f"decode skewed batch=8 sum_seq_lens={hint}")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 32, 128])
def test_decode_block_sizes(block_size, head_dim):
    seq_lens = [1, block_size - 1, block_size, block_size + 1, 300]
    out, ref = run_decode(seq_lens, 8, 4, head_dim, block_size, torch.bfloat16, seed=block_size)
    assert_close(out, ref, torch.bfloat16, f"decode block_size={block_size} d={head_dim}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("group", [12, 16, 32])
def test_decode_large_groups_use_more_rows_and_head_chunks(group, dtype):
    # Groups above 8 query heads per kv head: the tensor-core kernel fills mma rows 8-15
    # (12, 16) or takes two blocks per kv head (32); the CUDA-core kernel (fp32) takes
    # 2 or 4 blocks of 8 heads.
    out, ref = run_decode([1, 33, 700], group, 1, 64, 16, dtype, seed=group)
    assert_close(out, ref, dtype, f"decode group={group}")


@pytest.mark.sanitize
def test_decode_strided_query_and_wide_table():
    # query is a view into a wider fused-qkv row; the block table is much wider than
    # needed (its capacity, not the real lengths, sizes the grid and the splits).
    out, ref = run_decode([5, 40, 129], 12, 4, 64, 16, torch.bfloat16, seed=5, table_width=300,
                          query_row_pad=2 * 4 * 64)
    assert_close(out, ref, torch.bfloat16, "decode strided query")


@pytest.mark.sanitize
def test_decode_zero_length_sequence_gives_zeros():
    # A padded batch slot (seq_len 0) must not fault; its output is defined as zeros
    # (what the reference's empty softmax-weighted sum gives).
    out, ref = run_decode([0, 20], 8, 2, 64, 16, torch.bfloat16, seed=9)
    assert torch.equal(out[0].float(), torch.zeros_like(out[0].float()))
    assert_close(out[1:], ref[1:], torch.bfloat16, "decode next to a zero-length sequence")


# ------------------------------------------------------------------------------ opcheck
def test_opcheck_decode():
    kc, vc, tables, lens = make_paged_kv([5, 37], 2, 64, 16, torch.bfloat16, 0)
    kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)
    query = torch.randn((2, 4, 64), device="cuda").to(torch.bfloat16)
    out = torch.empty_like(query)
    for impl in (-1, 1, 3):
        torch.library.opcheck(torch.ops.tinyvllm.paged_attention_decode.default,
                              (out, query, kc, vc, tables, lens, 0.125, impl))



# ------------------------------------------------------------------------------ bad input
def _decode_args(**over):
    kc, vc, tables, lens = make_paged_kv([5, 37], 2, 64, 16, torch.bfloat16, 0)
    args = dict(
        out=torch.empty((2, 4, 64), dtype=torch.bfloat16, device="cuda"),
        query=torch.randn((2, 4, 64), device="cuda").to(torch.bfloat16),
        key_cache=kc,
        value_cache=vc,
        block_tables=tables,
        seq_lens=lens,
        scale=0.125,
    )
    args.update(over)
    return args


def _call_decode(a):
    torch.ops.tinyvllm.paged_attention_decode(
        a["out"], a["query"], a["key_cache"], a["value_cache"], a["block_tables"], a["seq_lens"], a["scale"]
    )


@pytest.mark.parametrize(
    "name,make,match",
    [
        ("query dtype", lambda a: {"query": a["query"].half(), "out": a["out"].half()}, "key_cache"),
        ("int64 tables", lambda a: {"block_tables": a["block_tables"].long()}, "block_tables"),
        ("int64 seq_lens", lambda a: {"seq_lens": a["seq_lens"].long()}, "seq_lens"),
        ("head_dim 96", lambda a: {"query": torch.randn((2, 4, 96), device="cuda").to(torch.bfloat16),
                                   "out": torch.empty((2, 4, 96), dtype=torch.bfloat16, device="cuda")}, "head_dim"),
        ("out shape", lambda a: {"out": torch.empty((2, 4, 32), dtype=torch.bfloat16, device="cuda")}, "out"),
        ("gqa divisibility", lambda a: {"query": torch.randn((2, 3, 64), device="cuda").to(torch.bfloat16),
                                        "out": torch.empty((2, 3, 64), dtype=torch.bfloat16, device="cuda")},
         "num_kv_heads"),
        ("block size 12", lambda a: {"key_cache": a["key_cache"][:, :, :12], "value_cache": a["value_cache"][:, :, :12]},
         "block_size"),
        ("value shape", lambda a: {"value_cache": a["value_cache"][:-1]}, "value_cache"),
        ("cpu query", lambda a: {"query": a["query"].cpu()}, "query"),
        ("seq_lens length", lambda a: {"seq_lens": a["seq_lens"][:1]}, "seq_lens|block_tables"),
        ("int8 dtype", lambda a: {"query": a["query"].to(torch.int8)}, "query"),
    ],
)


def test_decode_bad_inputs(name, make, match):
    base = _decode_args()
    args = dict(base)
    args.update(make(base))
    with pytest.raises(RuntimeError, match=match):
        _call_decode(args)


# ------------------------------------------------------------------------------ bad indices in device data
# A block table or cu_seqlens_q lives on the GPU: the op cannot check its values without
# waiting for the GPU. The kernels check each index before they follow it, never follow a
# bad one, and raise a flag that tinyvllm.ops.check_kernel_errors() turns into an error.
# Under compute-sanitizer memcheck (-m sanitize) these also show that nothing outside the
# cache or the query is touched.
CUDA_CORES_AND_TENSOR_CORES = [pytest.param(0, id="cuda-cores")] + TENSOR_CORE_IMPLS


@pytest.mark.sanitize
@pytest.mark.parametrize("impl", CUDA_CORES_AND_TENSOR_CORES)
@pytest.mark.parametrize("bad", [-3, 1 << 30], ids=["negative", "past_the_cache"])
def test_decode_block_table_entry_outside_the_cache_is_reported_not_followed(impl, bad):
    dtype = torch.float32 if impl == 0 else torch.bfloat16  # the CUDA-core kernel runs float32 caches
    check_kernel_errors()  # start from clear flags
    kc, vc, tables, lens = make_paged_kv([40, 37], 2, 64, 16, dtype, seed=3, table_width=6)
    tables[0, 3:] = -1  # padding past sequence 0's 3 blocks: never followed, so never reported
    q = torch.randn((2, 8, 64), device="cuda").to(dtype)
    out = torch.full_like(q, float("nan"))
    op = torch.ops.tinyvllm.paged_attention_decode
    op(out, q, kc, vc, tables, lens, 0.125, impl)
    check_kernel_errors()  # -1 padding alone: no error
    ref = torch.empty((2, 8, 64), dtype=torch.float32, device="cuda")
    reference.paged_attention_decode(ref[:1], q[:1].float(), kc.float(), vc.float(), tables[:1], lens[:1], 0.125)
    assert_close(out[:1], ref[:1], dtype, "decode next to padding entries of -1")

    tables[1, 1] = bad  # tokens 16-31 of sequence 1
    op(out, q, kc, vc, tables, lens, 0.125, impl)
    with pytest.raises(KernelInputError, match="block_tables"):
        check_kernel_errors()
    assert_close(out[:1], ref[:1], dtype, "decode next to a sequence with a bad entry")
    check_kernel_errors()  # the flags were cleared
    with pytest.raises(ValueError, match="block_tables"):  # the reference says the same at once
        reference.paged_attention_decode(ref, q.float(), kc.float(), vc.float(), tables, lens, 0.125)


@pytest.mark.sanitize
@pytest.mark.parametrize("impl", CUDA_CORES_AND_TENSOR_CORES)
def test_decode_seq_len_outside_the_block_table_is_clamped_and_reported(impl):
    dtype = torch.float32 if impl == 0 else torch.bfloat16  # the CUDA-core kernel runs float32 caches
    check_kernel_errors()
    kc, vc, tables, lens = make_paged_kv([40, 96], 2, 64, 16, dtype, seed=5, table_width=6)  # capacity 96
    q = torch.randn((2, 8, 64), device="cuda").to(dtype)
    ref = torch.empty((2, 8, 64), dtype=torch.float32, device="cuda")
    reference.paged_attention_decode(ref, q.float(), kc.float(), vc.float(), tables, lens, 0.125)
    op = torch.ops.tinyvllm.paged_attention_decode
    for bad, expect in ((97, ref[1]), (1 << 30, ref[1]), (-5, torch.zeros_like(ref[1]))):
        bad_lens = lens.clone()
        bad_lens[1] = bad
        out = torch.full_like(q, float("nan"))
        op(out, q, kc, vc, tables, bad_lens, 0.125, impl)
        with pytest.raises(KernelInputError, match="seq_lens: an entry below 0"):
            check_kernel_errors()
            pytest.fail(f"not reported: seq_len {bad}")
        assert_close(out[:1], ref[:1], dtype, f"decode next to a seq_len of {bad}")
        assert_close(out[1:], expect[None], dtype, f"a seq_len of {bad}, clamped into [0, 96]")
        with pytest.raises(ValueError, match="seq_lens: an entry below 0"):  # the reference says the same at once
            reference.paged_attention_decode(ref.clone(), q.float(), kc.float(), vc.float(), tables, bad_lens, 0.125)
    op(out, q, kc, vc, tables, lens, 0.125, impl)
    check_kernel_errors()  # cleared, and the right lengths raise nothing
