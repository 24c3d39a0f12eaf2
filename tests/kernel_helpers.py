"""What the kernel tests share: the GPU marker, per-dtype tolerances, random inputs on the GPU, the
RoPE cos/sin cache, and q/k/v as row-strided views of one qkv buffer (as the model makes them).

Used by tests/test_kernels.py and tests/test_rope_and_cache.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tinyvllm.model.rope import build_cos_sin_cache
from tinyvllm.ops._kernels import extension_loaded

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_GPU = torch.cuda.is_available()
HAS_EXT = extension_loaded()
gpu = pytest.mark.skipif(not (HAS_GPU and HAS_EXT), reason="needs a CUDA GPU and the compiled tinyvllm._C")


def tol(dtype: torch.dtype) -> dict:
    """About one unit in the last place of the output (both sides round a float32 once)."""
    return {
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=2e-3, atol=1e-4),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    }[dtype]


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def randn(*shape, dtype, scale=1.0, device="cuda"):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)


def norm_weight(hidden, dtype):
    return (1.0 + 0.2 * torch.randn(hidden, device="cuda")).to(dtype)


@functools.lru_cache(maxsize=None)
def cos_sin_cache(head_dim: int, llama3: bool, max_position: int = 131072, rot_dim: int | None = None):
    rot_dim = rot_dim or head_dim
    scaling = (
        {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}
        if llama3
        else None
    )
    theta = 500000.0 if llama3 else 10000.0
    cache = build_cos_sin_cache(rot_dim, theta, max_position, scaling)
    return cache.to("cuda").contiguous()


def qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, misalign=False):
    """q, k, v as row-strided views of one fused qkv buffer, like the model's. With
    misalign, rows start one element off a 16-byte boundary (forces the scalar path)."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    buf = randn(num_tokens, width + (1 if misalign else 0), dtype=dtype)
    qkv = buf[:, 1:] if misalign else buf
    q = qkv[:, : num_heads * head_dim].unflatten(1, (num_heads, head_dim))
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].unflatten(1, (num_kv_heads, head_dim))
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :].unflatten(1, (num_kv_heads, head_dim))
    return buf, q, k, v
