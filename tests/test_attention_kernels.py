"""Attention kernels (csrc/attention/) against the float32 torch reference.

Every test builds a paged KV cache whose blocks are shuffled (a sequence's blocks are
not contiguous nor in order), fills EVERYTHING that no sequence owns with NaN (unused
blocks, the tail of each sequence's last block, and the padding entries of the block
tables point at a NaN block), and poisons `out` with NaN before the launch. So a kernel
that reads one key past a sequence's end, follows a padding entry of the block table,
or leaves an output element unwritten, fails loudly instead of passing by luck.

GPU tests skip without a GPU or without the built extension (`pip install -e .`).
Run:  pytest tests/test_attention_kernels.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from tinyvllm.ops import KernelInputError, check_kernel_errors, decode_plan, reference
from tinyvllm.ops._kernels import has_kernel

HAS_GPU = torch.cuda.is_available()
needs_kernels = pytest.mark.skipif(
    not (HAS_GPU and has_kernel("paged_attention_decode") and has_kernel("prefill_attention")),
    reason="needs a CUDA GPU and the built tinyvllm._C extension with the attention kernels",
)
pytestmark = needs_kernels

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Tolerances against the float32 reference: the kernel's output is rounded once to the
# storage dtype (bf16: 8 bits of mantissa, relative step 2^-8 = 0.4%), and prefill also
# rounds the softmax weights P to 16 bits before P @ V on the tensor cores.
TOL = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3), torch.float32: (2e-4, 2e-4)}


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    return g


def make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, seed, extra_blocks=3, table_width=None):
    """Random k/v for each sequence in a NaN-filled paged cache with shuffled blocks.

    Returns key_cache, value_cache, block_tables [S, width] int32 (padding entries point
    at a block full of NaN), seq_lens [S] int32.
    """
    g = _gen(seed)
    need = [max(1, math.ceil(n / block_size)) if n > 0 else 0 for n in seq_lens]
    width = max([1] + need) if table_width is None else table_width
    used = sum(need)
    num_blocks = used + extra_blocks + 1
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    value_cache = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    poison_block = num_blocks - 1  # never handed out: stays NaN
    blocks = torch.randperm(num_blocks - 1, generator=g, device="cuda")[:used]  # in table order
    # Built in a few launches, not one per block (the sanitizers instrument every launch).
    counts = torch.tensor(need, device="cuda")
    seq_of = torch.repeat_interleave(torch.arange(len(seq_lens), device="cuda"), counts)
    first = counts.cumsum(0) - counts  # each row's first block among the used ones
    col = torch.arange(used, device="cuda") - first[seq_of]  # each block's index in its table row
    tables = torch.full((len(seq_lens), width), poison_block, dtype=torch.int32, device="cuda")
    tables[seq_of, col] = blocks.to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    token = col.unsqueeze(1) * block_size + torch.arange(block_size, device="cuda")  # [used, block_size]
    past_end = (token >= lens[seq_of].unsqueeze(1)).view(used, 1, block_size, 1)  # rows of no token: NaN
    for cache in (key_cache, value_cache):
        data = torch.randn((used, num_kv_heads, block_size, head_dim), generator=g, device="cuda").to(dtype)
        cache[blocks] = data.masked_fill(past_end, float("nan"))
    return key_cache, value_cache, tables, lens


def _assert_close(out, ref, dtype, what):
    assert not torch.isnan(out).any(), f"{what}: output has NaN (unwritten element or a read past the end)"
    atol, rtol = TOL[dtype]
    err = (out.float() - ref.float()).abs()
    bad = err > atol + rtol * ref.float().abs()
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off; first at index {idx} "
            f"(token, head, dim): got {out[tuple(idx)].item():.5f}, want {ref[tuple(idx)].item():.5f}; "
            f"max abs err {err.max().item():.4g}"
        )


# ------------------------------------------------------------------------------ decode
def run_decode(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, table_width=None,
               query_row_pad=0, impl=-1, sum_seq_lens=-1):
    kc, vc, tables, lens = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, seed,
                                         table_width=table_width)
    b = len(seq_lens)
    g = _gen(seed + 1)
    # q scaled up a little so that the softmax is peaked (exercises the running max)
    q_full = (2 * torch.randn((b, num_heads * head_dim + query_row_pad), generator=g, device="cuda")).to(dtype)
    query = q_full[:, : num_heads * head_dim].view(b, num_heads, head_dim)  # row-strided when padded
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.full((b, num_heads, head_dim), float("nan"), dtype=dtype, device="cuda")
    torch.ops.tinyvllm.paged_attention_decode(out, query, kc, vc, tables, lens, scale, impl, sum_seq_lens)
    ref = torch.empty((b, num_heads, head_dim), dtype=torch.float32, device="cuda")
    reference.paged_attention_decode(ref, query.float(), kc.float(), vc.float(), tables, lens, scale)
    torch.cuda.synchronize()
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_decode_dtypes_heads_gqa(dtype, head_dim, group):
    num_kv_heads = 2
    seq_lens = [1, 15, 16, 17, 100]
    out, ref = run_decode(seq_lens, num_kv_heads * group, num_kv_heads, head_dim, 16, dtype, seed=group)
    _assert_close(out, ref, dtype, f"decode {dtype} d={head_dim} group={group} lens={seq_lens}")


@pytest.mark.sanitize
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_decode_long_contexts_split(dtype, head_dim):
    # Few sequences, long contexts: many flash-decoding splits and the merge kernel.
    seq_lens = [1000, 4097, 1, 17]
    out, ref = run_decode(seq_lens, 32, 8, head_dim, 16, dtype, seed=7)
    _assert_close(out, ref, dtype, f"decode long {seq_lens}")


def test_decode_single_sequence_single_kv_head():
    # batch 1 and one kv head: the most splits the planner makes (small base).
    out, ref = run_decode([4097], 8, 1, 128, 16, torch.bfloat16, seed=11)
    _assert_close(out, ref, torch.bfloat16, "decode 1x4097 kv_heads=1")


@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_decode_batches_llama_1b_shape(batch):
    g = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, 600, (batch,), generator=g).tolist()
    seq_lens[0] = 1000 if batch <= 8 else seq_lens[0]
    out, ref = run_decode(seq_lens, 32, 8, 64, 16, torch.bfloat16, seed=batch)
    _assert_close(out, ref, torch.bfloat16, f"decode batch={batch}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 16])
def test_decode_cuda_core_kernel_on_16_bit_caches(dtype, head_dim, group):
    # impl=0 forces the CUDA-core kernel, which bf16/fp16 caches fall back to on GPUs
    # without the tensor-core kernel's shared memory; lengths up to 4097 split and merge.
    seq_lens = [1, 15, 17, 100, 1000, 4097]
    out, ref = run_decode(seq_lens, 2 * group, 2, head_dim, 16, dtype, seed=group, impl=0)
    _assert_close(out, ref, dtype, f"decode CUDA cores {dtype} d={head_dim} group={group}")


def test_decode_both_kernels_agree():
    # The same inputs through impl 0 and impl 1 (bf16): two independent roads, one answer.
    a, ref = run_decode([3, 333, 2000], 32, 8, 64, 16, torch.bfloat16, seed=21, impl=0)
    b, _ = run_decode([3, 333, 2000], 32, 8, 64, 16, torch.bfloat16, seed=21, impl=1)
    _assert_close(a, ref, torch.bfloat16, "impl 0")
    _assert_close(b, ref, torch.bfloat16, "impl 1")
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_decode_impl_choice_errors_name_the_problem():
    a = _decode_args()
    with pytest.raises(RuntimeError, match="impl must be -1"):
        torch.ops.tinyvllm.paged_attention_decode(a["out"], a["query"], a["key_cache"], a["value_cache"],
                                                  a["block_tables"], a["seq_lens"], a["scale"], 4)
    capacity = a["block_tables"].shape[1] * a["key_cache"].shape[2]  # tokens the table can hold per sequence
    with pytest.raises(RuntimeError, match=rf"sum_seq_lens must be .* 2 x {capacity} = {2 * capacity} .* got"):
        torch.ops.tinyvllm.paged_attention_decode(a["out"], a["query"], a["key_cache"], a["value_cache"],
                                                  a["block_tables"], a["seq_lens"], a["scale"], -1, 2 * capacity + 1)
    f = _decode_args()
    f32 = {k: f[k].float() for k in ("out", "query", "key_cache", "value_cache")}
    for impl in (1, 2, 3):
        with pytest.raises(RuntimeError, match=rf"impl={impl} \(tensor cores\) needs a bfloat16 or float16 cache"):
            torch.ops.tinyvllm.paged_attention_decode(f32["out"], f32["query"], f32["key_cache"],
                                                      f32["value_cache"], f["block_tables"], f["seq_lens"],
                                                      f["scale"], impl)
    if torch.cuda.get_device_capability()[0] < 9:
        with pytest.raises(RuntimeError, match=r"impl=2 \(TMA\) needs an sm_90\+ GPU"):
            torch.ops.tinyvllm.paged_attention_decode(a["out"], a["query"], a["key_cache"], a["value_cache"],
                                                      a["block_tables"], a["seq_lens"], a["scale"], 2)


# The tensor-core kernel's two ways of loading tiles: 1 = cp.async (16-byte copies by
# every lane, padded rows), 2 = TMA (the copy engine, one box per cache block, swizzled
# rows, mbarriers; sm_90+); and 3, cp.async with one kv head per warp (a block = 4 kv
# heads of a sequence; with 2 kv heads, as most tests below have, 2 of its warps have no
# head and leave at once). The NaN-poisoned cache tail checks that rows past a
# sequence's end never reach the output (the TMA kernel fetches whole rows of a block
# and must zero the V rows past the end).
TENSOR_CORE_IMPLS = [pytest.param(1, id="cp.async"), pytest.param(2, id="tma"), pytest.param(3, id="head_per_warp")]


def _skip_unless_runs(impl):
    if impl == 2 and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA (impl=2) needs an sm_90+ GPU")


@pytest.mark.parametrize("impl", TENSOR_CORE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32, 128])
def test_decode_tensor_core_loaders_block_sizes_and_lengths(impl, dtype, head_dim, block_size):
    _skip_unless_runs(impl)
    seq_lens = [1, 7, 8, 9, 15, 16, 17, block_size + 1, 100, 1000, 4097]
    out, ref = run_decode(seq_lens, 8, 2, head_dim, block_size, dtype, seed=block_size + head_dim, impl=impl)
    _assert_close(out, ref, dtype, f"decode impl={impl} {dtype} d={head_dim} block_size={block_size}")


@pytest.mark.parametrize("impl", TENSOR_CORE_IMPLS)
@pytest.mark.parametrize("group", [1, 12, 32])
def test_decode_tensor_core_loaders_groups(impl, group):
    _skip_unless_runs(impl)
    if impl == 3 and group > 16:  # a warp holds at most 16 query heads (one mma row block)
        with pytest.raises(RuntimeError, match=r"impl=3 \(one kv head per warp\) needs at most 16 query heads "
                                               r"per kv head, got 32"):
            run_decode([1, 33], group * 2, 2, 128, 16, torch.bfloat16, impl=impl)
        return
    out, ref = run_decode([1, 33, 700, 2100], group * 2, 2, 128, 16, torch.bfloat16, seed=group, impl=impl)
    _assert_close(out, ref, torch.bfloat16, f"decode impl={impl} group={group}")


@pytest.mark.sanitize
@pytest.mark.parametrize("impl", TENSOR_CORE_IMPLS)
def test_decode_tensor_core_loaders_split_and_unsplit(impl):
    # Batch 2 splits the 3000-token sequence; 64 sequences fill the GPU unsplit, and
    # sequence 5 (2100 tokens) then walks past 32 tiles of block-table entries per warp.
    _skip_unless_runs(impl)
    out, ref = run_decode([3000, 17], 32, 8, 64, 16, torch.bfloat16, seed=31, impl=impl)
    _assert_close(out, ref, torch.bfloat16, f"decode split impl={impl}")
    g = torch.Generator().manual_seed(impl)
    seq_lens = torch.randint(1, 200, (64,), generator=g).tolist()
    seq_lens[5] = 2100
    out, ref = run_decode(seq_lens, 32, 8, 64, 8, torch.bfloat16, seed=32, impl=impl)
    _assert_close(out, ref, torch.bfloat16, f"decode unsplit impl={impl}")


def test_decode_cp_async_and_tma_agree():
    _skip_unless_runs(2)
    a, ref = run_decode([5, 500, 3000], 32, 8, 64, 16, torch.bfloat16, seed=41, impl=1)
    b, _ = run_decode([5, 500, 3000], 32, 8, 64, 16, torch.bfloat16, seed=41, impl=2)
    _assert_close(b, ref, torch.bfloat16, "impl 2")
    # Same tiles, same order of operations: only the copies differ, so the bits agree.
    assert torch.equal(a, b)


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
    _assert_close(out, ref, torch.bfloat16, f"decode unsplit long d={head_dim}")


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
        _assert_close(out, ref, torch.bfloat16, f"decode batch={batch} group={group} d={head_dim}")


@pytest.mark.sanitize
def test_decode_wide_blocks_under_the_sanitizer():
    # Llama-1B heads on an H100/H200: batch 8 x 512 runs 16-warp blocks, 32 x 1024 8-warp blocks.
    for batch, width in ((8, 32), (32, 64)):
        g = torch.Generator().manual_seed(batch)
        seq_lens = torch.randint(1, width * 16 + 1, (batch,), generator=g).tolist()
        out, ref = run_decode(seq_lens, 32, 8, 64, 16, torch.bfloat16, seed=batch, table_width=width)
        _assert_close(out, ref, torch.bfloat16, f"decode wide blocks batch={batch}")


def _llama_plan(batch: int, tokens: int, head_dim: int = 64, sum_seq_lens: int | None = None) -> dict[str, int]:
    """The decode plan at Llama 3.2 1B's heads (32 query, 8 kv), bf16."""
    q = torch.empty(batch, 32, head_dim, device="cuda", dtype=torch.bfloat16)
    return decode_plan(q, 8, tokens, sum_seq_lens=sum_seq_lens)


