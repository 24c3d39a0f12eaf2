"""The tensor-parallel process group: who am I (rank), how many are we (world size), how we talk.

    init_distributed_environment(world_size=2, rank=r, distributed_init_method="tcp://127.0.0.1:29500")
    init_distributed_environment()      # under torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT

Two groups over the same ranks, as in vLLM's GroupCoordinator:
- the DEVICE group carries the tensors of the forward pass (all-reduces, the logits gather, the
  step's packed inputs): NCCL on GPUs (each rank on GPU ``local_rank``), gloo on CPU;
- the CPU group (gloo) carries the few host integers that announce each step (its kind and
  sizes), so the ranks learn them without a device->host sync on rank 0. On CPU it is the same
  group.

One process holds at most one tensor-parallel group (a module-level state, like vLLM's): the
engine with ``tensor_parallel_size > 1`` initialises it in its own process (rank 0) and in each
worker; ``destroy_distributed_environment`` tears it down so that another engine can start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a collective may wait for a peer before it raises instead of hanging (a rank that died
# is usually noticed much sooner: gloo sees the closed socket, the engine sees the dead process).
DEFAULT_TIMEOUT_S = 300.0


@dataclass
class TensorParallelGroup:
    rank: int
    world_size: int
    local_rank: int
    backend: str  # "nccl" or "gloo": the device group's
    device: torch.device  # where this rank's model lives
    device_group: dist.ProcessGroup
    cpu_group: dist.ProcessGroup


_TP: TensorParallelGroup | None = None


def init_distributed_environment(
    world_size: int = -1,
    rank: int = -1,
    distributed_init_method: str | None = None,
    local_rank: int = -1,
    backend: str | None = None,
    *,
    store: dist.Store | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TensorParallelGroup:
    """Join (or create) the tensor-parallel group; return it.

    With ``world_size``/``rank`` left at -1 everything comes from torchrun's environment
    (``env://``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Otherwise give
    ``distributed_init_method`` ("tcp://host:port") or a ``store``. ``backend``: None picks
    NCCL when CUDA is available, else gloo.
    """
    global _TP
    if _TP is not None or dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialized in this process")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("the nccl backend needs CUDA GPUs, and none is available: use gloo (device='cpu')")
    if world_size == -1 or rank == -1:  # torchrun
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"env:// initialisation needs the environment variables {missing} (torchrun sets them)")
        world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        distributed_init_method = "env://"
    if local_rank == -1:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if store is None and distributed_init_method is None:
        raise ValueError("give distributed_init_method ('tcp://host:port' or 'env://') or a store")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # before the group: NCCL binds each rank to its GPU
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout = timedelta(seconds=timeout_s)
    kwargs = dict(backend=backend, world_size=world_size, rank=rank, timeout=timeout)
    if backend == "nccl":
        kwargs["device_id"] = device  # eager NCCL init, bound to this GPU
    if store is not None:
        dist.init_process_group(store=store, **kwargs)
    else:
        dist.init_process_group(init_method=distributed_init_method, **kwargs)
    world = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else world
    _TP = TensorParallelGroup(rank, world_size, local_rank, backend, device, world, cpu_group)
    return _TP


def model_parallel_is_initialized() -> bool:
    return _TP is not None


def get_tp_group() -> TensorParallelGroup:
    if _TP is None:
        raise RuntimeError("the tensor-parallel group is not initialized (init_distributed_environment)")
    return _TP


def get_tensor_model_parallel_rank() -> int:
    """This process's rank (0 when no group is initialized)."""
    return 0 if _TP is None else _TP.rank


def get_tensor_model_parallel_world_size() -> int:
    """Ranks in the group (1 when no group is initialized)."""
    return 1 if _TP is None else _TP.world_size


def destroy_distributed_environment() -> None:
    """Leave the group (idempotent), so that this process may join another one later."""
    global _TP
    _TP = None
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to tear down cleanly
            pass
