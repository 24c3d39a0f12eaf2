"""Every CUDA kernel of csrc/ (except attention) against its torch reference.

The reference (tinyvllm/ops/reference.py) computes in float32 and rounds once;
so do the kernels. On fresh random inputs the two must agree to about one unit
in the last place of the output dtype. Outputs are filled with NaN before each
kernel call, so an element the kernel forgets to write cannot pass.

GPU tests skip without a GPU or without the compiled extension; the tests at the
top run everywhere (CI has nvcc but no GPU) and prove the extension was built and
rejects bad input with a message that names the argument.

    python -m pytest tests/test_kernels.py -q                 # everything
    python -m pytest tests/test_kernels.py -q -k rms_norm     # one op
    python -m pytest tests/test_kernels.py -q -m sanitize     # the compute-sanitizer subset
"""

from __future__ import annotations

import math
import zlib
import os
import shutil

import pytest
import torch

from kernel_helpers import (  # noqa: F401  (the shared inputs and tolerances of the kernel tests)
    DTYPES, HAS_EXT, cos_sin_cache, gpu, nan_like, norm_weight, qkv_views, randn, tol,
)
from tinyvllm.ops import reference

OPS = ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "reshape_and_cache",
       "rotary_embedding_and_cache", "linear", "skinny_gemm", "paged_attention_decode", "prefill_attention"]
TOKENS = [1, 7, 128, 4096]
# 1000 still divides into 16-byte vectors (1000 = 125 x 8); 999 forces the scalar fallback paths.
HIDDEN = [576, 2048, 4096, 1000, 999]
# Rows rms_norm's register kernel cannot hold (more than 256 threads x 8 vectors): 2049 and
# 4099 are not 16-byte vectors (scalar, at most 2048), 16392 is more than 8 x 256 x 16 bytes.
# They run the shared-memory tree kernel (csrc/rmsnorm_tree.cuh).
LONG_ROWS = [2049, 4099, 16392]

def _toolchain_present() -> bool:
    if torch.version.cuda is None or os.environ.get("TINYVLLM_NO_EXTENSION") == "1":
        return False
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(h and os.path.isfile(os.path.join(h, "bin", "nvcc")) for h in homes)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different, reproducible seed per test (fresh inputs, never zeros)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


# =============================== CPU-only (CI) ===============================


@pytest.mark.skipif(not _toolchain_present(), reason="no CUDA torch + nvcc here: the pure-Python install is expected")
def test_extension_was_built():
    """With a CUDA build of torch and nvcc present, `pip install -e .` must have built _C,
    and loading it must work without a GPU."""
    import tinyvllm._C  # noqa: F401  (raises ImportError if the build was skipped)

    for name in OPS:
        assert hasattr(torch.ops.tinyvllm, name), f"torch.ops.tinyvllm.{name} is not registered"
    schema = str(torch.ops.tinyvllm.fused_add_rms_norm.default._schema)
    assert "!" in schema  # in-place outputs are declared as mutated


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_linear_meta_shape():
    """linear's fake/meta implementation (used by torch.compile and opcheck) works without a GPU."""
    x = torch.empty(5, 64, device="meta", dtype=torch.bfloat16)
    w = torch.empty(96, 64, device="meta", dtype=torch.bfloat16)
    y = torch.ops.tinyvllm.linear(x, w)
    assert y.shape == (5, 96) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    with pytest.raises(RuntimeError, match="share K"):
        torch.ops.tinyvllm.linear(x, torch.empty(96, 65, device="meta", dtype=torch.bfloat16))
    # The in-place ops' fake versions accept meta tensors and write nothing.
    torch.ops.tinyvllm.silu_and_mul(torch.empty(5, 32, device="meta"), torch.empty(5, 64, device="meta"))


@pytest.mark.skipif(not HAS_EXT, reason="extension not built")
def test_cpu_tensors_are_rejected_by_name():
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="input must be a CUDA tensor"):
        torch.ops.tinyvllm.rms_norm(torch.empty_like(x), x, torch.ones(64), 1e-5)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        torch.ops.tinyvllm.linear(x, torch.randn(8, 64))


