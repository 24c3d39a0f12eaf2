"""The skinny GEMM for decode (csrc/gemm/skinny_gemm.cu) and linear's dispatch rule.

``torch.ops.tinyvllm.skinny_gemm(x, w)`` computes y = x @ w^T for x with 1..16 rows on the tensor
cores; ``tinyvllm.ops.linear`` sends decode-sized inputs to it and everything else to cuBLAS
(:func:`tinyvllm.ops.linear_impl`). The reference is ``(x.float() @ w.float().t()).to(dtype)``:
float32 sums, one rounding, as the kernel does, so the two agree to about one unit in the last
place; a fragment or tail bug is off by O(1).

CPU tests (CI) pin the dispatch rule, the reasons it gives, and the op's registration; GPU tests
(skipped without a GPU and the extension) cover every Llama-3.2-1B and SmolLM2-135M linear at
M = 1..16, tails in N and K, strided x, bad inputs, graph capture. ``test_sanitize_subset``
(marked ``sanitize``) runs under compute-sanitizer (scripts/gpu_check.sh).

    python -m pytest tests/test_skinny_gemm.py -q
"""

from __future__ import annotations

import zlib

import pytest
import torch

from tinyvllm import ops
from tinyvllm.ops import reference
from tinyvllm.ops._kernels import extension_loaded, has_kernel

HAS_GPU = torch.cuda.is_available()
HAS_OP = extension_loaded() and has_kernel("skinny_gemm")
gpu = pytest.mark.skipif(not (HAS_GPU and HAS_OP), reason="needs a CUDA GPU and tinyvllm._C with skinny_gemm")

# (N, K) of every linear: y[M, N] = x[M, K] @ W[N, K]^T.
LLAMA_1B = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
            "lm_head": (128256, 2048)}
SMOLLM2 = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
MODEL_SHAPES = [("1B " + k, v) for k, v in LLAMA_1B.items()] + [("SmolLM2 " + k, v) for k, v in SMOLLM2.items()]
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def want(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float() @ w.float().t()).to(x.dtype)


def tol(dtype: torch.dtype) -> dict:
    """Both sides sum in float32 and round once: about one unit in the last place apart."""
    return dict(rtol=1.6e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=4e-3, atol=5e-4)


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


# =============================== CPU: the dispatch rule ===============================


@pytest.mark.parametrize("name_nk", MODEL_SHAPES, ids=lambda s: s[0] if isinstance(s, tuple) else s)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_every_model_linear_at_decode_sizes_goes_to_the_skinny_gemm(name_nk, dtype):
    """M <= 8 always; M = 9..16 only with K >= 2048 (SmolLM2's K = 576 measured slower there)."""
    n, k = name_nk[1]
    for m in range(1, 17):
        want = "skinny" if m <= 8 or k >= 2048 else "cublas"
        assert ops.linear_impl(meta(m, k, dtype=dtype), meta(n, k, dtype=dtype)) == want, m


@pytest.mark.parametrize(
    "x, w, reason",
    [
        (meta(17, 2048), meta(3072, 2048), "at most 16"),  # prefill-sized
        (meta(1024, 2048), meta(3072, 2048), "at most 16"),
        (meta(4, 2048, dtype=torch.float32), meta(3072, 2048, dtype=torch.float32), "bfloat16 or float16"),
        (meta(4, 2049), meta(3072, 2049), "multiple of 8"),  # odd K
        (meta(4, 2052), meta(3072, 2052), "multiple of 8"),  # K % 8 == 4
        (meta(4, 2048), meta(2048, 3072).t(), "weight must be contiguous"),
        (meta(4, 2048), meta(3072, 2048, dtype=torch.float16), "weight has dtype"),
        (meta(4, 2048), meta(3072, 2047), "share K"),
        (meta(4, 2048, 1), meta(3072, 2048), "2-D"),
        (torch.empty_strided((4, 64), (65, 1), device="meta", dtype=torch.bfloat16), meta(8, 64), "row stride"),
        (torch.empty_strided((4, 64), (1, 4), device="meta", dtype=torch.bfloat16), meta(8, 64), "dense"),
        (torch.empty_strided((1, 64), (64, 2), device="meta", dtype=torch.bfloat16), meta(8, 64), "dense"),
    ],
)
def test_inputs_the_kernel_cannot_take_go_to_cublas_with_a_reason(x, w, reason):
    assert ops.linear_impl(x, w) == "cublas"
    assert reason in ops.skinny_gemm_unsupported(x, w)


def test_strided_rows_that_are_whole_vectors_stay_on_the_skinny_gemm():
    x = torch.empty_strided((4, 2048), (2048 + 64, 1), device="meta", dtype=torch.bfloat16)
    assert ops.skinny_gemm_unsupported(x, meta(3072, 2048)) is None
    one_row_view = torch.empty_strided((1, 2048), (4096, 1), device="meta", dtype=torch.bfloat16)
    assert ops.skinny_gemm_unsupported(one_row_view, meta(3072, 2048)) is None


