"""Fast CPU versions of the ops: what the engine runs on a machine without a GPU.

The references in :mod:`tinyvllm.ops.reference` are the specification, written to be read. On a
CPU they are slow in two ways, and the functions here fix both while computing the same results:

* Attention loops over the sequences in Python and repeats each kv head for its query heads.
  Every small torch op costs microseconds of dispatch (and, with several threads on a busy
  machine, a wait for every thread to join), so that loop made decode attention half of a CPU
  decode step. Here decode is ONE gather of every sequence's blocks (the block tables padded
  to the longest sequence), GQA by viewing the query heads as ``[kv_heads, group]``, and ONE
  ``scaled_dot_product_attention`` with a mask hiding each sequence's padding; prefill is one
  gather and one SDPA per sequence, causal by a mask that also handles a cached prefix.
* ``linear`` is ``torch.matmul``, which calls MKL's sgemm; on the AMD EPYC we measured it
  left the second core idle and ran 1.1-3.3x slower than oneDNN's kernels on a weight laid
  out once in oneDNN's blocked format (``torch.ops.mkldnn``, what ``torch.compile`` uses on
  CPU). A weight is packed once a batch keeps using it, and the copy kept while the weight
  lives (it doubles the weights' memory); one-row products stay with MKL (see ``linear``).

The elementwise ops (norms, RoPE, SiLU, the cache write) do the same math in fewer, in-place
torch ops. Everything here runs float32; other dtypes go to the reference. Same signatures and
the same ValueErrors for bad indices as the references; tested against them on random inputs
in tests/test_cpu_ops.py.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tinyvllm.ops import reference
from tinyvllm.ops.reference import KERNEL_ERROR_MESSAGES, _check_seq_lens


# ---- linear: oneDNN on packed weights ---------------------------------------------------------
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# One token through a layer's projections stays with MKL, which runs a one-row product on one
# thread: oneDNN splits every product over all threads, and on a busy 2-core machine a split op
# waits milliseconds for the other core (a batch-1 step measured 6x slower) for a 1.06x gain when
# idle. From two rows on (MKL splits those too, and is slow at them) and for the lm_head's large
# row, oneDNN: 1.65-1.8x MKL on one thread, 2.3-3.8x on two (30 layers of SmolLM2's shapes).
ONEDNN_MIN_OUTPUTS = 8192  # a single row goes to oneDNN when the weight has at least this many rows
# Packing SmolLM2's weights takes about a second; a single prompt's prefill would pay it for one
# product per weight. So a weight is packed at its third product that oneDNN should run (a batch
# that keeps decoding); the first two go to MKL.
PACK_AT_USE = 3


class _Packed:
    """A weight's oneDNN copy (None until packed) and how many products asked for it."""

    def __init__(self, weight: torch.Tensor, on_death) -> None:
        self.ref = weakref.ref(weight, on_death)
        self.version = weight._version
        self.uses = 0
        self.packed: torch.Tensor | None = None


_packed: dict[int, _Packed] = {}  # id(weight) -> its entry, removed when the weight dies


