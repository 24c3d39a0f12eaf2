"""The Python face of every tinyvllm op.

The model calls these functions only. Each one runs our CUDA kernel (registered
as ``torch.ops.tinyvllm.<name>`` by the extension ``tinyvllm._C``) when the
extension is built, the kernel exists and the input lives on a GPU; otherwise it
runs the pure-torch reference of the same op from :mod:`tinyvllm.ops.reference`.

On a CPU the ops run :mod:`tinyvllm.ops.cpu` instead: the same functions as the
references, in fewer torch ops (attention batched over the sequences) and, for
``linear``, through oneDNN on weights packed once for it.

Set ``TINYVLLM_REFERENCE_OPS=1`` to force the reference everywhere (useful to
compare the two paths on one GPU, or the CPU fast path with its specification).
"""

from __future__ import annotations

import logging
import os

import torch

from tinyvllm.ops import cpu, reference
from tinyvllm.ops._kernels import has_kernel, use_kernel

logger = logging.getLogger(__name__)

# Shapes the attention kernels are compiled for (csrc/attention/): other shapes run the
# reference on the GPU, slowly but correctly, with a warning.
ATTENTION_HEAD_DIMS = (64, 128)
ATTENTION_BLOCK_SIZES = (8, 16, 32, 64, 128)
_warned: set[tuple[int, int]] = set()


def _use_attention_kernel(name: str, query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    if not use_kernel(name, query):
        return False
    head_dim, block_size = query.shape[-1], key_cache.shape[2]
    if head_dim in ATTENTION_HEAD_DIMS and block_size in ATTENTION_BLOCK_SIZES:
        return True
    if (head_dim, block_size) not in _warned:
        _warned.add((head_dim, block_size))
        logger.warning(
            "no attention kernel for head_dim=%d, block_size=%d (kernels: head_dim %s, block_size %s); "
            "using the slow torch reference",
            head_dim, block_size, ATTENTION_HEAD_DIMS, ATTENTION_BLOCK_SIZES,
        )
    return False


def _use_cpu_fast_path(tensor: torch.Tensor) -> bool:
    """Run :mod:`tinyvllm.ops.cpu` rather than the reference? (a CPU tensor, not forced off)"""
    return tensor.device.type == "cpu" and os.environ.get("TINYVLLM_REFERENCE_OPS") != "1"


__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "reshape_and_cache",
    "paged_attention_decode",
    "prefill_attention",
    "linear",
    "embedding",
    "check_kernel_errors",
    "KernelInputError",
    "reference",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Return rms_norm(x) * weight for x: [num_tokens, hidden]."""
    out = torch.empty_like(x)
    if use_kernel("rms_norm", x):
        torch.ops.tinyvllm.rms_norm(out, x, weight, eps)
    elif _use_cpu_fast_path(x):
        cpu.rms_norm(out, x, weight, eps)
    else:
        reference.rms_norm(out, x, weight, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x; x = rms_norm(residual) * weight."""
    if use_kernel("fused_add_rms_norm", x):
        torch.ops.tinyvllm.fused_add_rms_norm(x, residual, weight, eps)
    elif _use_cpu_fast_path(x):
        cpu.fused_add_rms_norm(x, residual, weight, eps)
    else:
        reference.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_dim: int, cos_sin_cache: torch.Tensor
) -> None:
    """Rotate query [T, H, D] and key [T, Hkv, D] in place by their positions.

    A position outside the cache leaves its token as it was; see :func:`check_kernel_errors`."""
    if use_kernel("rotary_embedding", query):
        torch.ops.tinyvllm.rotary_embedding(positions, query, key, head_dim, cos_sin_cache)
    elif _use_cpu_fast_path(query):
        cpu.rotary_embedding(positions, query, key, head_dim, cos_sin_cache)
    else:
        reference.rotary_embedding(positions, query, key, head_dim, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Return silu(x[:, :d]) * x[:, d:] for x: [num_tokens, 2d]."""
    out = torch.empty(x.shape[:-1] + (x.shape[-1] // 2,), dtype=x.dtype, device=x.device)
    if use_kernel("silu_and_mul", x):
        torch.ops.tinyvllm.silu_and_mul(out, x)
    elif _use_cpu_fast_path(x):
        cpu.silu_and_mul(out, x)
    else:
        reference.silu_and_mul(out, x)
    return out


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [T, Hkv, D] into the paged caches at slot_mapping [T].

    A slot of -1 is padding (skipped); a slot past the cache is skipped and reported by
    :func:`check_kernel_errors`."""
    if use_kernel("reshape_and_cache", key):
        torch.ops.tinyvllm.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    elif _use_cpu_fast_path(key):
        cpu.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    else:
        reference.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    sum_seq_lens: int | None = None,
) -> torch.Tensor:
    """Decode attention: one query token per sequence over its paged k/v. Returns [B, H, D].

    sum_seq_lens: the sum of ``seq_lens``, if the caller knows it on the host (the engine
    does). A hint for the GPU plan only (csrc/attention/decode_plan.cpp): it tells a batch of
    about equal lengths (not split where there are blocks enough) from a skewed one (the
    longest more than 3x the mean: the long sequences are cut into pieces). The result never
    depends on it. For a large ragged batch (two blocks per SM and more), pass the sequences longest first,
    as the engine's scheduler does: the kernel's blocks start in batch order.
    A block-table entry that ``seq_lens`` covers must name a block of the cache; the kernel
    never follows one that does not. A ``seq_lens`` entry must lie in [0, the table's capacity
    ``block_tables.shape[1] * block_size``]; the kernel clamps one that does not. Both are
    reported by :func:`check_kernel_errors`."""
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if _use_attention_kernel("paged_attention_decode", query, key_cache):
        torch.ops.tinyvllm.paged_attention_decode(out, query, key_cache, value_cache, block_tables, seq_lens, scale,
                                                  -1, -1 if sum_seq_lens is None else sum_seq_lens)
    elif _use_cpu_fast_path(query):
        cpu.paged_attention_decode(out, query, key_cache, value_cache, block_tables, seq_lens, scale)
    else:
        reference.paged_attention_decode(out, query, key_cache, value_cache, block_tables, seq_lens, scale)
    return out


def prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of query runs [T, H, D] over the paged cache. Returns [T, H, D].

    A query run outside the query, or longer than ``max_seqlen_q`` or than its ``seq_lens``
    entry, is skipped; a block-table entry outside the cache is never followed; a ``seq_lens``
    entry below 0 or past the block table's capacity is clamped into that range. All three are
    reported by :func:`check_kernel_errors`."""
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if _use_attention_kernel("prefill_attention", query, key_cache):
        torch.ops.tinyvllm.prefill_attention(
            out, query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q, scale, -1
        )
    elif _use_cpu_fast_path(query):
        cpu.prefill_attention(out, query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q, scale)
    else:
        reference.prefill_attention(
            out, query, key_cache, value_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q, scale
        )
    return out


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ weight^T for x: [M, K], weight: [N, K] (cuBLAS on GPU)."""
    if use_kernel("linear", x):
        return torch.ops.tinyvllm.linear(x, weight)
    if _use_cpu_fast_path(x):
        return cpu.linear(x, weight)
    return reference.linear(x, weight)


class KernelInputError(ValueError):
    """Device data held an index a kernel refused to follow (see :func:`check_kernel_errors`)."""


def check_kernel_errors(synchronize: bool = True) -> None:
    """Raise :class:`KernelInputError` if a kernel met an index it must not follow.

    Some bad inputs hide in GPU data that the ops cannot check without waiting for the GPU:
    a block-table entry outside the cache, a slot or a position past the end, query runs
    (``cu_seqlens_q``) outside the query, a ``seq_lens`` entry past its block-table row. The
    kernels never follow such an index (each op's docstring says what they do instead) and
    raise a flag in pinned host memory; this reads the flags, clears them and raises, naming
    each problem. The engine calls it after every step (``synchronize=False``: its copy of the
    sampled tokens has already waited for the step). Call it after your own kernel calls;
    ``synchronize`` waits for the GPU first.
    Without the extension (CPU) there is nothing to read: the reference ops raise at once.
    """
    if not has_kernel("kernel_errors") or not torch.cuda.is_initialized():
        return  # no kernel can have run
    if synchronize:
        torch.cuda.synchronize()
    flags = torch.ops.tinyvllm.kernel_errors(True)
    problems = [msg for flag, msg in zip(flags, reference.KERNEL_ERROR_MESSAGES) if flag]
    if problems:
        raise KernelInputError("; ".join(problems))


def embedding(token_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rows of the embedding table for each token id.

    A gather of whole rows is already bandwidth-bound in torch (one kernel, 16-byte
    accesses); a hand-written copy of it teaches nothing new, so torch's is used.
    """
    return torch.nn.functional.embedding(token_ids, table)
