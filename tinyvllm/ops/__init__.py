"""The Python face of every tinyvllm op.

The model calls these functions only. Each one runs our CUDA kernel (registered
as ``torch.ops.tinyvllm.<name>`` by the extension ``tinyvllm._C``) when the
extension is built, the kernel exists and the input lives on a GPU; otherwise it
runs the pure-torch reference of the same op from :mod:`tinyvllm.ops.reference`.

On a CPU the ops run :mod:`tinyvllm.ops.cpu` instead: the same functions as the
references, in fewer torch ops (attention batched over the sequences) and, for
``linear``, through oneDNN on weights packed once for it.

Set ``TINYVLLM_REFERENCE_OPS=1`` to force the reference everywhere (useful to
compare the two paths on one GPU). ``linear`` has two GPU kernels, cuBLAS and the
skinny GEMM for decode; :func:`linear_impl` is the rule that picks one, and
``TINYVLLM_LINEAR_IMPL=cublas`` sends a whole run to cuBLAS. On a CPU the ops run the CPU fast
path (tinyvllm/ops/cpu.py), tested against its specification, the reference.
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

def decode_step_has_kernels(dtype: torch.dtype, device: torch.device, head_dim: int, block_size: int) -> bool:
    """Whether a decode step of these shapes runs our kernels only (the condition for capturing it
    in a CUDA graph: a reference op syncs with the host, which a capture forbids)."""
    probe = torch.empty(0, dtype=dtype, device=device)
    return (use_kernel("paged_attention_decode", probe) and use_kernel("rms_norm", probe)
            and head_dim in ATTENTION_HEAD_DIMS and block_size in ATTENTION_BLOCK_SIZES)


def _use_cpu_fast_path(tensor: torch.Tensor) -> bool:
    """Run :mod:`tinyvllm.ops.cpu` rather than the reference? (a CPU tensor, not forced off)"""
    return tensor.device.type == "cpu" and os.environ.get("TINYVLLM_REFERENCE_OPS") != "1"


__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "reshape_and_cache",
    "rotary_embedding_and_cache",
    "paged_attention_decode",
    "prefill_attention",
    "linear",
    "linear_impl",
    "skinny_gemm_unsupported",
    "embedding",
    "check_kernel_errors",
    "decode_step_has_kernels",
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


def rotary_embedding_and_cache(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    head_dim: int,
    cos_sin_cache: torch.Tensor,
) -> None:
    """:func:`rotary_embedding` then :func:`reshape_and_cache`, in one kernel launch on a GPU
    (csrc/rope_and_cache.cu: a launch per layer fewer in every step)."""
    if use_kernel("rotary_embedding_and_cache", query):
        torch.ops.tinyvllm.rotary_embedding_and_cache(
            positions, query, key, value, key_cache, value_cache, slot_mapping, head_dim, cos_sin_cache
        )
    else:
        rotary_embedding(positions, query, key, head_dim, cos_sin_cache)
        reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


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


# ---- linear: the skinny GEMM for decode, cuBLAS for the rest ----------------------------------
LINEAR_IMPLS = ("auto", "cublas", "skinny")
# The most rows of x the skinny GEMM takes (csrc/gemm/skinny_gemm.cu: two 8-row mma operands).
SKINNY_GEMM_MAX_M = 16
# TINYVLLM_LINEAR_IMPL=cublas sends every linear to cuBLAS (to measure a whole run without
# the skinny GEMM). Read once, at import.
_FORCED_LINEAR_IMPL = os.environ.get("TINYVLLM_LINEAR_IMPL", "auto")
if _FORCED_LINEAR_IMPL not in ("auto", "cublas"):
    logger.warning("TINYVLLM_LINEAR_IMPL=%r is not 'auto' or 'cublas'; ignored", _FORCED_LINEAR_IMPL)


_SKINNY_DTYPES = (torch.bfloat16, torch.float16)


def _aligned16(t: torch.Tensor) -> bool:
    if t.is_meta or torch.compiler.is_compiling():  # no address: allocations start 16-byte aligned
        return t.storage_offset() * t.element_size() % 16 == 0
    return t.data_ptr() % 16 == 0


def skinny_gemm_unsupported(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the skinny GEMM kernel cannot compute ``x @ weight^T``, or None when it can.

    Looks at shapes, dtypes, strides and addresses only (it works on CPU and meta tensors).
    The kernel reads 16-byte vectors of 8 elements and holds at most 16 rows of x. Called on
    every linear of an eager step, so the common case (all checks pass) is kept to a few
    tensor attribute reads."""
    xs, ws = x.shape, weight.shape
    if len(xs) != 2 or len(ws) != 2:
        return f"x and weight must be 2-D, got shapes {tuple(xs)} and {tuple(ws)}"
    m, k = xs
    if m > SKINNY_GEMM_MAX_M:
        return f"x has {m} rows; the skinny GEMM takes at most {SKINNY_GEMM_MAX_M}"
    dtype = x.dtype
    if dtype not in _SKINNY_DTYPES:
        return f"x must be bfloat16 or float16, got {dtype}"
    if weight.dtype != dtype:
        return f"weight has dtype {weight.dtype} but x has dtype {dtype}"
    if ws[1] != k:
        return f"x [M, K] and weight [N, K] must share K: x {tuple(xs)}, weight {tuple(ws)}"
    if k % 8:
        return f"K = {k} is not a multiple of 8 (the kernel reads rows as 16-byte vectors)"
    if not weight.is_contiguous():
        return "weight must be contiguous"
    if not x.is_contiguous():
        stride = x.stride()
        if m > 1 and (stride[1] != 1 or stride[0] % 8 or stride[0] < k):
            return f"x's rows must be dense with a row stride that is a multiple of 8, got strides {stride}"
        if m == 1 and stride[1] != 1:
            return f"x's row must be dense, got strides {stride}"
    if not (_aligned16(x) and _aligned16(weight)):
        return "x and weight must start on a 16-byte boundary"
    return None


