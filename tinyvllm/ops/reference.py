"""Pure-torch reference implementations of every tinyvllm op.

These functions ARE the specification: each CUDA kernel in ``csrc/`` computes the
same function with the same signature, and the tests compare the two on random
inputs. They are also what the whole engine runs on when there is no GPU (CI).

Conventions shared by all ops (mirrored by the kernels):

* Token-major activations: ``x`` is ``[num_tokens, hidden]``.
* Ops whose name has no ``_`` prefix and whose first argument is ``out`` write
  into ``out`` in place (``Tensor!`` in the schema) and return nothing.
* Math is done in float32 and rounded to the output dtype once, at the end,
  exactly as the kernels do.
* Paged KV cache layout, per layer:
  ``key_cache, value_cache: [num_blocks, num_kv_heads, block_size, head_dim]``.
  A token's *slot* is ``block_id * block_size + offset_in_block``; a slot of
  ``-1`` means "padding, do not write".
* ``cos_sin_cache: [max_position, rotary_dim]`` float32: the first half of each
  row holds ``cos(pos * inv_freq)``, the second half ``sin(pos * inv_freq)``.
"""

from __future__ import annotations

import torch

# What each flag of the kernels' error word means (csrc/ops.h, KernelError, in that order).
# The kernels never follow such an index and tell the host after the fact
# (tinyvllm.ops.check_kernel_errors); the references below raise the same words at once.
KERNEL_ERROR_MESSAGES = (
    "block_tables: an entry that seq_lens covers is outside the cache [0, num_blocks) "
    "(the attention kernels read block 0 there instead)",
    "slot_mapping: a slot at or past the cache's num_blocks * block_size slots (reshape_and_cache skipped it; "
    "-1 marks padding)",
    "positions: a position outside [0, max_position) of cos_sin_cache (rotary_embedding left that token as it was)",
    "cu_seqlens_q: a query run outside the query's rows, or longer than max_seqlen_q or than its seq_lens entry "
    "(prefill_attention skipped that sequence)",
    "seq_lens: an entry below 0 or past the block table's capacity, max_blocks_per_seq * block_size "
    "(the attention kernels clamped it into that range)",
)


