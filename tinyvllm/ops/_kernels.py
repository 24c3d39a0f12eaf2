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
    return True


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