def test_opcheck_importable():
    from torch.library import opcheck  # noqa: F401


# =============================== rms_norm ===============================


def _rms_norm_cases() -> list:
    """(num_tokens, hidden): the register kernel's rows, and the long rows the tree kernel takes."""
    return [(t, h) for t in TOKENS for h in HIDDEN] + [(t, h) for t in TOKENS[:3] for h in LONG_ROWS]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens,hidden", _rms_norm_cases())
def test_rms_norm(num_tokens, hidden, dtype):
    x = randn(num_tokens, hidden, dtype=dtype, scale=2.0)
    w = norm_weight(hidden, dtype)
    ref = torch.empty_like(x)
    reference.rms_norm(ref, x, w, 1e-5)
    out = nan_like(x)
    torch.ops.tinyvllm.rms_norm(out, x, w, 1e-5)
    torch.testing.assert_close(out, ref, **tol(dtype))


@gpu
@pytest.mark.parametrize("hidden", [2048, 2049], ids=["registers", "tree"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_row_strided_input(dtype, hidden):
    """x may be a view whose rows are further apart than `hidden` (e.g. a slice of a wider buffer)."""
    buf = randn(37, hidden + 64, dtype=dtype)
    x = buf[:, 32 : 32 + hidden]
    w = norm_weight(hidden, dtype)
    ref = torch.empty(37, hidden, device="cuda", dtype=dtype)
    reference.rms_norm(ref, x, w, 1e-6)
    out = nan_like(ref)
    torch.ops.tinyvllm.rms_norm(out, x, w, 1e-6)
    torch.testing.assert_close(out, ref, **tol(dtype))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens,hidden", _rms_norm_cases())
def test_fused_add_rms_norm(num_tokens, hidden, dtype):
    x = randn(num_tokens, hidden, dtype=dtype)
    res = randn(num_tokens, hidden, dtype=dtype, scale=3.0)
    w = norm_weight(hidden, dtype)
    x_ref, res_ref = x.clone(), res.clone()
    reference.fused_add_rms_norm(x_ref, res_ref, w, 1e-5)
    torch.ops.tinyvllm.fused_add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(res, res_ref, **tol(dtype))
    torch.testing.assert_close(x, x_ref, **tol(dtype))


@gpu
def test_ops_module_uses_the_rms_norm_kernel():
    """tinyvllm.ops.rms_norm (what the model calls) dispatches to the kernel, which has no
    version switch (the teaching version is dev/cuda/rmsnorm.cu's v1)."""
    from tinyvllm import ops

    x = randn(3, 2048, dtype=torch.bfloat16)
    w = norm_weight(2048, torch.bfloat16)
    ref = torch.empty_like(x)
    reference.rms_norm(ref, x, w, 1e-5)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), ref, **tol(torch.bfloat16))
    assert "impl" not in str(torch.ops.tinyvllm.rms_norm.default._schema)


# =============================== rotary_embedding ===============================


