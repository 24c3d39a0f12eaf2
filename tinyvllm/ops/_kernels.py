"""Finding the compiled extension ``tinyvllm._C`` and deciding when to use it."""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def extension_loaded() -> bool:
    """True when ``tinyvllm._C`` imported (it registers ``torch.ops.tinyvllm.*``)."""
    try:
        from tinyvllm import _C  # noqa: F401
    except ImportError:
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shape-only ("fake") versions of the ops, for torch.compile, graph tracing and opcheck.

    The in-place ops write into tensors the caller passed, so their fake version does
    nothing; ``linear`` and ``skinny_gemm`` allocate their output, so their fake versions
    say what shape and dtype that output has.
    """
    in_place = [
        "rms_norm",
        "fused_add_rms_norm",
        "rotary_embedding",
        "silu_and_mul",
        "reshape_and_cache",
        "rotary_embedding_and_cache",
        "paged_attention_decode",
        "prefill_attention",
    ]
    for name in in_place:
        if hasattr(torch.ops.tinyvllm, name):
            torch.library.register_fake(f"tinyvllm::{name}")(_nothing)

    @torch.library.register_fake("tinyvllm::linear")
    def _linear_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-D")
        torch._check(
            x.shape[1] == weight.shape[1],
            lambda: f"x [M, K] and weight [N, K] must share K: x {tuple(x.shape)}, weight {tuple(weight.shape)}",
        )
        return x.new_empty((x.shape[0], weight.shape[0]))

    if hasattr(torch.ops.tinyvllm, "skinny_gemm"):  # (absent from extensions built before it)

        @torch.library.register_fake("tinyvllm::skinny_gemm")
        def _skinny_gemm_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-D")
            torch._check(
                x.shape[1] == weight.shape[1],
                lambda: f"x [M, K] and weight [N, K] must share K: x {tuple(x.shape)}, weight {tuple(weight.shape)}",
            )
            torch._check(x.shape[0] <= 16, lambda: f"skinny_gemm: x must have at most 16 rows, got {x.shape[0]}")
            return x.new_empty((x.shape[0], weight.shape[0]))


def _nothing(*args: object, **kwargs: object) -> None:
    return None


@functools.lru_cache(maxsize=None)
def has_kernel(name: str) -> bool:
    """True when the extension registered a CUDA kernel for op ``name``."""
    if not extension_loaded():
        return False
    return hasattr(torch.ops.tinyvllm, name)


def use_kernel(name: str, tensor: torch.Tensor) -> bool:
    """Use the CUDA kernel for ``name`` on this input? (GPU tensor, kernel built, not forced off)."""
    if not tensor.is_cuda or os.environ.get("TINYVLLM_REFERENCE_OPS") == "1":
        return False
    return has_kernel(name)
