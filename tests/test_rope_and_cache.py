"""rotary_embedding_and_cache (csrc/rope_and_cache.cu) against the two ops it fuses.

RoPE then the KV-cache write in one launch must leave exactly what
``rotary_embedding`` followed by ``reshape_and_cache`` leaves: the same rotated q and k
in the qkv buffer (bit for bit: the same float32 math), the same cache contents, the
same error flags for a bad position or slot. The model calls the fused op on every
layer, so the model-level tests (tests/test_model_vs_transformers.py) cover it too.

    python -m pytest tests/test_rope_and_cache.py -q
"""

from __future__ import annotations

import zlib

import pytest
import torch

from kernel_helpers import DTYPES, cos_sin_cache, gpu, qkv_views, tol
from tinyvllm import ops
from tinyvllm.ops import reference


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _slots(num_tokens: int, num_slots: int, device: str) -> torch.Tensor:
    slots = torch.randperm(num_slots, device=device)[:num_tokens]
    if num_tokens > 1:
        slots[torch.rand(num_tokens, device=device) < 0.2] = -1  # padding tokens
    return slots


def _split(buf: torch.Tensor, heads: tuple[int, int, int], misalign: bool = False):
    """q, k, v as row-strided views of a fused qkv buffer (as tests/test_kernels.py's qkv_views)."""
    num_heads, num_kv_heads, head_dim = heads
    qkv = buf[:, 1:] if misalign else buf
    wq, wk = num_heads * head_dim, num_kv_heads * head_dim
    return (qkv[:, :wq].unflatten(1, (num_heads, head_dim)), qkv[:, wq : wq + wk].unflatten(1, (num_kv_heads, head_dim)),
            qkv[:, wq + wk :].unflatten(1, (num_kv_heads, head_dim)))


def _run_both(buf, heads, misalign, positions, slots, cache, cache_shape, first, second):
    """Run ``first`` on a copy of buf and ``second`` on another; return (buf, key cache, value
    cache) after each. The caches start as NaN, so an unwritten slot stays NaN."""
    results = []
    for op in (first, second):
        b = buf.clone()
        q, k, v = _split(b, heads, misalign)
        kc = torch.full(cache_shape, float("nan"), device=buf.device, dtype=buf.dtype)
        vc = kc.clone()
        op(positions, q, k, v, kc, vc, slots, heads[2], cache)
        results.append((b, kc, vc))
    return results


def _two_kernels(positions, q, k, v, kc, vc, slots, head_dim, cache):
    torch.ops.tinyvllm.rotary_embedding(positions, q, k, head_dim, cache)
    torch.ops.tinyvllm.reshape_and_cache(k, v, kc, vc, slots)


def _two_references(positions, q, k, v, kc, vc, slots, head_dim, cache):
    reference.rotary_embedding(positions, q, k, head_dim, cache)
    reference.reshape_and_cache(k, v, kc, vc, slots)