def linear_impl(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The dispatch rule of :func:`linear`: ``"skinny"`` or ``"cublas"`` for these inputs.

    The skinny GEMM (csrc/gemm/skinny_gemm.cu) is written for decode: it reads every weight
    byte once and does the math on the tensor cores, which keeps up with the memory for
    any M up to 16; cuBLAS's kernels are tiled for reuse across many rows, and at M of a few
    they spend time on padding, split-K passes and launch choices (course chapter 7b). So
    the rule is: the skinny GEMM wherever it can run (bf16/fp16, M <= 16, K % 8 == 0,
    aligned) except M > 8 with K < 2048 (measured slower), cuBLAS everywhere else (prefill,
    float32, odd K).
    bench/bench_gemm.py measures both paths at every Llama-3.2-1B linear and M = 1..16 and
    prints where the skinny GEMM loses; this function is the one place to change if it does.
    ``TINYVLLM_LINEAR_IMPL=cublas`` (read at import) sends everything to cuBLAS."""
    if _FORCED_LINEAR_IMPL == "cublas" or skinny_gemm_unsupported(x, weight) is not None:
        return "cublas"
    # Measured on an H100 (bench/results/README.md, row 82): past 8 rows, a short K leaves each
    # warp too little work per byte for the two tensor-core operands: SmolLM2's K=576 at M=16
    # ran 0.53x (qkv) and 0.93x (lm_head) cuBLAS; at K=2048 and up it was 1.00-1.15x.
    if x.shape[0] > 8 and weight.shape[1] < 2048:
        return "cublas"
    return "skinny"


def linear(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """y = x @ weight^T for x: [M, K], weight: [N, K] (nn.Linear's layout).

    On a GPU, ``impl="auto"`` follows :func:`linear_impl` (the skinny GEMM for decode-sized
    M, cuBLAS otherwise); ``"cublas"`` or ``"skinny"`` force a path (for tests and benchmarks;
    forcing the skinny GEMM on inputs it cannot take raises ValueError saying why). Without
    the extension, or on CPU, the CPU fast path (or the reference) runs whatever ``impl`` says."""
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"impl must be one of {LINEAR_IMPLS}, got {impl!r}")
    if not use_kernel("linear", x):
        return cpu.linear(x, weight) if _use_cpu_fast_path(x) else reference.linear(x, weight)
    if impl == "auto":  # (an extension built before the skinny GEMM existed has only cuBLAS)
        impl = linear_impl(x, weight) if has_kernel("skinny_gemm") else "cublas"
    if impl == "skinny":
        why = skinny_gemm_unsupported(x, weight)
        if why is not None:
            raise ValueError(f"the skinny GEMM cannot run on these inputs: {why}")
        return torch.ops.tinyvllm.skinny_gemm(x, weight)
    # The cuBLAS wrapper takes a contiguous x; a row-strided x the skinny GEMM did not take is
    # copied here (the model's activations are contiguous: this is for direct callers).
    return torch.ops.tinyvllm.linear(x if x.is_contiguous() else x.contiguous(), weight)


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
