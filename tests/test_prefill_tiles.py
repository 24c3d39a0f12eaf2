"""Prefill attention at the edges of its tiles, for both shapes of the tensor-core kernel.

csrc/attention/prefill_attention.cu has two variants: 16 query rows per warp (64 per
block) and 32 rows per warp (128 per block). Query tiles end where q_len is not a
multiple of 64 or 128, the causal diagonal crosses key tiles at every offset when the
cached prefix is not a multiple of 64, and in a batch the grid is sized by the longest
sequence, so the blocks of shorter ones exit early. The cases below put a boundary at
each of those places, at both head dims and in both 16-bit dtypes.

The op's impl argument picks the variant (1: 16 rows per warp, 2: 32 rows per warp;
-1, the default, lets the launcher choose by the grid's size); every case runs with both.

Same harness as the other attention tests (attention_helpers.py): a NaN-poisoned paged cache with shuffled
blocks, NaN-filled `out`, and the float32 torch reference (tinyvllm.ops.reference).
Run:  pytest tests/test_prefill_tiles.py -q
"""

from __future__ import annotations

import pytest
import torch

from attention_helpers import assert_close, needs_kernels, run_prefill

pytestmark = needs_kernels

DTYPES = [torch.bfloat16, torch.float16]

# name: (q_lens, cached prefix per sequence, num_heads, num_kv_heads, block_size)
CASES = {
    # Query tiles that end everywhere around 64 and 128 rows; no prefix, so the diagonal
    # starts at key 0 (aligned with the key tiles).
    "q_len_around_tiles": ([1, 63, 64, 65, 127, 128, 129, 200, 255, 256, 257, 383], [0] * 12, 4, 2, 16),
    # Prefixes that are not multiples of 64: the diagonal crosses each 64-key tile at an
    # odd offset, so a 128-row tile sees it in 3 key tiles and mid-warp.
    "prefix_unaligned": ([100, 128, 129, 1, 300, 64, 190], [1, 31, 63, 65, 191, 1000, 97], 4, 2, 16),
    # Unequal sequences in one launch: the grid is sized by the 513-row one; the others
    # (including an empty one) have blocks that exit at once and tiles with rows past q_len.
    "mixed_lengths": ([513, 5, 0, 128, 77, 130], [0, 40, 7, 64, 3, 250], 6, 2, 16),
    # Few new tokens after a long prefix (chunked prefill's last chunk, speculative decode).
    "short_after_long_prefix": ([1, 2, 3, 17], [4095, 129, 64, 4000], 4, 1, 16),
    # GQA and other cache block sizes (the block table is read per key).
    "gqa_block_8": ([260, 130], [17, 0], 8, 2, 8),
    "gqa_block_32": ([260, 130], [0, 333], 8, 2, 32),
    # Long: many key tiles before the diagonal, the diagonal at a non-aligned offset.
    "long_prefix_77": ([2000], [77], 2, 1, 16),
}


IMPLS = [pytest.param(1, id="16-rows-per-warp"), pytest.param(2, id="32-rows-per-warp")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_tiles(case, head_dim, dtype, impl):
    q_lens, ctx, num_heads, num_kv_heads, block_size = CASES[case]
    seq_lens = [q + c for q, c in zip(q_lens, ctx)]
    seed = 10 * list(CASES).index(case) + head_dim
    out, ref = run_prefill(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=seed,
                           impl=impl)
    assert_close(out, ref, dtype, f"prefill {case} {dtype} d={head_dim} impl={impl}")


def test_prefill_both_variants_agree_with_automatic_choice():
    # The automatic choice is one of the two; whichever it is, the three runs agree.
    runs = [run_prefill([700, 300], [700, 333], 32, 8, 128, 16, torch.bfloat16, seed=3, impl=i)[0] for i in (-1, 1, 2)]
    auto, one, two = (r.float() for r in runs)
    assert torch.equal(auto, one) or torch.equal(auto, two)
    torch.testing.assert_close(one, two, atol=2e-2, rtol=2e-2)


def test_prefill_impl_errors_name_the_problem():
    kc = torch.zeros((4, 2, 16, 64), dtype=torch.float32, device="cuda")
    q = torch.zeros((5, 4, 64), dtype=torch.float32, device="cuda")
    tables = torch.zeros((1, 4), dtype=torch.int32, device="cuda")
    cu = torch.tensor([0, 5], dtype=torch.int32, device="cuda")
    lens = torch.tensor([5], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="impl must be -1"):
        torch.ops.tinyvllm.prefill_attention(torch.empty_like(q), q, kc, kc, tables, cu, lens, 5, 0.125, 0)
    with pytest.raises(RuntimeError, match=r"impl=2 \(tensor cores\) needs a bfloat16 or float16 cache"):
        torch.ops.tinyvllm.prefill_attention(torch.empty_like(q), q, kc, kc, tables, cu, lens, 5, 0.125, 2)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_grid_large_enough_for_automatic_mt2(head_dim):
    # 32 heads x ceil(1100 / 128) = 288 blocks of 128 rows: at least one full wave of
    # 2 blocks per SM on a 132-SM GPU, so the automatic rule picks 32 rows per warp.
    # Also: max_seqlen_q larger than every q_len, and a row-strided query.
    out, ref = run_prefill([1100, 70], [1130, 70], 32, 8, head_dim, 16, torch.bfloat16, seed=head_dim,
                           query_row_pad=3 * head_dim, max_seqlen_q=1200)
    assert_close(out, ref, torch.bfloat16, f"prefill 32 heads x 1100 d={head_dim}")


@pytest.mark.sanitize
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_tiles_sanitize(head_dim, impl):
    # Small, for compute-sanitizer: every edge above once, through both variants.
    out, ref = run_prefill([1, 65, 129, 0, 40], [1, 100, 129, 7, 300], 4, 2, head_dim, 16, torch.float16, seed=7,
                           impl=impl)
    assert_close(out, ref, torch.float16, f"prefill sanitize d={head_dim} impl={impl}")