def _packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` [N, K] in oneDNN's blocked layout, packed at its ``PACK_AT_USE``-th use (None
    before, and for inference tensors); packed again if the weight was changed in place (its
    ``_version`` moved)."""
    if weight.is_inference():  # no version counter to tell an in-place change: never cached
        return None
    key = id(weight)
    entry = _packed.get(key)
    if entry is None or entry.ref() is not weight or entry.version != weight._version:
        entry = _packed[key] = _Packed(weight, lambda _: _packed.pop(key, None))
    entry.uses += 1
    if entry.packed is None and entry.uses >= PACK_AT_USE:
        entry.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    return entry.packed


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`tinyvllm.ops.reference.linear`: y = x @ weight^T, through oneDNN for float32."""
    if (not _ONEDNN or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() != 2
            or x.shape[0] == 0 or (x.shape[0] == 1 and weight.shape[0] < ONEDNN_MIN_OUTPUTS)):  # fmt: skip
        return reference.linear(x, weight)
    packed = _packed_weight(weight)
    if packed is None:
        return reference.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


# ---- elementwise ops, in place ------------------------------------------------------------------
def _fp32(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 for t in tensors)


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """:func:`tinyvllm.ops.reference.rms_norm`."""
    if not _fp32(out, x, weight):
        return reference.rms_norm(out, x, weight, eps)
    inv_rms = x.pow(2).mean(dim=-1, keepdim=True).add_(eps).rsqrt_()
    torch.mul(x, inv_rms, out=out).mul_(weight)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """:func:`tinyvllm.ops.reference.fused_add_rms_norm`: residual += x; x = rms_norm(residual)."""
    if not _fp32(x, residual, weight):
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    residual.add_(x)
    rms_norm(x, residual, weight, eps)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_dim: int, cos_sin_cache: torch.Tensor
) -> None:
    """:func:`tinyvllm.ops.reference.rotary_embedding`, rotating the halves in place."""
    if not _fp32(query, key, cos_sin_cache):
        return reference.rotary_embedding(positions, query, key, head_dim, cos_sin_cache)
    pos = positions.long()
    if pos.numel():
        lo, hi = (int(v) for v in torch.aminmax(pos))
        if lo < 0 or hi >= cos_sin_cache.shape[0]:
            raise ValueError(KERNEL_ERROR_MESSAGES[2])
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, pos)
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for t in (query, key):
        x1, x2 = t[..., :half], t[..., half : 2 * half]
        x1_sin = x1 * sin
        x1.mul_(cos).addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
        x2.mul_(cos).add_(x1_sin)  # x2 cos + x1 sin


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    """:func:`tinyvllm.ops.reference.silu_and_mul`."""
    if not _fp32(out, x):
        return reference.silu_and_mul(out, x)
    d = x.shape[-1] // 2
    torch.mul(F.silu(x[..., :d]), x[..., d:], out=out)


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """:func:`tinyvllm.ops.reference.reshape_and_cache`, with one range check when there is no padding."""
    slots = slot_mapping.long()
    if not slots.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(slots))
    if lo < 0:  # padding slots (-1) to skip: the reference's masked path
        return reference.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    block_size = key_cache.shape[2]
    if hi >= key_cache.shape[0] * block_size:
        raise ValueError(KERNEL_ERROR_MESSAGES[1])
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, :, offsets, :] = key.to(key_cache.dtype)
    value_cache[blocks, :, offsets, :] = value.to(value_cache.dtype)


# ---- attention ------------------------------------------------------------------------------------


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
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= num_blocks:
        raise ValueError(KERNEL_ERROR_MESSAGES[0])
    return ids


class _DecodePlan(NamedTuple):
    """What every layer of one decode step shares: which blocks to gather, which tokens are padding."""

    ids: torch.Tensor  # [B, width] block ids, 0 past each sequence's length
    visible: torch.Tensor  # [B, 1, 1, width * block_size] bool: the token exists
    empty: torch.Tensor | None  # [B] bool: sequences with nothing cached (None: there are none)


_last_plan: tuple = ()  # (block_tables, seq_lens, their versions, cache shape, plan): the last step's


def _decode_plan(block_tables: torch.Tensor, seq_lens: torch.Tensor, cache_shape: torch.Size) -> _DecodePlan:
    """The plan for these block tables and lengths, checked as the reference checks them.

    The model calls decode attention once per layer with the SAME two tensors, so the first
    layer makes the plan and the others reuse it. The cache keeps those tensors alive, so a
    later step's new tensors can never be taken for them; ``_version`` catches an in-place edit.
    """
    global _last_plan
    cacheable = not (block_tables.is_inference() or seq_lens.is_inference())  # those have no _version
    key = (block_tables._version, seq_lens._version, cache_shape) if cacheable else None
    if cacheable and _last_plan and _last_plan[0] is block_tables and _last_plan[1] is seq_lens and _last_plan[2] == key:
        return _last_plan[3]
    lens_list = seq_lens.tolist()
    num_blocks, _, block_size, _ = cache_shape
    _check_seq_lens(lens_list, block_tables, block_size)
    width = -(-max(lens_list) // block_size)  # blocks of the longest sequence
    lens = seq_lens.long()
    ids = _block_ids(block_tables, lens, block_size, num_blocks, width)
    # The new token sits at position len - 1 and sees every cached token: only the padding is hidden.
    visible = torch.arange(width * block_size)[None, :] < lens[:, None]
    plan = _DecodePlan(ids, visible[:, None, None, :], (lens == 0) if 0 in lens_list else None)
    _last_plan = (block_tables, seq_lens, key, plan) if cacheable else ()
    return plan


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
    num_seqs, num_heads, head_dim = query.shape
    if num_seqs == 0:
        return
    plan = _decode_plan(block_tables, seq_lens, key_cache.shape)
    k = _gather_blocks(key_cache, plan.ids)  # [B, Hk, L, D]
    v = _gather_blocks(value_cache, plan.ids)
    # GQA: query head h reads kv head h // group, so [B, Hq, D] -> [B, Hk, group, D] is a view.
    kv_heads = key_cache.shape[1]
    q = query.reshape(num_seqs, kv_heads, num_heads // kv_heads, head_dim).float()
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.visible, scale=scale)
    if plan.empty is not None:  # nothing to attend to: the reference's empty sum is 0
        o[plan.empty] = 0
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
