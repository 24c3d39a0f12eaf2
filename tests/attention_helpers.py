"""What the attention tests share: a poisoned paged cache, the kernels' hooks, the plan.

Every test builds a paged KV cache whose blocks are shuffled (a sequence's blocks are
not contiguous nor in order), fills EVERYTHING that no sequence owns with NaN (unused
blocks, the tail of each sequence's last block, and the padding entries of the block
tables point at a NaN block), and poisons `out` with NaN before the launch. So a kernel
that reads one key past a sequence's end, follows a padding entry of the block table,
or leaves an output element unwritten, fails loudly instead of passing by luck.

The ops' ``impl`` argument (which kernel runs) and the decode plan are hooks for tests
and benchmarks, not part of ``tinyvllm.ops``: :func:`decode` calls
``torch.ops.tinyvllm.paged_attention_decode`` with one, :func:`decode_plan` asks
``tinyvllm._C.decode_plan`` (a plain function of the extension, not an op).
"""

from __future__ import annotations

import math

import pytest
import torch

from tinyvllm.ops import reference
from tinyvllm.ops._kernels import extension_loaded, has_kernel

HAS_GPU = torch.cuda.is_available()
needs_kernels = pytest.mark.skipif(
    not (HAS_GPU and has_kernel("paged_attention_decode") and has_kernel("prefill_attention")),
    reason="needs a CUDA GPU and the built tinyvllm._C extension with the attention kernels",
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Tolerances against the float32 reference: the kernel's output is rounded once to the
# storage dtype (bf16: 8 bits of mantissa, relative step 2^-8 = 0.4%), and prefill also
# rounds the softmax weights P to 16 bits before P @ V on the tensor cores.
TOL = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3), torch.float32: (2e-4, 2e-4)}

# Decode kernels by `impl`: 0 CUDA cores (float32 caches), 1 tensor cores with the block's
# warps sharing a kv head, 3 tensor cores with one kv head per warp (a block = 4 kv heads
# of a sequence; with 2 kv heads, as most tests have, 2 of its warps have no head and leave
# at once). -1, the product's choice, is automatic.
TENSOR_CORE_IMPLS = [pytest.param(1, id="shared_kv_head"), pytest.param(3, id="head_per_warp")]


def gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    return g


def make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, seed, extra_blocks=3, table_width=None):
    """Random k/v for each sequence in a NaN-filled paged cache with shuffled blocks.

    Returns key_cache, value_cache, block_tables [S, width] int32 (padding entries point
    at a block full of NaN), seq_lens [S] int32.
    """
    g = gen(seed)
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


def assert_close(out, ref, dtype, what):
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


def decode(out, query, key_cache, value_cache, block_tables, seq_lens, scale, impl=-1, sum_seq_lens=-1) -> None:
    """The decode op with a chosen kernel (`impl`, see TENSOR_CORE_IMPLS; -1: the product's plan)."""
    torch.ops.tinyvllm.paged_attention_decode(out, query, key_cache, value_cache, block_tables, seq_lens, scale,
                                              impl, sum_seq_lens)


def decode_plan(query: torch.Tensor, num_kv_heads: int, max_seq_len: int, impl: int = -1,
                sum_seq_lens: int | None = None) -> dict:
    """What the decode op launches for a batch shaped like `query` [num_seqs, num_heads, head_dim]
    (its dtype; on its GPU) with contexts of up to max_seq_len tokens (tinyvllm._C.decode_plan):
    {tensor_cores, num_splits, partition_size, warps, blocks_per_sm, smem_bytes, head_per_warp}."""
    if not extension_loaded():
        raise RuntimeError("decode_plan needs the compiled extension tinyvllm._C (pip install -e . on a machine with "
                           "nvcc and a CUDA build of torch)")
    if not query.is_cuda:
        raise RuntimeError(f"query must be a CUDA tensor (the plan is for its GPU), got device {query.device}")
    from tinyvllm import _C

    b, h, d = query.shape
    with torch.cuda.device(query.device):
        return _C.decode_plan(b, h, num_kv_heads, d, max_seq_len, -1 if sum_seq_lens is None else sum_seq_lens,
                              str(query.dtype).removeprefix("torch."), impl)


def llama_plan(batch: int, tokens: int, head_dim: int = 64, sum_seq_lens: int | None = None) -> dict:
    """The decode plan at Llama 3.2 1B's heads (32 query, 8 kv), bf16."""
    q = torch.empty(batch, 32, head_dim, device="cuda", dtype=torch.bfloat16)
    return decode_plan(q, 8, tokens, sum_seq_lens=sum_seq_lens)


def head_per_warp_pays(batch: int, sms: int, fit: int, kv_heads: int = 8) -> bool:
    # The plan's rule (csrc/attention/decode_plan.cpp, "One kv head per warp"): n blocks of 4 kv
    # heads in one wave of at least 2.75 per SM, the SMs that get the most blocks at least 3/4 of all.
    n = batch * -(-kv_heads // 4)
    most = -(-n // sms)
    return 4 * n >= 11 * sms and most <= fit and 4 * (n - (most - 1) * sms) >= 3 * sms


def run_decode(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, table_width=None,
               query_row_pad=0, impl=-1, sum_seq_lens=-1):
    """Decode over a fresh poisoned cache; returns (the kernel's output, the float32 reference)."""
    kc, vc, tables, lens = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, seed,
                                         table_width=table_width)
    b = len(seq_lens)
    g = gen(seed + 1)
    # q scaled up a little so that the softmax is peaked (exercises the running max)
    q_full = (2 * torch.randn((b, num_heads * head_dim + query_row_pad), generator=g, device="cuda")).to(dtype)
    query = q_full[:, : num_heads * head_dim].view(b, num_heads, head_dim)  # row-strided when padded
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.full((b, num_heads, head_dim), float("nan"), dtype=dtype, device="cuda")
    decode(out, query, kc, vc, tables, lens, scale, impl, sum_seq_lens)
    ref = torch.empty((b, num_heads, head_dim), dtype=torch.float32, device="cuda")
    reference.paged_attention_decode(ref, query.float(), kc.float(), vc.float(), tables, lens, scale)
    torch.cuda.synchronize()
    return out, ref


def run_prefill(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0,
                query_row_pad=0, max_seqlen_q=None, impl=-1):
    """Prefill over a fresh poisoned cache (impl: -1 automatic, 1 = 16 query rows per warp,
    2 = 32); returns (the kernel's output, the float32 reference)."""
    kc, vc, tables, lens = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, seed)
    t = sum(q_lens)
    g = gen(seed + 1)
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