def _wave_units(blocks: int, per_sm: int, sms: int) -> int:
    # The plan's model (paged_attention.cu, "Blocks per SM"): one wave spreads over every
    # SM; past it, each partial wave costs per_sm units on the SMs that took it.
    slots = per_sm * sms
    if blocks <= slots:
        return -(-blocks // sms)
    return blocks // slots * per_sm + (per_sm if blocks % slots else 0)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_plan_holds_blocks_per_sm_down_where_that_saves_a_wave(head_dim):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    fit = _llama_plan(4 * sms, 1024, head_dim)["blocks_per_sm"]  # past two waves: what fits
    assert _llama_plan(sms // 8 * fit, 1024, head_dim)["blocks_per_sm"] == fit  # one wave
    held = 0
    for batch in range(fit * sms // 8 + 1, 2 * fit * sms // 8):  # 8 kv heads: 8 blocks per sequence
        plan = _llama_plan(batch, 1024, head_dim)
        assert plan["num_splits"] == 1 and plan["warps"] == 4, plan
        blocks = 8 * batch
        expected = fit
        for r in range(fit - 1, max(2, fit - 2) - 1, -1):
            if fit > 2 and _wave_units(blocks, r, sms) < _wave_units(blocks, expected, sms):
                expected = r
        assert plan["blocks_per_sm"] == expected, (batch, plan)
        # 512-1023 tokens: only if the model promises at least a fifth less time
        short = _llama_plan(batch, 512, head_dim)["blocks_per_sm"]
        promised = 5 * _wave_units(blocks, expected, sms) <= 4 * _wave_units(blocks, fit, sms)
        assert short == (expected if promised else fit), (batch, short)
        if expected < fit:
            held += 1
            # held down by asking for more shared memory than the kernel uses
            assert plan["smem_bytes"] > _llama_plan(4 * sms, 1024, head_dim)["smem_bytes"], plan
        # short contexts keep every block that fits: their blocks are mostly start-up
        assert _llama_plan(batch, 256, head_dim)["blocks_per_sm"] == fit
    if sms == 132 and head_dim == 64:  # H100 / H200 SXM: the shapes measured for the rule
        assert fit == 5 and held > 0
        assert [_llama_plan(b, 1024)["blocks_per_sm"] for b in (64, 96, 128, 256)] == [5, 3, 4, 5]
        assert _llama_plan(96, 1024)["smem_bytes"] == 76800


@pytest.mark.sanitize
def test_decode_with_blocks_per_sm_held_down_matches_reference():
    # The first batch (Llama heads, 512-token table) whose plan holds the blocks per SM
    # down, with ragged lengths: the padded launch computes what the normal one does.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    fit = _llama_plan(4 * sms, 512)["blocks_per_sm"]
    batch = next((b for b in range(fit * sms // 8, 2 * fit * sms // 8 + 1)
                  if _llama_plan(b, 512)["blocks_per_sm"] < fit), None)
    if batch is None:
        pytest.skip(f"no batch holds the blocks per SM down on this GPU ({fit} fit)")
    g = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, 513, (batch,), generator=g).tolist()
    seq_lens[0] = 512
    out, ref = run_decode(seq_lens, 32, 8, 64, 16, torch.bfloat16, seed=batch, table_width=32)
    _assert_close(out, ref, torch.bfloat16, f"decode batch={batch} with fewer blocks per SM")


def _head_per_warp_pays(batch: int, sms: int, fit: int, kv_heads: int = 8) -> bool:
    # The plan's rule (paged_attention.cu, "One kv head per warp"): n blocks of 4 kv heads in
    # one wave of at least 2.75 per SM, the SMs that get the most blocks at least 3/4 of all.
    n = batch * -(-kv_heads // 4)
    most = -(-n // sms)
    return 4 * n >= 11 * sms and most <= fit and 4 * (n - (most - 1) * sms) >= 3 * sms


def test_decode_plan_gives_each_warp_a_kv_head_at_one_full_wave_of_equal_lengths():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    q = torch.empty(4 * sms, 32, 64, device="cuda", dtype=torch.bfloat16)
    fit = decode_plan(q, 8, 1024, impl=3)["blocks_per_sm"]
    chosen = []
    for batch in range(sms, fit * sms // 2 + 3):  # 8 kv heads: 2 blocks per sequence
        for tokens in (128, 2048):
            plan = _llama_plan(batch, tokens, sum_seq_lens=batch * tokens)
            assert plan["head_per_warp"] == _head_per_warp_pays(batch, sms, fit), (batch, tokens, plan)
        if plan["head_per_warp"]:
            chosen.append(batch)
            assert plan["num_splits"] == 1 and plan["warps"] == 4 and plan["partition_size"] >= 2048, plan
        # Past 2048 tokens the fixed cost it saves no longer pays for its slower stream.
        assert not _llama_plan(batch, 2049, sum_seq_lens=batch * 2049)["head_per_warp"]
    assert chosen, "no batch of Llama heads gives each warp a kv head on this GPU"
    for batch in chosen[:: max(1, len(chosen) // 4)]:
        # Only with the word that the lengths are about equal, only automatically, only at
        # head_dim 64 (where it was measured).
        assert not _llama_plan(batch, 1024)["head_per_warp"]
        assert not _llama_plan(batch, 1024, sum_seq_lens=batch * 1024 * 3 // 4)["head_per_warp"]
        assert not _llama_plan(batch, 1024, head_dim=128, sum_seq_lens=batch * 1024)["head_per_warp"]
        q1 = torch.empty(batch, 32, 64, device="cuda", dtype=torch.bfloat16)
        assert not decode_plan(q1, 8, 1024, impl=1, sum_seq_lens=batch * 1024)["head_per_warp"]
    # impl 3 forces it anywhere, and splits only where fewer than 2 blocks per SM would be left.
    few = decode_plan(torch.empty(8, 32, 64, device="cuda", dtype=torch.bfloat16), 8, 4096, impl=3)
    assert few["head_per_warp"] and few["num_splits"] > 1, few
    many = decode_plan(torch.empty(sms, 32, 64, device="cuda", dtype=torch.bfloat16), 8, 4096, impl=3)
    assert many["head_per_warp"] and many["num_splits"] == 1, many
    if sms == 132:  # H100 / H200 SXM: the measured shapes
        assert fit == 5
        assert chosen == [*range(182, 199), *range(248, 265), *range(314, 331)]


@pytest.mark.sanitize
@pytest.mark.parametrize("num_kv_heads", [8, 6])
def test_decode_one_kv_head_per_warp_matches_reference(num_kv_heads):
    # The automatic plan at the first batch it picks, lengths about equal (the sum
    # passed, as the engine does). 6 kv heads: each sequence's second block has 2 idle warps.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    q = torch.empty(4 * sms, num_kv_heads * 4, 64, device="cuda", dtype=torch.bfloat16)
    fit = decode_plan(q, num_kv_heads, 160, impl=3)["blocks_per_sm"]
    batch = next(b for b in range(sms, 4 * sms) if _head_per_warp_pays(b, sms, fit, num_kv_heads))
    g = torch.Generator().manual_seed(num_kv_heads)
    seq_lens = torch.randint(130, 161, (batch,), generator=g).tolist()
    seq_lens[0] = 160
    width = 160 // 16
    qb = torch.empty(batch, num_kv_heads * 4, 64, device="cuda", dtype=torch.bfloat16)
    assert decode_plan(qb, num_kv_heads, width * 16, sum_seq_lens=sum(seq_lens))["head_per_warp"]
    out, ref = run_decode(seq_lens, num_kv_heads * 4, num_kv_heads, 64, 16, torch.bfloat16, seed=batch,
                          table_width=width, sum_seq_lens=sum(seq_lens))
    _assert_close(out, ref, torch.bfloat16, f"decode one kv head per warp, batch={batch}")


def _graph_case(case: str, sms: int) -> tuple[int, int, bool]:
    """(batch, the table's capacity in tokens, pass the sum?) for a decode plan of each kind."""
    if case == "split":  # 2 long sequences: context splits and the merge kernel (launched with PDL)
        return 2, 4096, False
    if case == "unsplit":  # a one-wave batch of equal lengths: no split
        return 64, 512, True
    q = torch.empty(4 * sms, 32, 64, device="cuda", dtype=torch.bfloat16)
    fit = decode_plan(q, 8, 160, impl=3)["blocks_per_sm"]
    return next(b for b in range(sms, 4 * sms) if _head_per_warp_pays(b, sms, fit)), 160, True


@pytest.mark.parametrize("case", ["split", "unsplit", "head_per_warp"])
def test_decode_step_replays_in_a_cuda_graph_with_new_inputs(case):
    # The decode step that CUDA graphs will capture: write the new token's k/v into the
    # cache, then attend. Captured once on static buffers, replayed with new contents in
    # them (new tokens, lengths, block tables), each replay against the reference. The
    # launchers must size their grids from host values only and allocate through torch.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch, capacity, with_sum = _graph_case(case, sms)
    hq, hk, d, bs = 32, 8, 64, 16
    width = capacity // bs
    num_blocks = batch * width + 1
    dt = torch.bfloat16
    g = _gen(len(case))
    kc = torch.empty(num_blocks, hk, bs, d, device="cuda", dtype=dt)
    vc = torch.empty_like(kc)
    q = torch.empty(batch, hq, d, device="cuda", dtype=dt)
    k_new = torch.empty(batch, hk, d, device="cuda", dtype=dt)
    v_new = torch.empty_like(k_new)
    tables = torch.empty(batch, width, device="cuda", dtype=torch.int32)
    lens = torch.empty(batch, device="cuda", dtype=torch.int32)
    slots = torch.empty(batch, device="cuda", dtype=torch.int64)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d)
    full = batch * capacity  # the sum the engine would pass for a batch of full tables

    def fill(step: int) -> None:  # new contents in the same buffers
        lo = capacity if step == 0 else 1  # the first fill: every table full; later: any lengths
        n = torch.randint(lo, capacity + 1, (batch,), generator=g, device="cuda", dtype=torch.int32)
        lens.copy_(n)
        tables.copy_(torch.randperm(num_blocks - 1, generator=g, device="cuda")[: batch * width]
                     .view(batch, width).to(torch.int32))
        pos = n.long() - 1  # the new token's position
        slots.copy_(tables.gather(1, (pos // bs).unsqueeze(1)).squeeze(1).long() * bs + pos % bs)
        for x in (kc, vc, q, k_new, v_new):
            x.copy_(torch.randn(x.shape, generator=g, device="cuda", dtype=torch.float32))

    def step() -> None:
        torch.ops.tinyvllm.reshape_and_cache(k_new, v_new, kc, vc, slots)
        torch.ops.tinyvllm.paged_attention_decode(out, q, kc, vc, tables, lens, scale, -1, full if with_sum else -1)

    def expected() -> torch.Tensor:
        kr, vr = kc.float(), vc.float()
        reference.reshape_and_cache(k_new.float(), v_new.float(), kr, vr, slots)
        ref = torch.empty(q.shape, device="cuda", dtype=torch.float32)
        reference.paged_attention_decode(ref, q.float(), kr, vr, tables, lens, scale)
        return ref

    qp = torch.empty(batch, hq, d, device="cuda", dtype=dt)
    plan = decode_plan(qp, hk, capacity, sum_seq_lens=full if with_sum else None)
    want = {"split": plan["num_splits"] > 1, "unsplit": plan["num_splits"] == 1 and not plan["head_per_warp"],
            "head_per_warp": bool(plan["head_per_warp"])}[case]
    assert want, (case, batch, capacity, plan)

    fill(0)
    side = torch.cuda.Stream()  # warm up off the capture stream, as torch asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for i in range(3):
        fill(i)
        ref = expected()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(out, ref, dt, f"decode replayed in a CUDA graph ({case}, batch {batch}, replay {i})")
    check_kernel_errors()


def test_decode_plan_checks_its_arguments():
    q = torch.empty(4, 32, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        decode_plan(q, 5, 1024)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        decode_plan(torch.empty(4, 32, 80, device="cuda", dtype=torch.bfloat16), 8, 1024)
    with pytest.raises(RuntimeError, match="impl must be"):
        decode_plan(q, 8, 1024, impl=4)
    for impossible in (-2, 4 * 1024 + 1):  # 4 sequences of at most 1024 tokens
        with pytest.raises(RuntimeError, match="sum_seq_lens must be -1 .* between 0 and num_seqs x max_seq_len"):
            decode_plan(q, 8, 1024, sum_seq_lens=impossible)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_plan_does_not_split_equal_lengths_with_two_blocks_per_sm(head_dim):
    # From 2 (head_dim 64) or 2.5 (128) 4-warp blocks per SM on, a batch of about equal
    # lengths (mean >= 4/5 of the table's capacity, known from sum_seq_lens) runs one block
    # per (sequence, kv head). Without the sum, or with one long sequence among short ones,
    # the plan cannot rule out a long sequence whose blocks would run alone at the end,
    # and keeps what it had.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tokens, changed = 4096, 0
    first = -(-(4 if head_dim == 64 else 5) * sms // 16)  # 8 kv heads: 8 blocks per sequence
    for batch in range(first, 4 * sms // 8 + 1):
        blind = _llama_plan(batch, tokens, head_dim)
        equal = _llama_plan(batch, tokens, head_dim, sum_seq_lens=batch * tokens)
        assert equal["num_splits"] == 1 and equal["warps"] == 4, (batch, equal)
        edge = -(-4 * batch * tokens // 5)  # the smallest sum whose mean is 4/5 of the capacity
        assert _llama_plan(batch, tokens, head_dim, sum_seq_lens=edge) == equal
        assert _llama_plan(batch, tokens, head_dim, sum_seq_lens=edge - 1) == blind
        # One long sequence among short ones (mean under a third of the longest): the
        # skewed rule cuts it into 4-warp pieces of at most twice the mean (no wide blocks).
        skewed = _llama_plan(batch, tokens, head_dim, sum_seq_lens=tokens + (batch - 1) * 1024)
        assert skewed["num_splits"] >= 2 and skewed["warps"] == 4 and skewed["partition_size"] <= 2304, skewed
        changed += equal != blind
    # Below that the sum changes nothing (wide blocks or splits stay).
    few = first - 1
    assert _llama_plan(few, tokens, head_dim, sum_seq_lens=few * tokens) == _llama_plan(few, tokens, head_dim)
    if sms == 132:  # H100 / H200 SXM: the measured shapes (batch 34-59) were split before
        assert changed > 0 and first == (33 if head_dim == 64 else 42)
        assert _llama_plan(44, 1024, head_dim)["num_splits"] == 2
        assert _llama_plan(44, 1024, head_dim, sum_seq_lens=44 * 1024)["num_splits"] == 1


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_plan_cuts_the_long_sequences_of_a_skewed_batch(head_dim):
    # The mean (sum_seq_lens / batch) under a third of the longest: every context is cut
    # into pieces of at most twice the mean (rounded up to 256 tokens), smaller where the
    # batch's total work spread over the blocks the GPU wants asks for it; never below 128.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch in (8, 16, 32, 48, 4 * sms // 8 + 8, 256):
        blind = _llama_plan(batch, 8192, head_dim)
        one_long = 8192 + (batch - 1) * 1024  # one sequence of 8192 tokens among 1024s
        plan = _llama_plan(batch, 8192, head_dim, sum_seq_lens=one_long)
        mean = -(-one_long // batch)
        assert plan["warps"] == 4 and plan["num_splits"] > max(1, blind["num_splits"]), (batch, plan, blind)
        assert 128 <= plan["partition_size"] <= -(-2 * mean // 256) * 256, (batch, plan)
        assert plan["num_splits"] * plan["partition_size"] >= 8192
        # A step later every sequence is one token longer: almost always the same plan.
        later = _llama_plan(batch, 8192, head_dim, sum_seq_lens=one_long + batch)
        assert abs(later["partition_size"] - plan["partition_size"]) <= 256, (plan, later)
        # Not skewed (mean at least a third of the longest), the sum unknown, or equal
        # lengths: the sum changes no split (equal lengths may drop one, see above).
        for hint in (8192 * batch // 3 + batch, -1):
            assert _llama_plan(batch, 8192, head_dim, sum_seq_lens=hint) == blind, (batch, hint)
        assert _llama_plan(batch, 8192, head_dim, sum_seq_lens=8192 * batch)["num_splits"] <= blind["num_splits"]
    # Never below the tensor-core kernel's shortest partition.
    tiny = _llama_plan(256, 1024, head_dim, sum_seq_lens=256)  # mean 1
    assert tiny["partition_size"] >= 128 and tiny["num_splits"] > 1, tiny
    if sms == 132 and head_dim == 64:  # the measured shapes (H100 / H200 SXM): 256-token pieces at batch 8 ...
        assert [_llama_plan(b, 8192, sum_seq_lens=8192 + (b - 1) * 1024)["partition_size"] for b in (8, 16, 48, 256)] \
            == [256, 512, 1024, 2048]


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
            _assert_close(out, ref, torch.bfloat16, f"decode batch={batch} sum_seq_lens={hint}")
    # A batch with more than 4 blocks per SM (never split by the count), mostly short with a
    # few long sequences: skewed, so the long ones are cut and merged. Right, absent, and wrong sums
    # (said to be equal; said to be far shorter, which cuts every context into 256-token partitions).
    big = 4 * sms // 8 + 8
    seq_lens = torch.randint(1, 200, (big,), generator=g).tolist()
    seq_lens[3] = seq_lens[big // 2] = 1024
    seq_lens[-1] = 1000
    for hint in (-1, sum(seq_lens), big * 1024, big):
        out, ref = run_decode(seq_lens, 32, 8, 64, 16, torch.bfloat16, seed=big, table_width=64, sum_seq_lens=hint)
        _assert_close(out, ref, torch.bfloat16, f"decode ragged batch={big} sum_seq_lens={hint}")
    # A small skewed batch: one 8192-token sequence among 1024s, cut into short pieces
    # (32 of 256 tokens on a 132-SM GPU) where the plan without the sum runs 8 splits.
    seq_lens = [1024] * 8
    seq_lens[3] = 8192
    for hint in (-1, sum(seq_lens)):
        out, ref = run_decode(seq_lens, 32, 8, 64, 16, torch.bfloat16, seed=8, sum_seq_lens=hint)
        _assert_close(out, ref, torch.bfloat16, f"decode skewed batch=8 sum_seq_lens={hint}")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 32, 128])
def test_decode_block_sizes(block_size, head_dim):
    seq_lens = [1, block_size - 1, block_size, block_size + 1, 300]
    out, ref = run_decode(seq_lens, 8, 4, head_dim, block_size, torch.bfloat16, seed=block_size)
    _assert_close(out, ref, torch.bfloat16, f"decode block_size={block_size} d={head_dim}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("group", [12, 16, 32])
def test_decode_large_groups_use_more_rows_and_head_chunks(group, dtype):
    # Groups above 8 query heads per kv head: the tensor-core kernel fills mma rows 8-15
    # (12, 16) or takes two blocks per kv head (32); the CUDA-core kernel (fp32) takes
    # 2 or 4 blocks of 8 heads.
    out, ref = run_decode([1, 33, 700], group, 1, 64, 16, dtype, seed=group)
    _assert_close(out, ref, dtype, f"decode group={group}")


@pytest.mark.sanitize
def test_decode_strided_query_and_wide_table():
    # query is a view into a wider fused-qkv row; the block table is much wider than
    # needed (its capacity, not the real lengths, sizes the grid and the splits).
    out, ref = run_decode([5, 40, 129], 12, 4, 64, 16, torch.bfloat16, seed=5, table_width=300,
                          query_row_pad=2 * 4 * 64)
    _assert_close(out, ref, torch.bfloat16, "decode strided query")
@pytest.mark.sanitize
def test_decode_zero_length_sequence_gives_zeros():
    # A padded batch slot (seq_len 0) must not fault; its output is defined as zeros
    # (what the reference's empty softmax-weighted sum gives).
    out, ref = run_decode([0, 20], 8, 2, 64, 16, torch.bfloat16, seed=9)
    assert torch.equal(out[0].float(), torch.zeros_like(out[0].float()))
    _assert_close(out[1:], ref[1:], torch.bfloat16, "decode next to a zero-length sequence")


# ------------------------------------------------------------------------------ prefill
def run_prefill(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0,
                query_row_pad=0, max_seqlen_q=None, impl=-1):
    kc, vc, tables, lens = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, seed)
    t = sum(q_lens)
    g = _gen(seed + 1)
    q_full = (2 * torch.randn((t, num_heads * head_dim + query_row_pad), generator=g, device="cuda")).to(dtype)
    query = q_full[:, : num_heads * head_dim].view(t, num_heads, head_dim)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(head_dim)
    mq = max(q_lens) if max_seqlen_q is None else max_seqlen_q
    out = torch.full((t, num_heads, head_dim), float("nan"), dtype=dtype, device="cuda")
    torch.ops.tinyvllm.prefill_attention(out, query, kc, vc, tables, cu, lens, mq, scale, impl)
    ref = torch.empty((t, num_heads, head_dim), dtype=torch.float32, device="cuda")
    reference.prefill_attention(ref, query.float(), kc.float(), vc.float(), tables, cu, lens, mq, scale)
    torch.cuda.synchronize()
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_no_prefix(dtype, head_dim, group):
    q_lens = [100]
    out, ref = run_prefill(q_lens, q_lens, 2 * group, 2, head_dim, 16, dtype, seed=group)
    _assert_close(out, ref, dtype, f"prefill {dtype} d={head_dim} group={group}")


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
    _assert_close(out, ref, dtype, f"prefill multi {dtype} d={head_dim}")


@pytest.mark.sanitize
@pytest.mark.parametrize("group", [3, 8])
@pytest.mark.parametrize("block_size", [8, 32])
def test_prefill_gqa_block_sizes(group, block_size):
    q_lens = [50, 200]
    seq_lens = [50, 333]
    out, ref = run_prefill(q_lens, seq_lens, 2 * group, 2, 128, block_size, torch.bfloat16, seed=group + block_size)
    _assert_close(out, ref, torch.bfloat16, f"prefill group={group} block_size={block_size}")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_long(head_dim):
    # 1000 and 4097 new tokens: many query tiles, the diagonal at every offset.
    out, ref = run_prefill([1000], [1000], 4, 2, head_dim, 16, torch.bfloat16, seed=1)
    _assert_close(out, ref, torch.bfloat16, f"prefill 1000 d={head_dim}")
    out, ref = run_prefill([4097], [4097], 2, 1, head_dim, 16, torch.bfloat16, seed=2)
    _assert_close(out, ref, torch.bfloat16, f"prefill 4097 d={head_dim}")
@pytest.mark.sanitize
def test_prefill_strided_query_and_loose_max_seqlen():
    out, ref = run_prefill([33, 70], [40, 70], 8, 2, 64, 16, torch.float16, seed=4, query_row_pad=2 * 2 * 64,
                           max_seqlen_q=200)
    _assert_close(out, ref, torch.float16, "prefill strided query")


# ------------------------------------------------------------------------------ opcheck
def test_opcheck_decode():
    kc, vc, tables, lens = make_paged_kv([5, 37], 2, 64, 16, torch.bfloat16, 0)
    kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)
    query = torch.randn((2, 4, 64), device="cuda").to(torch.bfloat16)
    out = torch.empty_like(query)
    impls = (-1, 0, 1, 2) if torch.cuda.get_device_capability()[0] >= 9 else (-1, 0, 1)
    for impl in impls:
        torch.library.opcheck(torch.ops.tinyvllm.paged_attention_decode.default,
                              (out, query, kc, vc, tables, lens, 0.125, impl))


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
# A block table or cu_seqlens_q lives on the GPU: the op cannot check its values without
# waiting for the GPU. The kernels check each index before they follow it, never follow a
# bad one, and raise a flag that tinyvllm.ops.check_kernel_errors() turns into an error.
# Under compute-sanitizer memcheck (-m sanitize) these also show that nothing outside the
# cache or the query is touched.
@pytest.mark.sanitize
@pytest.mark.parametrize("impl", [pytest.param(0, id="cuda-cores")] + TENSOR_CORE_IMPLS)
@pytest.mark.parametrize("bad", [-3, 1 << 30], ids=["negative", "past_the_cache"])
def test_decode_block_table_entry_outside_the_cache_is_reported_not_followed(impl, bad):
    _skip_unless_runs(impl)
    check_kernel_errors()  # start from clear flags
    kc, vc, tables, lens = make_paged_kv([40, 37], 2, 64, 16, torch.bfloat16, seed=3, table_width=6)
    tables[0, 3:] = -1  # padding past sequence 0's 3 blocks: never followed, so never reported
    q = torch.randn((2, 8, 64), device="cuda").to(torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    op = torch.ops.tinyvllm.paged_attention_decode
    op(out, q, kc, vc, tables, lens, 0.125, impl)
    check_kernel_errors()  # -1 padding alone: no error
    ref = torch.empty((2, 8, 64), dtype=torch.float32, device="cuda")
    reference.paged_attention_decode(ref[:1], q[:1].float(), kc.float(), vc.float(), tables[:1], lens[:1], 0.125)
    _assert_close(out[:1], ref[:1], torch.bfloat16, "decode next to padding entries of -1")

    tables[1, 1] = bad  # tokens 16-31 of sequence 1
    op(out, q, kc, vc, tables, lens, 0.125, impl)
    with pytest.raises(KernelInputError, match="block_tables"):
        check_kernel_errors()
    _assert_close(out[:1], ref[:1], torch.bfloat16, "decode next to a sequence with a bad entry")
    check_kernel_errors()  # the flags were cleared
    with pytest.raises(ValueError, match="block_tables"):  # the reference says the same at once
        reference.paged_attention_decode(ref, q.float(), kc.float(), vc.float(), tables, lens, 0.125)


@pytest.mark.sanitize
@pytest.mark.parametrize("impl", [pytest.param(0, id="cuda-cores")] + TENSOR_CORE_IMPLS)
def test_decode_seq_len_outside_the_block_table_is_clamped_and_reported(impl):
    _skip_unless_runs(impl)
    check_kernel_errors()
    kc, vc, tables, lens = make_paged_kv([40, 96], 2, 64, 16, torch.bfloat16, seed=5, table_width=6)  # capacity 96
    q = torch.randn((2, 8, 64), device="cuda").to(torch.bfloat16)
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
        _assert_close(out[:1], ref[:1], torch.bfloat16, f"decode next to a seq_len of {bad}")
        _assert_close(out[1:], expect[None], torch.bfloat16, f"a seq_len of {bad}, clamped into [0, 96]")
        with pytest.raises(ValueError, match="seq_lens: an entry below 0"):  # the reference says the same at once
            reference.paged_attention_decode(ref.clone(), q.float(), kc.float(), vc.float(), tables, bad_lens, 0.125)
    op(out, q, kc, vc, tables, lens, 0.125, impl)
    check_kernel_errors()  # cleared, and the right lengths raise nothing


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
        _assert_close(out[:20], ref[:20], dtype, f"prefill next to a seq_len of {bad}")
        _assert_close(out[50:], ref[50:], dtype, f"prefill next to a seq_len of {bad}")
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
    _assert_close(out, ref, dtype, "prefill before the bad inputs")

    bad_tables = tables.clone()
    bad_tables[1, 2] = 1 << 30  # tokens 32-47 of sequence 1
    out2 = out.clone()
    op(out2, q, kc, vc, bad_tables, cu, lens, 30, 0.125)
    with pytest.raises(KernelInputError, match="block_tables"):
        check_kernel_errors()
    _assert_close(out2[:20], ref[:20], dtype, "prefill next to a sequence with a bad entry")
    _assert_close(out2[50:], ref[50:], dtype, "prefill next to a sequence with a bad entry")

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
