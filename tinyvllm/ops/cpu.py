"""Fast CPU versions of the attention ops: what the engine runs on a machine without a GPU.

The references in :mod:`tinyvllm.ops.reference` are the specification, written to be read: they
loop over the sequences in Python and repeat each kv head for its query heads. On a CPU every
small torch op costs a few microseconds of dispatch (and, with several threads on a busy
machine, a wait for every thread to join), so that loop made decode attention about half of a
CPU decode step. The functions here compute the same results with a fixed number of ops per
call, whatever the batch:

* decode: ONE gather of every sequence's blocks (the block tables padded to the longest
  sequence), GQA by viewing the query heads as ``[kv_heads, group]`` instead of repeating k and
  v, and ONE ``scaled_dot_product_attention`` with a mask that hides each sequence's padding;
* prefill: per sequence (a prompt is prefilled once, decode runs every step), the same gather
  and one SDPA call, causal by a mask that also handles a cached prefix.

Same signatures, same float32 math (inputs are upcast, the output rounded once), and the same
ValueErrors for bad block tables and lengths as the references. Tested against them on random
inputs in tests/test_cpu_ops.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinyvllm.ops.reference import KERNEL_ERROR_MESSAGES, _check_seq_lens


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The blocks ``block_ids [B, n]`` of ``cache [N, Hk, bs, D]`` as float32 ``[B, Hk, n * bs, D]``:
    each row's tokens in order, one copy for the whole batch."""
    b, n = block_ids.shape
    _, kv_heads, block_size, head_dim = cache.shape
    blocks = cache.index_select(0, block_ids.reshape(-1)).view(b, n, kv_heads, block_size, head_dim)
    return blocks.transpose(1, 2).reshape(b, kv_heads, n * block_size, head_dim).float()


def _block_ids(block_tables: torch.Tensor, lens: torch.Tensor, block_size: int, num_blocks: int, width: int) -> torch.Tensor:
    """The first ``width`` columns of the block tables, with every entry past a row's length
    replaced by block 0 (never read: masked out), so the gather stays inside the cache. A covered
    entry outside the cache is the references' ValueError."""
    needed = (lens + block_size - 1) // block_size  # blocks each sequence covers
    covered = torch.arange(width)[None, :] < needed[:, None]
    ids = torch.where(covered, block_tables[:, :width].long(), 0)
    lo, hi = torch.aminmax(ids)
    if lo < 0 or hi >= num_blocks:
        raise ValueError(KERNEL_ERROR_MESSAGES[0])
    return ids


def paged_attention_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> None:
    """:func:`tinyvllm.ops.reference.paged_attention_decode`, batched: one gather, one SDPA."""
    lens_list = seq_lens.tolist()
    block_size = key_cache.shape[2]
    _check_seq_lens(lens_list, block_tables, block_size)
    num_seqs, num_heads, head_dim = query.shape
    if num_seqs == 0:
        return
    kv_heads = key_cache.shape[1]
    width = -(-max(lens_list) // block_size)  # blocks of the longest sequence
    lens = seq_lens.long()
    ids = _block_ids(block_tables, lens, block_size, key_cache.shape[0], width)
    k = _gather_blocks(key_cache, ids)  # [B, Hk, L, D]
    v = _gather_blocks(value_cache, ids)
    # GQA: query head h reads kv head h // group, so [B, Hq, D] -> [B, Hk, group, D] is a view.
    q = query.reshape(num_seqs, kv_heads, num_heads // kv_heads, head_dim).float()
    # The new token sits at position len - 1 and sees every cached token: only the padding is hidden.
    visible = torch.arange(width * block_size)[None, :] < lens[:, None]  # [B, L]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=scale)
    if 0 in lens_list:  # nothing to attend to: the reference's empty sum is 0
        o[lens == 0] = 0
    out.copy_(o.reshape(num_seqs, num_heads, head_dim))


def prefill_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
) -> None:
    """:func:`tinyvllm.ops.reference.prefill_attention`, one SDPA per sequence."""
    cu = cu_seqlens_q.tolist()
    lens_list = seq_lens.tolist()
    block_size = key_cache.shape[2]
    _check_seq_lens(lens_list, block_tables, block_size)
    num_heads, head_dim = query.shape[1], query.shape[2]
    kv_heads = key_cache.shape[1]
    group = num_heads // kv_heads
    for s, n in enumerate(lens_list):
        a, b = cu[s], cu[s + 1]
        if not (0 <= a <= b <= query.shape[0] and b - a <= max_seqlen_q and b - a <= n):
            raise ValueError(KERNEL_ERROR_MESSAGES[3])
        q_len = b - a
        if q_len == 0:
            continue
        width = -(-n // block_size)
        ids = _block_ids(block_tables[s : s + 1], seq_lens[s : s + 1].long(), block_size, key_cache.shape[0], width)
        k = _gather_blocks(key_cache, ids)[:, :, :n]  # [1, Hk, n, D]
        v = _gather_blocks(value_cache, ids)[:, :, :n]
        # [q_len, Hq, D] -> [1, Hk, group * q_len, D]: the rows of one kv head's query heads, stacked.
        q = query[a:b].float().reshape(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        q = q.reshape(1, kv_heads, group * q_len, head_dim)
        # Query i (position n - q_len + i) sees keys 0 .. n - q_len + i; the same for every head.
        q_pos = torch.arange(n - q_len, n).repeat(group)[:, None]
        visible = torch.arange(n)[None, :] <= q_pos  # [group * q_len, n]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
        o = o.reshape(kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)
        out[a:b].copy_(o)
