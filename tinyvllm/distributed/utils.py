"""What tensor parallelism needs of a model, checked before any process starts, and the shard arithmetic.

Megatron-style tensor parallelism splits each attention layer by heads and each MLP by its
intermediate columns, so N ranks need N to divide the attention heads and the intermediate size.
Key/value heads are split too when N divides them; when N exceeds them (a GQA model with 8 KV heads
at N = 16, or 2 KV heads at N = 4) each KV head is REPLICATED on N / num_kv_heads ranks, as vLLM
does: rank r keeps KV head ``r // (N / num_kv_heads)``, which is the head its query heads read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tinyvllm.config import ModelConfig


def divide(numerator: int, denominator: int) -> int:
    """numerator / denominator, which must divide exactly."""
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def num_kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: num_kv_heads / N, or 1 (replicated) when N exceeds them."""
    return max(1, num_kv_heads // tp_size)


def kv_head_range(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """[first, last) KV heads of ``rank`` in the checkpoint's order."""
    if tp_size <= num_kv_heads:
        per = num_kv_heads // tp_size
        return rank * per, (rank + 1) * per
    head = rank // (tp_size // num_kv_heads)  # replicated: the head this rank's query heads read
    return head, head + 1


def check_tensor_parallel(model_config: "ModelConfig", tp_size: int) -> None:
    """A ValueError naming the model's number that ``tensor_parallel_size`` does not divide."""
    if tp_size == 1:
        return
    c = model_config
    if c.num_attention_heads % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} does not divide the model's num_attention_heads "
            f"({c.num_attention_heads}): each rank must hold a whole number of attention heads."
        )
    hk = c.num_key_value_heads
    if (tp_size <= hk and hk % tp_size) or (tp_size > hk and tp_size % hk):
        raise ValueError(
            f"tensor_parallel_size={tp_size} and the model's num_key_value_heads ({hk}): one must divide "
            "the other (KV heads are split across ranks, or replicated when there are fewer of them)."
        )
    if c.intermediate_size % tp_size:
        raise ValueError(
            f"tensor_parallel_size={tp_size} does not divide the model's intermediate_size ({c.intermediate_size})."
        )


def check_devices(tp_size: int, device: torch.device) -> None:
    """On CUDA, one GPU per rank: N may not exceed the visible GPUs."""
    if tp_size > 1 and device.type == "cuda":
        n = torch.cuda.device_count()
        if tp_size > n:
            raise ValueError(
                f"tensor_parallel_size={tp_size} needs {tp_size} GPUs (one per rank), but {n} are visible "
                "(CUDA_VISIBLE_DEVICES)."
            )
