"""The attention benchmark's read floor as the benchmark calls it: bench/read_floor.py, which
builds dev/cuda/read_floor.cu with nvcc on first use and calls it with ctypes.

A floor is only worth reporting if the kernel reads exactly the bytes it claims to. The
program dev/cuda/read_floor.cu checks itself in every shape the benchmark tries; here the
loader is checked end to end: the checksum (the XOR of every 32-bit word read) against the
same fold done by torch, on torch tensors and torch's stream, for the two layouts the
benchmark compares, and a page outside the pools, which is reported.

GPU tests skip without a GPU or without nvcc.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from read_floor import bad_page_seen, read_pages  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and (shutil.which("nvcc") or os.path.isfile("/usr/local/cuda/bin/nvcc"))),
    reason="needs a CUDA GPU and nvcc (bench/read_floor.py builds dev/cuda/read_floor.cu)",
)


def xor_fold(words: torch.Tensor) -> torch.Tensor:
    """XOR of each row of an int32 [rows, n] tensor, by halving: x[:, 0::2] ^ x[:, 1::2]."""
    while words.shape[1] > 1:
        if words.shape[1] % 2:
            words = torch.nn.functional.pad(words, (0, 1))  # 0 ^ x = x
        words = words[:, 0::2] ^ words[:, 1::2]
    return words[:, 0]


def expected_checksums(pool_a, pool_b, table, page_mult, stream_stride, streams):
    """What read_pages must return, computed with torch: gather each stream's pages, fold."""
    rows = table.shape[0]
    s = torch.arange(streams, device=table.device)
    pages = table.long().unsqueeze(1) * page_mult + (s * stream_stride).view(1, streams, 1)  # [rows, S, ppr]
    a = pool_a.reshape(pool_a.shape[0], -1).view(torch.int32)[pages.flatten()]
    b = pool_b.reshape(pool_b.shape[0], -1).view(torch.int32)[pages.flatten()]
    return xor_fold((a ^ b).reshape(rows * streams, -1)).view(rows, streams)


def random_pool(num_pages: int, page_shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn((num_pages, *page_shape), generator=g, device="cuda").to(dtype)


@pytest.mark.parametrize("threads,unroll,blocks_per_sm", [(128, 2, 0), (256, 8, 4)])
def test_checksum_is_the_xor_of_every_word_of_every_page_the_table_names(threads, unroll, blocks_per_sm):
    # A paged cache of 37 blocks x 4 kv heads (pages of 16 tokens x 64 dims of bf16 = 2 KiB),
    # read as the decode kernel reads it: stream s of row r is kv head s of sequence r.
    num_blocks, heads = 37, 4
    pool_k = random_pool(num_blocks * heads, (16, 64), torch.bfloat16, 1)
    pool_v = random_pool(num_blocks * heads, (16, 64), torch.bfloat16, 2)
    g = torch.Generator(device="cpu").manual_seed(3)
    for pages_per_row in (1, 3, 17):
        table = torch.randint(0, num_blocks, (5, pages_per_row), generator=g, dtype=torch.int32).cuda()
        checksum = torch.full((5, heads), 12345, dtype=torch.int32, device="cuda")  # poisoned
        fit = read_pages(checksum, pool_k, pool_v, table, heads, 1, threads, unroll, blocks_per_sm)
        assert torch.equal(checksum, expected_checksums(pool_k, pool_v, table, heads, 1, heads)), pages_per_row
        assert fit >= 1 and (blocks_per_sm == 0 or fit <= blocks_per_sm)
    assert not bad_page_seen()


@pytest.mark.sanitize
def test_paged_and_contiguous_layouts_of_the_same_kv_give_the_same_checksums():
    # What the benchmark relies on: the paged cache (shuffled blocks, through the block
    # table) and the contiguous [B, kv_heads, L, D] copy SDPA reads are the same bytes.
    b, hk, length, d, bs = 3, 2, 80, 128, 16
    nb = length // bs
    k = random_pool(b, (hk, length, d), torch.float16, 4)
    v = random_pool(b, (hk, length, d), torch.float16, 5)
    perm = torch.randperm(b * nb, generator=torch.Generator().manual_seed(6)).cuda()
    tables = perm.view(b, nb).to(torch.int32)
    blocks = lambda x: x.view(b, hk, nb, bs, d).permute(0, 2, 1, 3, 4).reshape(b * nb, hk, bs, d)  # noqa: E731
    kc, vc = torch.empty_like(blocks(k)), torch.empty_like(blocks(v))
    kc[perm], vc[perm] = blocks(k), blocks(v)

    paged = torch.empty(b, hk, dtype=torch.int32, device="cuda")
    read_pages(paged, kc.view(b * nb * hk, -1), vc.view(b * nb * hk, -1), tables, hk, 1)
    rows = (torch.arange(nb) + hk * nb * torch.arange(b).unsqueeze(1)).to(torch.int32).cuda()
    contiguous = torch.empty_like(paged)
    read_pages(contiguous, k.view(b * hk * nb, -1), v.view(b * hk * nb, -1), rows, 1, nb)
    assert torch.equal(paged, contiguous)
    assert torch.equal(paged, xor_fold((k.view(b, hk, -1).view(torch.int32) ^ v.view(b, hk, -1).view(torch.int32))
                                       .reshape(b * hk, -1)).view(b, hk))


@pytest.mark.sanitize
def test_a_page_outside_the_pools_reads_page_0_and_is_reported():
    pool_a = random_pool(8, (16, 64), torch.bfloat16, 10)
    pool_b = random_pool(8, (16, 64), torch.bfloat16, 11)
    bad_page_seen()  # nothing pending from earlier tests
    for bad in (8, -1, 2**31 - 1):
        table = torch.tensor([[1, bad, 2]], dtype=torch.int32, device="cuda")
        checksum = torch.empty(1, 1, dtype=torch.int32, device="cuda")
        read_pages(checksum, pool_a, pool_b, table, 1, 0)
        assert bad_page_seen(), bad
        instead = torch.tensor([[1, 0, 2]], dtype=torch.int32, device="cuda")
        assert torch.equal(checksum, expected_checksums(pool_a, pool_b, instead, 1, 0, 1))
    assert not bad_page_seen()  # cleared


def test_bad_arguments_are_named():
    pool = torch.zeros(8, 512, dtype=torch.float32, device="cuda")
    table = torch.zeros(2, 3, dtype=torch.int32, device="cuda")
    checksum = torch.empty(2, 1, dtype=torch.int32, device="cuda")
    cases = [
        ((checksum, pool, pool, table.long(), 1, 0), "must be int32"),
        ((checksum, pool, pool[:4], table, 1, 0), "pool_b must have the shape"),
        ((checksum, torch.zeros(8, 3, device="cuda"), torch.zeros(8, 3, device="cuda"), table, 1, 0),
         "power of two"),
        ((checksum, pool, pool, table, 9, 0), "page_mult and stream_stride"),
        ((torch.empty(3, 1, dtype=torch.int32, device="cuda"), pool, pool, table, 1, 0), "checksum"),
        ((checksum, pool, pool, table, 1, 0, 64), "threads must be 128 or 256"),
        ((checksum, pool, pool, table, 1, 0, 128, 3), "unroll 2, 4 or 8"),
        ((checksum, pool, pool, table, 1, 0, 128, 4, 33), "blocks_per_sm"),
        ((checksum, pool.cpu(), pool.cpu(), table, 1, 0), "pool_a must be a CUDA tensor"),
    ]
    for args, words in cases:
        with pytest.raises(ValueError, match=words):
            read_pages(*args)