@gpu
@pytest.mark.parametrize("layout", ["qkv_view", "contiguous", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("llama3", [False, True], ids=["plain", "llama3"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_rotary_embedding(num_tokens, head_dim, llama3, dtype, layout):
    num_heads, num_kv_heads = (32, 8) if head_dim == 64 else (9, 3)
    cache = cos_sin_cache(head_dim, llama3)
    positions = torch.randint(0, 100_001, (num_tokens,), device="cuda", dtype=torch.int64)
    if layout == "contiguous":
        q = randn(num_tokens, num_heads, head_dim, dtype=dtype)
        k = randn(num_tokens, num_kv_heads, head_dim, dtype=dtype)
        q_ref, k_ref = q.clone(), k.clone()
        reference.rotary_embedding(positions, q_ref, k_ref, head_dim, cache)
        torch.ops.tinyvllm.rotary_embedding(positions, q, k, head_dim, cache)
        torch.testing.assert_close(q, q_ref, **tol(dtype))
        torch.testing.assert_close(k, k_ref, **tol(dtype))
        return
    misalign = layout == "misaligned"
    buf, q, k, _ = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, misalign)
    buf_ref = buf.clone()
    off = 1 if misalign else 0
    w_q, w_k = num_heads * head_dim, num_kv_heads * head_dim
    q_ref = buf_ref[:, off : off + w_q].unflatten(1, (num_heads, head_dim))
    k_ref = buf_ref[:, off + w_q : off + w_q + w_k].unflatten(1, (num_kv_heads, head_dim))
    assert num_tokens == 1 or q.stride(0) > num_heads * head_dim  # really a row-strided view
    reference.rotary_embedding(positions, q_ref, k_ref, head_dim, cache)
    torch.ops.tinyvllm.rotary_embedding(positions, q, k, head_dim, cache)
    # The whole buffer: q and k rotated, v (and the padding column) untouched.
    torch.testing.assert_close(buf, buf_ref, **tol(dtype))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_embedding_partial_rotary_dim(dtype):
    """rot_dim < head_dim (GPT-NeoX style partial rotary): the tail of each head is untouched."""
    head_dim, rot_dim = 128, 64
    cache = cos_sin_cache(head_dim, False, 4096, rot_dim)
    positions = torch.randint(0, 4096, (19,), device="cuda")
    q = randn(19, 4, head_dim, dtype=dtype)
    k = randn(19, 2, head_dim, dtype=dtype)
    q_ref, k_ref = q.clone(), k.clone()
    reference.rotary_embedding(positions, q_ref, k_ref, head_dim, cache)
    torch.ops.tinyvllm.rotary_embedding(positions, q, k, head_dim, cache)
    torch.testing.assert_close(q, q_ref, **tol(dtype))
    torch.testing.assert_close(k, k_ref, **tol(dtype))


@gpu
def test_rotary_embedding_prefill_equals_decode():
    """The same token rotated in a prefill batch and alone (decode) gives identical bits."""
    cache = cos_sin_cache(64, True)
    positions = torch.arange(1000, 1064, device="cuda")
    q = randn(64, 32, 64, dtype=torch.bfloat16)
    k = randn(64, 8, 64, dtype=torch.bfloat16)
    q1, k1 = q[-1:].clone(), k[-1:].clone()
    torch.ops.tinyvllm.rotary_embedding(positions, q, k, 64, cache)
    torch.ops.tinyvllm.rotary_embedding(positions[-1:], q1, k1, 64, cache)
    assert torch.equal(q[-1:], q1) and torch.equal(k[-1:], k1)


@gpu
@pytest.mark.sanitize
def test_rotary_embedding_position_outside_the_cache_is_reported_and_left_alone():
    from tinyvllm.ops import KernelInputError, check_kernel_errors

    check_kernel_errors()  # start from clear flags
    cache = cos_sin_cache(64, False, max_position=100)
    positions = torch.tensor([5, 100, -1, 7], device="cuda")
    q, k = randn(4, 4, 64, dtype=torch.bfloat16), randn(4, 2, 64, dtype=torch.bfloat16)
    q0, k0 = q.clone(), k.clone()
    torch.ops.tinyvllm.rotary_embedding(positions, q, k, 64, cache)
    with pytest.raises(KernelInputError, match="positions"):
        check_kernel_errors()
    assert torch.equal(q[1:3], q0[1:3]) and torch.equal(k[1:3], k0[1:3])  # left as they were
    good = torch.tensor([0, 3], device="cuda")
    q_ref, k_ref = q0[good].clone(), k0[good].clone()
    reference.rotary_embedding(positions[good], q_ref, k_ref, 64, cache)
    torch.testing.assert_close(q[good], q_ref, **tol(torch.bfloat16))
    torch.testing.assert_close(k[good], k_ref, **tol(torch.bfloat16))
    with pytest.raises(ValueError, match="positions"):  # the reference says the same at once
        reference.rotary_embedding(positions, q0.clone(), k0.clone(), 64, cache)


# =============================== silu_and_mul ===============================


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HIDDEN + [8192])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_silu_and_mul(num_tokens, d, dtype):
    x = randn(num_tokens, 2 * d, dtype=dtype, scale=3.0)
    ref = torch.empty(num_tokens, d, device="cuda", dtype=dtype)
    reference.silu_and_mul(ref, x)
    out = nan_like(ref)
    torch.ops.tinyvllm.silu_and_mul(out, x)
    torch.testing.assert_close(out, ref, **tol(dtype))


# =============================== reshape_and_cache ===============================


@gpu
@pytest.mark.parametrize("layout", ["qkv_view", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_reshape_and_cache(num_tokens, head_dim, dtype, layout):
    num_heads, num_kv_heads, block_size = (32, 8, 16) if head_dim == 64 else (9, 3, 32)
    num_blocks = (num_tokens + block_size - 1) // block_size + 5
    _, _, k, v = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, layout == "misaligned")
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    if num_tokens > 1:
        slots[torch.rand(num_tokens, device="cuda") < 0.2] = -1  # padding tokens
    cache_shape = (num_blocks, num_kv_heads, block_size, head_dim)
    kc = torch.full(cache_shape, float("nan"), device="cuda", dtype=dtype)
    vc = torch.full(cache_shape, float("nan"), device="cuda", dtype=dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    reference.reshape_and_cache(k, v, kc_ref, vc_ref, slots)
    torch.ops.tinyvllm.reshape_and_cache(k, v, kc, vc, slots)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0, equal_nan=True)  # a copy: bit exact
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)


@gpu
@pytest.mark.sanitize
def test_reshape_and_cache_slot_past_the_cache_is_reported_and_skipped():
    from tinyvllm.ops import KernelInputError, check_kernel_errors

    check_kernel_errors()
    k, v = randn(3, 2, 64, dtype=torch.bfloat16), randn(3, 2, 64, dtype=torch.bfloat16)
    kc = torch.full((4, 2, 16, 64), float("nan"), device="cuda", dtype=torch.bfloat16)  # 64 slots
    vc = kc.clone()
    torch.ops.tinyvllm.reshape_and_cache(k, v, kc, vc, torch.tensor([-1, 5, 6], device="cuda"))
    check_kernel_errors()  # -1 is padding, not an error
    slots = torch.tensor([3, -1, 64], device="cuda")  # slot 64: one past the cache
    torch.ops.tinyvllm.reshape_and_cache(k, v, kc, vc, slots)
    with pytest.raises(KernelInputError, match="slot_mapping"):
        check_kernel_errors()
    assert torch.equal(kc[0, :, 3], k[0]) and torch.equal(vc[0, :, 3], v[0])  # the good token was written
    assert int(torch.isnan(kc).sum()) == kc.numel() - 3 * 2 * 64  # slots 3, 5, 6 and nothing else
    with pytest.raises(ValueError, match="slot_mapping"):
        reference.reshape_and_cache(k, v, kc.clone(), vc.clone(), slots)


def test_references_name_the_indices_they_refuse_to_follow():
    """The CPU references raise at once what the kernels report after the fact
    (tinyvllm.ops.check_kernel_errors), with the same words."""
    kc = torch.zeros(4, 2, 16, 64)
    vc = torch.zeros(4, 2, 16, 64)
    q = torch.randn(1, 4, 64)
    out = torch.empty_like(q)
    lens = torch.tensor([20], dtype=torch.int32)
    for bad in (7, -1):  # block 1 holds tokens 16-19: it must name a block of the cache
        with pytest.raises(ValueError, match="block_tables"):
            reference.paged_attention_decode(out, q, kc, vc, torch.tensor([[0, bad]], dtype=torch.int32), lens, 0.1)
    # a padding entry past the sequence's end is never read
    reference.paged_attention_decode(out, q, kc, vc, torch.tensor([[0, 1, -1]], dtype=torch.int32), lens, 0.1)
    q20 = torch.randn(20, 4, 64)
    with pytest.raises(ValueError, match="cu_seqlens_q"):  # a run past the query's 20 rows
        reference.prefill_attention(torch.empty_like(q20), q20, kc, vc, torch.tensor([[0, 1]], dtype=torch.int32),
                                    torch.tensor([0, 21], dtype=torch.int32), torch.tensor([21], dtype=torch.int32),
                                    21, 0.1)
    for bad_len in (33, -1):  # a two-entry row holds at most 32 tokens
        with pytest.raises(ValueError, match="seq_lens: an entry below 0"):
            reference.paged_attention_decode(out, q, kc, vc, torch.tensor([[0, 1]], dtype=torch.int32),
                                             torch.tensor([bad_len], dtype=torch.int32), 0.1)
        with pytest.raises(ValueError, match="seq_lens: an entry below 0"):
            reference.prefill_attention(torch.empty_like(q), q, kc, vc, torch.tensor([[0, 1]], dtype=torch.int32),
                                        torch.tensor([0, 1], dtype=torch.int32),
                                        torch.tensor([bad_len], dtype=torch.int32), 1, 0.1)
    with pytest.raises(ValueError, match="slot_mapping"):
        reference.reshape_and_cache(torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), kc, vc, torch.tensor([64]))
    with pytest.raises(ValueError, match="positions"):
        reference.rotary_embedding(torch.tensor([100]), torch.zeros(1, 4, 64), torch.zeros(1, 2, 64), 64,
                                   torch.zeros(100, 64))


# =============================== linear (cuBLAS) ===============================

LINEAR_SHAPES = [(3072, 2048), (2048, 2048), (2048, 8192), (1000, 576), (96, 40)]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_k", LINEAR_SHAPES, ids=lambda nk: f"N{nk[0]}_K{nk[1]}")
@pytest.mark.parametrize("m", [1, 7, 128, 1024])
def test_linear(m, n_k, dtype):
    n, k = n_k
    x = randn(m, k, dtype=dtype)
    w = randn(n, k, dtype=dtype, scale=1.0 / math.sqrt(k))
    ref = (x.float() @ w.float().t()).to(dtype)  # float32 accumulate, one rounding
    y = torch.ops.tinyvllm.linear(x, w)
    assert y.shape == (m, n) and y.dtype == dtype
    # cuBLAS may split K and (as torch allows by default) add the partial sums in the
    # output precision, so allow a few units in the last place; a layout bug is off by O(1).
    if dtype == torch.float32:
        t = dict(rtol=2e-4, atol=2e-4) if not torch.backends.cuda.matmul.allow_tf32 else dict(rtol=5e-3, atol=5e-3)
    else:
        t = dict(rtol=1.6e-2, atol=1.6e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(y, ref, **t)


@gpu
def test_linear_empty_sizes():
    w = randn(16, 8, dtype=torch.bfloat16)
    assert torch.ops.tinyvllm.linear(randn(0, 8, dtype=torch.bfloat16), w).shape == (0, 16)
    y = torch.ops.tinyvllm.linear(randn(3, 0, dtype=torch.bfloat16), randn(16, 0, dtype=torch.bfloat16))
    assert y.shape == (3, 16) and bool((y == 0).all())


# =============================== opcheck ===============================


def _opcheck_cases():
    bf = torch.bfloat16
    x = randn(7, 576, dtype=bf)
    w = norm_weight(576, bf)
    cache = cos_sin_cache(64, True)
    kc = randn(4, 3, 16, 64, dtype=bf)
    x_long, w_long = randn(3, LONG_ROWS[0], dtype=bf), norm_weight(LONG_ROWS[0], bf)  # the tree kernel's row
    return {
        "rms_norm": (torch.ops.tinyvllm.rms_norm.default, (torch.empty_like(x), x, w, 1e-5)),
        "rms_norm_tree": (torch.ops.tinyvllm.rms_norm.default, (torch.empty_like(x_long), x_long, w_long, 1e-5)),
        "fused_add_rms_norm": (torch.ops.tinyvllm.fused_add_rms_norm.default, (x.clone(), x.clone(), w, 1e-5)),
        "rotary_embedding": (
            torch.ops.tinyvllm.rotary_embedding.default,
            (torch.randint(0, 9000, (7,), device="cuda"), randn(7, 9, 64, dtype=bf), randn(7, 3, 64, dtype=bf), 64,
             cache),
        ),
        "silu_and_mul": (torch.ops.tinyvllm.silu_and_mul.default, (torch.empty(7, 288, device="cuda", dtype=bf), x)),
        "reshape_and_cache": (
            torch.ops.tinyvllm.reshape_and_cache.default,
            (randn(7, 3, 64, dtype=bf), randn(7, 3, 64, dtype=bf), kc, kc.clone(),
             torch.tensor([0, 5, -1, 17, 33, 60, 2], device="cuda")),
        ),
        "linear": (torch.ops.tinyvllm.linear.default, (x, randn(96, 576, dtype=bf))),
    }


@gpu
@pytest.mark.parametrize(
    "name", ["rms_norm", "rms_norm_tree", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul",
             "reshape_and_cache", "linear"]
)
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


# =============================== bad inputs ===============================


def _bad_input_cases():
    bf = torch.bfloat16
    T = torch.ops.tinyvllm
    x = randn(4, 64, dtype=bf)
    w = norm_weight(64, bf)
    out = torch.empty_like(x)
    cache = cos_sin_cache(64, False)
    pos = torch.arange(4, device="cuda")
    q, k = randn(4, 2, 64, dtype=bf), randn(4, 1, 64, dtype=bf)
    kc = randn(3, 1, 16, 64, dtype=bf)
    kc_nc = randn(3, 1, 64, 16, dtype=bf).transpose(2, 3)  # the right shape, the wrong layout
    slots = torch.arange(4, device="cuda")
    return [
        # (call, regex the message must match)
        (lambda: T.rms_norm(out, x, w.cpu(), 1e-5), "weight must be a CUDA tensor"),
        (lambda: T.rms_norm(out, x.int(), w, 1e-5), "input must be float32, float16 or bfloat16"),
        (lambda: T.rms_norm(out, x, w.half(), 1e-5), "weight has dtype"),
        (lambda: T.rms_norm(out, x, norm_weight(65, bf), 1e-5), "weight must have shape"),
        (lambda: T.rms_norm(out[:, :32], x[:, :32].contiguous(), w[:32], 1e-5), "out must be contiguous"),
        (lambda: T.rms_norm(out, x.t(), w, 1e-5), "out must have the shape of input"),
        (lambda: T.rms_norm(out, x[None], w, 1e-5), "input must have 2 dimensions"),
        (lambda: T.fused_add_rms_norm(x, x[:3].clone(), w, 1e-5), "residual must have the shape"),
        (lambda: T.fused_add_rms_norm(x.t(), x.t().clone(), w[:4].clone(), 1e-5), "input must be contiguous"),
        (lambda: T.rotary_embedding(pos.int(), q, k, 64, cache), "positions must be Long"),
        (lambda: T.rotary_embedding(pos, q, k, 64, cache.to(bf)), "cos_sin_cache must be Float"),
        (lambda: T.rotary_embedding(pos[:3], q, k, 64, cache), "positions must have shape"),
        (lambda: T.rotary_embedding(pos, q, k.half(), 64, cache), "key has dtype"),
        (lambda: T.rotary_embedding(pos, q, k, 128, cache), "query must have head_size"),
        (lambda: T.rotary_embedding(pos, randn(4, 64, 2, dtype=bf).transpose(1, 2), k, 64, cache),
         "query must be dense"),
        (lambda: T.rotary_embedding(pos, q, k.cpu(), 64, cache), "key must be a CUDA tensor"),
        (lambda: T.silu_and_mul(torch.empty(4, 32, device="cuda", dtype=bf), x[:, :63]), "even last dimension"),
        (lambda: T.silu_and_mul(torch.empty(4, 31, device="cuda", dtype=bf), x), "out must have shape"),
        (lambda: T.silu_and_mul(torch.empty(4, 32, device="cuda", dtype=torch.half), x), "out has dtype"),
        (lambda: T.reshape_and_cache(k, k, kc, kc.clone(), slots.int()), "slot_mapping must be Long"),
        (lambda: T.reshape_and_cache(k, k, kc[..., :32], kc[..., :32], slots), "key_cache must have shape"),
        (lambda: T.reshape_and_cache(k, k, kc_nc, kc_nc.clone(), slots), "key_cache must be contiguous"),
        (lambda: T.reshape_and_cache(k, k.float(), kc, kc.clone(), slots), "value has dtype"),
        (lambda: T.linear(x.t(), randn(8, 4, dtype=bf)), "x must be contiguous"),
        (lambda: T.linear(x, randn(8, 63, dtype=bf)), "must share K"),
        (lambda: T.linear(x, randn(8, 64, dtype=torch.half)), "weight has dtype"),
        (lambda: T.linear(x, randn(8, 64, dtype=bf).cpu()), "weight must be a CUDA tensor"),
        (lambda: T.linear(x.long(), x.long()), "x must be float32, float16 or bfloat16"),
    ]


@gpu
def test_bad_inputs_raise_naming_the_argument():
    for i, (call, pattern) in enumerate(_bad_input_cases()):
        with pytest.raises((RuntimeError, ValueError), match=pattern):
            call()
        torch.cuda.synchronize()  # nothing was launched that could fault


# =============================== compute-sanitizer subset ===============================


@gpu
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sanitize_smoke(dtype):
    """Small shapes hitting both vector and scalar paths of every op (run under compute-sanitizer)."""
    for hidden in (999, 576, 2049):  # 2049: the tree kernel (a row too long for registers)
        x = randn(5, hidden, dtype=dtype)
        w = norm_weight(hidden, dtype)
        ref = torch.empty_like(x)
        reference.rms_norm(ref, x, w, 1e-5)
        out = nan_like(x)
        torch.ops.tinyvllm.rms_norm(out, x, w, 1e-5)
        torch.testing.assert_close(out, ref, **tol(dtype))
        a, r = x.clone(), x.flip(0).contiguous()
        a2, r2 = a.clone(), r.clone()
        reference.fused_add_rms_norm(a2, r2, w, 1e-5)
        torch.ops.tinyvllm.fused_add_rms_norm(a, r, w, 1e-5)
        torch.testing.assert_close(a, a2, **tol(dtype))
        x2 = randn(5, 2 * hidden, dtype=dtype)
        y = torch.full((5, hidden), float("nan"), device="cuda", dtype=dtype)
        ref = torch.empty_like(y)
        reference.silu_and_mul(ref, x2)
        torch.ops.tinyvllm.silu_and_mul(y, x2)
        torch.testing.assert_close(y, ref, **tol(dtype))
    cache = cos_sin_cache(64, True)
    for misalign in (False, True):
        buf, q, k, v = qkv_views(9, 4, 2, 64, dtype, misalign)
        ref_buf = buf.clone()
        pos = torch.randint(0, 100_000, (9,), device="cuda")
        torch.ops.tinyvllm.rotary_embedding(pos, q, k, 64, cache)
        off = 1 if misalign else 0
        reference.rotary_embedding(pos, ref_buf[:, off : off + 256].unflatten(1, (4, 64)),
                                   ref_buf[:, off + 256 : off + 384].unflatten(1, (2, 64)), 64, cache)
        torch.testing.assert_close(buf, ref_buf, **tol(dtype))
        kc = torch.zeros(3, 2, 16, 64, device="cuda", dtype=dtype)
        vc = kc.clone()
        slots = torch.tensor([0, 47, -1, 16, 3, 31, 32, -1, 5], device="cuda")
        kc2, vc2 = kc.clone(), vc.clone()
        torch.ops.tinyvllm.reshape_and_cache(k, v, kc, vc, slots)
        reference.reshape_and_cache(k, v, kc2, vc2, slots)
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    xl = randn(3, 40, dtype=dtype)
    wl = randn(24, 40, dtype=dtype)
    torch.testing.assert_close(torch.ops.tinyvllm.linear(xl, wl), (xl.float() @ wl.float().t()).to(dtype),
                               rtol=1.6e-2, atol=2e-3)