@gpu
@pytest.mark.parametrize("layout", ["qkv_view", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_tokens", [1, 7, 128, 1000])
def test_fused_equals_rope_then_cache_write(num_tokens, head_dim, dtype, layout):
    num_heads, num_kv_heads, block_size = (32, 8, 16) if head_dim == 64 else (9, 3, 32)
    num_blocks = (num_tokens + block_size - 1) // block_size + 5
    misalign = layout == "misaligned"
    buf = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, misalign)[0]
    heads = (num_heads, num_kv_heads, head_dim)
    cache = cos_sin_cache(head_dim, True)
    positions = torch.randint(0, 100_001, (num_tokens,), device="cuda")
    slots = _slots(num_tokens, num_blocks * block_size, "cuda")
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    fused, twice = _run_both(buf, heads, misalign, positions, slots, cache, shape,
                             torch.ops.tinyvllm.rotary_embedding_and_cache, _two_kernels)
    for a, b in zip(fused, twice):  # the same float32 math: bit exact, NaN (unwritten) where the other's is
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    refs = _run_both(buf, heads, misalign, positions, slots, cache, shape, _two_references, _two_references)[0]
    for a, b in zip(fused, refs):  # and the torch references agree
        torch.testing.assert_close(a, b, equal_nan=True, **tol(dtype))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_partial_rotary_caches_the_unrotated_tail(dtype):
    """rot_dim < head_dim: the keys' coordinates past rot_dim are cached as they are."""
    head_dim, rot_dim, block_size = 128, 64, 16
    buf = qkv_views(19, 4, 2, head_dim, dtype)[0]
    cache = cos_sin_cache(head_dim, False, 4096, rot_dim)
    positions = torch.randint(0, 4096, (19,), device="cuda")
    slots = _slots(19, 4 * block_size, "cuda")
    fused, twice = _run_both(buf, (4, 2, head_dim), False, positions, slots, cache, (4, 2, block_size, head_dim),
                             torch.ops.tinyvllm.rotary_embedding_and_cache, _two_kernels)
    for a, b in zip(fused, twice):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@gpu
@pytest.mark.sanitize
def test_fused_reports_a_bad_position_and_a_bad_slot_like_the_two_ops():
    from tinyvllm.ops import KernelInputError, check_kernel_errors

    check_kernel_errors()  # start from clear flags
    cache = cos_sin_cache(64, False, max_position=100)
    buf = qkv_views(4, 4, 2, 64, torch.bfloat16)[0]
    positions = torch.tensor([5, 100, -1, 7], device="cuda")  # 100 and -1 are outside the cache
    slots = torch.tensor([3, 64, -1, 9], device="cuda")  # 64 is one past the 4 x 16 slots
    fused, twice = _run_both(buf, (4, 2, 64), False, positions, slots, cache, (4, 2, 16, 64),
                             torch.ops.tinyvllm.rotary_embedding_and_cache, _two_kernels)
    with pytest.raises(KernelInputError) as err:
        check_kernel_errors()
    assert "positions" in str(err.value) and "slot_mapping" in str(err.value)
    for a, b in zip(fused, twice):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    # Only slots 3 (token 0) and 9 (token 3) were written.
    assert int((~torch.isnan(fused[1])).sum()) == 2 * 2 * 64


@gpu
def test_fused_rejects_mismatched_arguments_with_a_clear_message():
    buf, q, k, v = qkv_views(4, 4, 2, 64, torch.bfloat16)
    cache = cos_sin_cache(64, False)
    kc = torch.zeros(4, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="slot_mapping"):
        torch.ops.tinyvllm.rotary_embedding_and_cache(
            torch.zeros(4, dtype=torch.long, device="cuda"), q, k, v, kc, kc.clone(),
            torch.zeros(3, dtype=torch.long, device="cuda"), 64, cache)
    with pytest.raises(RuntimeError, match="positions"):
        torch.ops.tinyvllm.rotary_embedding_and_cache(
            torch.zeros(3, dtype=torch.long, device="cuda"), q, k, v, kc, kc.clone(),
            torch.zeros(4, dtype=torch.long, device="cuda"), 64, cache)


def test_ops_entry_point_equals_the_two_ops_on_cpu():
    """ops.rotary_embedding_and_cache on a CPU tensor runs the two ops in sequence."""
    from tinyvllm.model.rope import build_cos_sin_cache

    buf = torch.randn(9, (4 + 2 * 2) * 64)
    cache = build_cos_sin_cache(64, 10000.0, 4096, None)
    positions = torch.randint(0, 4096, (9,))
    slots = _slots(9, 4 * 16, "cpu")
    fused, twice = _run_both(buf, (4, 2, 64), False, positions, slots, cache, (4, 2, 16, 64),
                             ops.rotary_embedding_and_cache, _two_references)
    for a, b in zip(fused, twice):
        torch.testing.assert_close(a, b, equal_nan=True)
