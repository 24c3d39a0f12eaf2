"""A tensor-parallel worker: one process per rank other than 0, started by the engine.

    worker_main(rank, world_size, port, config, path, error_pipe, parent_pid)   # the process's body

It joins the process group, reads ITS slice of the weights (tinyvllm/loader.py), builds its own
ModelRunner (its KV heads' cache; on a GPU its own CUDA graphs, captured in step with rank 0's),
then replays whatever rank 0 announces, one step at a time (:func:`execute_worker_step`):

    header  = [kind, n, sizes...]   on the CPU group (host ints; rank 0 never waits on its GPU for it)
    payload = the packed int64 inputs, on the device group, straight into place:
              a decode graph's static buffer (then replay that graph) or a fresh tensor
              (then the eager decode or prefill step, unpacked exactly as rank 0 does)

The step's all-reduces pair up with rank 0's inside the model; the lm_head's gather sends this
rank's logits to rank 0. No scheduler, tokenizer or sampler lives here.

It exits on rank 0's STOP, when rank 0's process is gone (it polls its parent: no orphan ever
outlives the engine), or on an error, which it first sends to rank 0 through ``error_pipe`` in
one line, so that the engine's error names the rank and the cause. Ctrl-C is left to rank 0
(the workers ignore SIGINT, and rank 0 stops them).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta

import torch

from tinyvllm.engine.gc_heap import freeze_heap
from tinyvllm.engine.model_runner import STEP_DECODE, STEP_GRAPH, STEP_PREFILL, STEP_STOP, ModelRunner

RENDEZVOUS_KEY = "tinyvllm/worker_up/{rank}"


def _exit_with_parent(parent_pid: int, period_s: float = 0.5) -> None:
    """A daemon thread that ends this process as soon as its parent (rank 0) is gone."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(period_s)

    threading.Thread(target=watch, name="tinyvllm-parent-watch", daemon=True).start()


@torch.no_grad()
def execute_worker_step(runner: ModelRunner) -> bool:
    """Receive one step from rank 0 and run it; False on STOP."""
    from tinyvllm.distributed import broadcast_step_header, broadcast_tensor

    kind, n, *sizes = broadcast_step_header()
    if kind == STEP_STOP:
        return False
    if kind == STEP_GRAPH:
        if runner.graphs is None:
            raise RuntimeError("rank 0 replays a CUDA graph, but this rank captured none")
        bs, width, rows = sizes[:3]
        broadcast_tensor(runner.graphs.inputs[:n])
        runner.graphs.replay(bs, width, rows)
        return True
    packed = torch.empty(n, dtype=torch.int64, device=runner.device)
    broadcast_tensor(packed)
    if kind == STEP_DECODE:
        input_ids, positions, attn = runner.decode_inputs(packed, *sizes[:3])
    elif kind == STEP_PREFILL:
        input_ids, positions, attn = runner.prefill_inputs(packed, *sizes[:6])
    else:
        raise RuntimeError(f"unknown step kind {kind} from rank 0")
    runner.run_model(input_ids, positions, attn)
    return True


def worker_main(rank: int, world_size: int, port: int, config, path: str, error_pipe, parent_pid: int,
                timeout_s: float) -> None:
    """The body of rank ``rank``'s process (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle
    _exit_with_parent(parent_pid)
    import torch.distributed as dist

    from tinyvllm.distributed import destroy_distributed_environment, init_distributed_environment
    from tinyvllm.loader import load_checkpoint

    try:
        backend = "nccl" if config.device.type == "cuda" else "gloo"
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
        store.set(RENDEZVOUS_KEY.format(rank=rank), "1")
        tp = init_distributed_environment(world_size, rank, local_rank=rank, backend=backend, store=store,
                                          timeout_s=timeout_s)
        config.device = tp.device
        model_config, weights = load_checkpoint(path, config.dtype, tp_rank=rank, tp_size=world_size)
        runner = ModelRunner(config, model_config, weights, tp_rank=rank, tp_size=world_size)
        del weights
        freeze_heap(collect=True)  # this process runs only its shard of the model (gc_heap.py)
        while execute_worker_step(runner):
            pass
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, then this process ends
        try:
            error_pipe.send(f"{type(e).__name__}: {e}".splitlines()[0][:500])
        except Exception:
            pass
        os._exit(1)  # no atexit, no NCCL teardown that could wait on a dead peer
    finally:
        destroy_distributed_environment()
