"""The collectives the tensor-parallel model and engine use (vLLM's names).

- ``tensor_model_parallel_all_reduce``: every rank ends with the SUM of every rank's tensor;
  what follows each row-parallel linear (o_proj, down_proj) and the vocab-parallel embedding.
- ``tensor_model_parallel_all_gather`` / ``tensor_model_parallel_gather``: the ranks' slices
  concatenated along a dimension, on every rank / on rank ``dst`` only (the lm_head's logits
  go to rank 0, where the sampler lives).
- ``broadcast_step_header`` / ``broadcast_tensor``: how rank 0 sends each step's inputs: a
  fixed-size header of host integers on the CPU group, then one packed int64 tensor on the
  device group (no Python objects pickled per step).

With one rank every function returns its input untouched, without calling torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tinyvllm.distributed.parallel_state import get_tp_group

STEP_HEADER_LEN = 8  # int64s: the step's kind, the packed payload's length, then up to 6 sizes


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place; return it."""
    tp = get_tp_group()
    if tp.world_size == 1:
        return x
    dist.all_reduce(x, group=tp.device_group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all), concatenated along ``dim`` in rank order, on every rank."""
    tp = get_tp_group()
    if tp.world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.world_size)]
    dist.all_gather(parts, x, group=tp.device_group)
    return torch.cat(parts, dim=dim)


def tensor_model_parallel_gather(x: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
    """Every rank's ``x`` concatenated along ``dim`` on rank ``dst``; None on the other ranks."""
    tp = get_tp_group()
    if tp.world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.world_size)] if tp.rank == dst else None
    dist.gather(x, parts, dst=dst, group=tp.device_group)
    return torch.cat(parts, dim=dim) if parts is not None else None


def broadcast_step_header(values: list[int] | None = None) -> list[int]:
    """Rank 0 passes up to STEP_HEADER_LEN ints; every rank returns them (padded with 0s)."""
    tp = get_tp_group()
    header = torch.zeros(STEP_HEADER_LEN, dtype=torch.int64)
    if tp.rank == 0:
        if values is None or len(values) > STEP_HEADER_LEN:
            raise ValueError(f"rank 0 must send 1..{STEP_HEADER_LEN} header values, got {values!r}")
        header[: len(values)] = torch.tensor(values, dtype=torch.int64)
    dist.broadcast(header, src=0, group=tp.cpu_group)
    return header.tolist()


def broadcast_tensor(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``x`` from rank ``src`` into ``x`` on every rank (same shape and dtype everywhere), in place."""
    tp = get_tp_group()
    if tp.world_size > 1:
        dist.broadcast(x, src=src, group=tp.device_group)
    return x