def test_misaligned_inputs_are_named():
    buf = torch.zeros(4 * 64 + 8, dtype=torch.bfloat16)
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert buf.data_ptr() % 16 == 0
    x = buf[1 : 1 + 256].view(4, 64)  # starts 2 bytes past a 16-byte boundary
    assert "16-byte boundary" in ops.skinny_gemm_unsupported(x, w)
    assert ops.skinny_gemm_unsupported(buf[8 : 8 + 256].view(4, 64), w) is None  # 16 bytes in: aligned


def test_the_environment_can_send_every_linear_to_cublas(monkeypatch):
    monkeypatch.setattr(ops, "_FORCED_LINEAR_IMPL", "cublas")
    assert ops.linear_impl(meta(1, 2048), meta(2048, 2048)) == "cublas"


def test_linear_runs_the_reference_on_cpu_whatever_impl_says():
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(24, 64).bfloat16()
    for impl in ("auto", "cublas", "skinny"):
        assert torch.equal(ops.linear(x, w, impl=impl), reference.linear(x, w))
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.linear(x, w, impl="fast")


@pytest.mark.skipif(not HAS_OP, reason="extension without skinny_gemm")
def test_skinny_gemm_meta_shape_and_cpu_rejection():
    y = torch.ops.tinyvllm.skinny_gemm(meta(5, 64), meta(96, 64))
    assert y.shape == (5, 96) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    with pytest.raises(RuntimeError, match="share K"):
        torch.ops.tinyvllm.skinny_gemm(meta(5, 64), meta(96, 72))
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        torch.ops.tinyvllm.skinny_gemm(meta(17, 64), meta(96, 64))
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        torch.ops.tinyvllm.skinny_gemm(torch.randn(4, 64).bfloat16(), torch.randn(8, 64).bfloat16())


# =============================== GPU ===============================