def _check_seq_lens(lens: list[int], block_tables: torch.Tensor, block_size: int) -> None:
    """Every length must fit its block-table row: 0 <= seq_len <= max_blocks_per_seq * block_size."""
    capacity = block_tables.shape[1] * block_size
    if any(n < 0 or n > capacity for n in lens):
        raise ValueError(KERNEL_ERROR_MESSAGES[4])


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """out = x / sqrt(mean(x^2) + eps) * weight, row by row.

    x, out: [num_tokens, hidden]; weight: [hidden].
    """
    xf = x.float()
    variance = xf.pow(2).mean(dim=-1, keepdim=True)
    out.copy_((xf * torch.rsqrt(variance + eps) * weight.float()).to(out.dtype))


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual <- x + residual; x <- rms_norm(residual) * weight.

    This is the pre-norm transformer's "add the sublayer output to the residual
    stream, then normalise for the next sublayer" in one pass (vLLM's semantics).
    The sum is rounded to the residual dtype before it is normalised, as the
    kernel stores it.
    """
    summed = (x.float() + residual.float()).to(residual.dtype)
    residual.copy_(summed)
    rms_norm(x, summed, weight, eps)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    head_dim: int,
    cos_sin_cache: torch.Tensor,
) -> None:
    """Rotate query and key in place by their positions (rotate-half / NeoX pairing).

    positions: [num_tokens] int64; query: [num_tokens, num_heads, head_dim];
    key: [num_tokens, num_kv_heads, head_dim] (a row stride larger than the row is
    allowed: q and k are usually views into the fused qkv output).
    Dimension i of the first half pairs with dimension i + head_dim/2:
        x1' = x1 * cos - x2 * sin
        x2' = x2 * cos + x1 * sin
    which is what Hugging Face Llama checkpoints were trained with.
    """
    rot = cos_sin_cache.shape[-1]
    half = rot // 2
    pos = positions.long()
    if pos.numel() and not bool(((pos >= 0) & (pos < cos_sin_cache.shape[0])).all()):
        raise ValueError(KERNEL_ERROR_MESSAGES[2])
    cs = cos_sin_cache.index_select(0, pos).float()
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]
    for t in (query, key):
        tf = t[..., :rot].float()
        x1, x2 = tf[..., :half], tf[..., half:]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        t[..., :rot].copy_(rotated.to(t.dtype))
    del head_dim  # implied by the tensors; kept in the signature for the kernel


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    """SwiGLU gate: out = silu(x[..., :d]) * x[..., d:], with x: [num_tokens, 2d]."""
    d = x.shape[-1] // 2
    xf = x.float()
    out.copy_((torch.nn.functional.silu(xf[..., :d]) * xf[..., d:]).to(out.dtype))


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each new token's k and v into the paged cache at its slot.

    key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int64.
    Token t goes to block slot // block_size, row slot % block_size. Slots < 0 are skipped;
    a slot past the cache is an error (the kernel skips it and raises a flag).
    """
    block_size = key_cache.shape[2]
    slots = slot_mapping.long()
    if bool((slots >= key_cache.shape[0] * block_size).any()):
        raise ValueError(KERNEL_ERROR_MESSAGES[1])
    valid = slots >= 0
    if not bool(valid.all()):
        key, value, slots = key[valid], value[valid], slots[valid]
    blocks = slots // block_size
    offsets = slots % block_size
    key_cache[blocks, :, offsets, :] = key.to(key_cache.dtype)
    value_cache[blocks, :, offsets, :] = value.to(value_cache.dtype)


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence, gathered from its blocks: [kv_heads, seq_len, head_dim]."""
    block_size = cache.shape[2]
    n_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table[:n_blocks].long()
    if not bool(((ids >= 0) & (ids < cache.shape[0])).all()):
        raise ValueError(KERNEL_ERROR_MESSAGES[0])
    blocks = cache.index_select(0, ids)  # [n, kvh, bs, d]
    kvh, d = cache.shape[1], cache.shape[3]
    return blocks.permute(1, 0, 2, 3).reshape(kvh, n_blocks * block_size, d)[:, :seq_len]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float) -> torch.Tensor:
    """Causal GQA attention for one sequence in float32.

    q: [q_len, num_heads, d] at positions q_start..q_start+q_len-1;
    k, v: [kv_heads, seq_len, d] for positions 0..seq_len-1.
    Query head h uses kv head h // (num_heads // kv_heads).
    """
    q_len, num_heads, _ = q.shape
    kv_heads, seq_len, _ = k.shape
    group = num_heads // kv_heads
    qf = q.float().permute(1, 0, 2)  # [H, q_len, d]
    kf = k.float().repeat_interleave(group, dim=0)
    vf = v.float().repeat_interleave(group, dim=0)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [H, q_len, seq_len]
    q_pos = torch.arange(q_start, q_start + q_len, device=q.device)[:, None]
    k_pos = torch.arange(seq_len, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).permute(1, 0, 2)  # [q_len, H, d]


def paged_attention_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> None:
    """One new query token per sequence attends to all of its cached keys.

    out, query: [num_seqs, num_heads, head_dim]; block_tables: [num_seqs, max_blocks] int32;
    seq_lens: [num_seqs] int32, the number of cached tokens including the new one
    (whose k/v reshape_and_cache has already written).
    """
    lens = seq_lens.tolist()
    _check_seq_lens(lens, block_tables, key_cache.shape[2])
    for i, n in enumerate(lens):
        k = _gather_kv(key_cache, block_tables[i], n)
        v = _gather_kv(value_cache, block_tables[i], n)
        out[i].copy_(_attend(query[i : i + 1], k, v, n - 1, scale)[0].to(out.dtype))


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
    """Causal attention for a batch of query runs over the paged cache.

    out, query: [num_tokens, num_heads, head_dim]; the queries of sequence s are
    rows cu_seqlens_q[s] .. cu_seqlens_q[s+1]-1 and sit at positions
    seq_lens[s] - q_len .. seq_lens[s] - 1. They attend causally to cached keys
    0 .. their own position, read through block_tables[s]. A cached prefix
    (prefix caching, chunked prefill) is simply seq_lens[s] > q_len.
    """
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    _check_seq_lens(lens, block_tables, key_cache.shape[2])
    for s, n in enumerate(lens):
        a, b = cu[s], cu[s + 1]
        if not (0 <= a <= b <= query.shape[0] and b - a <= max_seqlen_q and b - a <= n):
            raise ValueError(KERNEL_ERROR_MESSAGES[3])
        if b == a:
            continue
        k = _gather_kv(key_cache, block_tables[s], n)
        v = _gather_kv(value_cache, block_tables[s], n)
        out[a:b].copy_(_attend(query[a:b], k, v, n - (b - a), scale).to(out.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight^T with x: [M, K], weight: [N, K] (PyTorch's Linear layout), float32 accumulate."""
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        return (x.float() @ weight.float().t()).to(x.dtype)
    return x @ weight.t()
