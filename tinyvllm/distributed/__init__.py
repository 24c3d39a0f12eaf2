"""Tensor parallelism's plumbing over torch.distributed (vLLM's names).

    parallel_state.py    the process group: init from rank/world/port or torchrun's env://,
                         NCCL on GPUs and gloo on CPU, plus a gloo group for the step headers
    communication_op.py  tensor_model_parallel_all_reduce / all_gather / gather, the step broadcast
    utils.py             the checks made before any process starts, and the shard arithmetic

Course chapter: docs/course/22-tensor-parallelism.md.
"""

from tinyvllm.distributed.communication_op import (
    broadcast_step_header,
    broadcast_tensor,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
    tensor_model_parallel_gather,
)
from tinyvllm.distributed.parallel_state import (
    destroy_distributed_environment,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    init_distributed_environment,
    model_parallel_is_initialized,
)
from tinyvllm.distributed.utils import check_tensor_parallel, divide, num_kv_heads_per_rank

__all__ = [
    "broadcast_step_header", "broadcast_tensor", "check_tensor_parallel", "destroy_distributed_environment",
    "divide", "get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size",
    "init_distributed_environment", "model_parallel_is_initialized", "num_kv_heads_per_rank",
    "tensor_model_parallel_all_gather", "tensor_model_parallel_all_reduce", "tensor_model_parallel_gather",
]  # fmt: skip