def randn(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def skinny(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The op on memory that held NaN just before (the caching allocator hands the freed block
    back), so an output element the kernel forgets to write cannot pass."""
    torch.full((x.shape[0], w.shape[0]), float("nan"), device="cuda", dtype=x.dtype)  # freed at once
    return torch.ops.tinyvllm.skinny_gemm(x, w)


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name_nk", MODEL_SHAPES, ids=lambda s: s[0] if isinstance(s, tuple) else s)
def test_every_model_linear_matches_the_reference_at_m_1_to_16(name_nk, dtype):
    n, k = name_nk[1]
    w = randn(n, k, dtype=dtype, scale=k**-0.5)
    w_float = w.float()
    for m in range(1, 17):
        x = randn(m, k, dtype=dtype)
        y = skinny(x, w)
        assert y.shape == (m, n) and y.dtype == dtype
        torch.testing.assert_close(y, (x.float() @ w_float.t()).to(dtype), **tol(dtype), msg=lambda s: f"M={m}: {s}")
        # The dispatch rule (ops.linear_impl): the skinny GEMM, except past 8 rows with K < 2048.
        expected = "cublas" if m > 8 and k < 2048 else "skinny"
        assert ops.linear_impl(x, w) == expected
        if expected == "skinny":
            assert torch.equal(ops.linear(x, w), y)  # the dispatch took this kernel


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_tails_in_n_and_k(dtype):
    """N not a multiple of 16 (and below 16), K a multiple of 8 but not of 32, K = 8."""
    for n in (1, 7, 15, 17, 33, 1000):
        for k in (8, 24, 40, 584, 2056):
            w = randn(n, k, dtype=dtype, scale=k**-0.5)
            for m in (1, 3, 8, 9, 16):
                x = randn(m, k, dtype=dtype)
                torch.testing.assert_close(skinny(x, w), want(x, w), **tol(dtype), msg=lambda s: f"{m, n, k}: {s}")


@gpu
def test_strided_rows_of_x():
    """x as a view into wider rows (the row stride a multiple of 8): the kernel reads it in place."""
    w = randn(600, 576, dtype=torch.bfloat16, scale=576**-0.5)
    for extra in (8, 64, 1000):
        for m in (2, 9, 16):
            wide = randn(m, 576 + extra, dtype=torch.bfloat16)
            for offset in (0, extra - 8):  # (a multiple of 8 elements: still 16-byte aligned)
                x = wide[:, offset : offset + 576]
                assert not x.is_contiguous() and ops.linear_impl(x, w) == ("skinny" if m <= 8 else "cublas")
                torch.testing.assert_close(skinny(x, w), want(x, w), **tol(torch.bfloat16))


@gpu
def test_inputs_the_kernel_cannot_take_are_right_through_cublas():
    bf = torch.bfloat16
    cases = [
        (randn(4, 2049, dtype=bf), randn(300, 2049, dtype=bf, scale=0.02)),  # odd K
        (randn(4, 1001, dtype=bf), randn(300, 1001, dtype=bf, scale=0.03)),
        (randn(4, 65, dtype=bf)[:, 1:], randn(300, 64, dtype=bf)),  # misaligned, strided x
        (randn(20, 576, dtype=bf), randn(300, 576, dtype=bf, scale=0.04)),  # M > 16
        (randn(3, 576, dtype=torch.float32), randn(300, 576, dtype=torch.float32, scale=0.04)),  # float32
    ]
    for x, w in cases:
        assert ops.linear_impl(x, w) == "cublas"
        t = dict(rtol=2e-4, atol=2e-4) if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 \
            else dict(rtol=1.6e-2, atol=1.6e-2)
        torch.testing.assert_close(ops.linear(x, w), (x.float() @ w.float().t()).to(x.dtype), **t)
        with pytest.raises(ValueError, match="the skinny GEMM cannot run on these inputs"):
            ops.linear(x, w, impl="skinny")


@gpu
def test_forcing_cublas_gives_the_same_numbers():
    x, w = randn(5, 2048, dtype=torch.bfloat16), randn(3072, 2048, dtype=torch.bfloat16, scale=2048**-0.5)
    torch.testing.assert_close(ops.linear(x, w, impl="cublas"), ops.linear(x, w, impl="skinny"), rtol=1.6e-2, atol=2e-3)


@gpu
def test_empty_sizes():
    bf = torch.bfloat16
    assert skinny(randn(0, 64, dtype=bf), randn(16, 64, dtype=bf)).shape == (0, 16)
    assert skinny(randn(3, 64, dtype=bf), randn(0, 64, dtype=bf)).shape == (3, 0)
    y = skinny(randn(3, 0, dtype=bf), randn(20, 0, dtype=bf))
    assert y.shape == (3, 20) and bool((y == 0).all())  # an empty sum is 0


@gpu
@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_sanitize_subset(dtype):
    """A few small calls through every path of the kernel, for compute-sanitizer (memcheck,
    racecheck): N and K tails, 1 and 2 row groups, strided x, empty sizes."""
    for m, n, k in [(1, 7, 24), (9, 17, 584), (16, 33, 8), (3, 1000, 2056)]:
        x, w = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype, scale=k**-0.5)
        torch.testing.assert_close(skinny(x, w), want(x, w), **tol(dtype))
    x = randn(12, 600, dtype=dtype)[:, 8:584]  # row stride 600, 16 bytes in
    w = randn(40, 576, dtype=dtype, scale=576**-0.5)
    torch.testing.assert_close(skinny(x, w), want(x, w), **tol(dtype))
    assert skinny(randn(0, 64, dtype=dtype), randn(16, 64, dtype=dtype)).shape == (0, 16)
    assert skinny(randn(3, 64, dtype=dtype), randn(0, 64, dtype=dtype)).shape == (3, 0)


@gpu
def test_the_same_inputs_give_the_same_bits():
    """Split-K partial sums meet in shared memory in a fixed order: no run-to-run noise."""
    x, w = randn(8, 8192, dtype=torch.bfloat16), randn(2048, 8192, dtype=torch.bfloat16, scale=0.01)
    assert torch.equal(skinny(x, w), skinny(x, w))


@gpu
def test_capture_in_a_cuda_graph_on_first_use():
    """The first call for a shape (which asks the runtime how many blocks fit an SM) may happen
    during capture, as in the engine's decode graphs."""
    x, w = randn(3, 1032, dtype=torch.bfloat16), randn(777, 1032, dtype=torch.bfloat16, scale=0.03)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.tinyvllm.skinny_gemm(x, w)
    x.copy_(randn(3, 1032, dtype=torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, want(x, w), **tol(torch.bfloat16))


@gpu
def test_opcheck():
    x = randn(5, 576, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.tinyvllm.skinny_gemm.default, (x, randn(96, 576, dtype=torch.bfloat16)))


@gpu
def test_bad_inputs_raise_naming_the_problem():
    bf = torch.bfloat16
    T = torch.ops.tinyvllm
    x, w = randn(4, 64, dtype=bf), randn(8, 64, dtype=bf)
    cases = [
        (lambda: T.skinny_gemm(randn(17, 64, dtype=bf), w), "at most 16 rows"),
        (lambda: T.skinny_gemm(x.float(), w.float()), "must be float16 or bfloat16"),
        (lambda: T.skinny_gemm(x.long(), w.long()), "x must be float32, float16 or bfloat16"),
        (lambda: T.skinny_gemm(x, w.half()), "weight has dtype"),
        (lambda: T.skinny_gemm(x, randn(8, 72, dtype=bf)), "must share K"),
        (lambda: T.skinny_gemm(x[None], w), "x must have 2 dimensions"),
        (lambda: T.skinny_gemm(randn(4, 60, dtype=bf), randn(8, 60, dtype=bf)), "K must be a multiple of 8"),
        (lambda: T.skinny_gemm(x, randn(64, 8, dtype=bf).t()), "weight must be contiguous"),
        (lambda: T.skinny_gemm(randn(4, 65, dtype=bf)[:, 1:], w), "16-byte boundary"),
        (lambda: T.skinny_gemm(randn(4, 68, dtype=bf)[:, :64], w), "multiple of 8 elements"),
        (lambda: T.skinny_gemm(randn(64, 4, dtype=bf).t(), w), "dense inside each row"),
        (lambda: T.skinny_gemm(x, w.cpu()), "weight must be a CUDA tensor"),
    ]
    for call, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            call()
    torch.cuda.synchronize()  # nothing was launched that could fault
