"""MultiprocExecutor: rank 0's handle on the other tensor-parallel ranks (vLLM's name).

    executor = MultiprocExecutor(config, path)   # spawns ranks 1..N-1, joins the group as rank 0
    ...                                          # rank 0's ModelRunner drives them, step by step
    executor.shutdown()                          # or just drop it: a finalizer does the same

Starting: a TCPStore on a free port of 127.0.0.1 (rank 0 is its server), one process per rank
(torch.multiprocessing, ``spawn``: a fresh interpreter, which CUDA needs; each inherits this
process's environment, NCCL_NVLS_ENABLE=0 included). Rank 0 waits for each worker to reach the
rendezvous while watching that it is alive, so a worker that dies while starting is an error
naming it, not a hang; then every rank joins the group (tinyvllm.distributed).

Health: :meth:`check_health` (before every step) raises a RuntimeError naming a dead rank, its
exit code and the error it reported; :meth:`raise_if_dead` turns a failed collective into the
same error. A watcher thread notices a death at once: with NCCL it aborts the group, so that a
rank 0 blocked on the GPU (a collective waiting for a peer that is gone) is released instead of
waiting for the timeout. Every collective also has the group's timeout (DEFAULT_TIMEOUT_S).

Stopping (``shutdown``, the finalizer at garbage collection or at exit): a STOP step if every
worker is alive and waits for a step (not after a step that Ctrl-C cut short), then join, then terminate/kill whatever remains, then
leave the group. The workers also exit by themselves when this process is gone.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import socket
import threading
import time
import weakref
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

from tinyvllm.distributed import init_distributed_environment
from tinyvllm.distributed.parallel_state import DEFAULT_TIMEOUT_S
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.tp_worker import RENDEZVOUS_KEY, worker_main

logger = logging.getLogger("tinyvllm")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Workers:
    """The worker processes and their error pipes; holds no reference to the executor, so that
    the executor's finalizer can call :meth:`shutdown`."""

    def __init__(self) -> None:
        self.procs: list[tuple[int, mp.Process, multiprocessing.connection.Connection]] = []
        self.ready = False  # every rank built its runner: the workers wait for step headers
        self.in_step = False  # rank 0 left a step part-way (Ctrl-C, an error): the workers are inside it
        self.closed = False
        self.backend = "gloo"

    def dead(self) -> tuple[int, mp.Process, multiprocessing.connection.Connection] | None:
        return next((w for w in self.procs if not w[1].is_alive()), None)

    def death_message(self, rank: int, proc: mp.Process, pipe) -> str:
        reason = ""
        try:
            if pipe.poll():
                reason = ": " + pipe.recv()
        except (EOFError, OSError):
            pass
        return (f"tensor parallel worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}{reason}; "
                "the engine cannot continue")

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        from tinyvllm.distributed import broadcast_step_header, destroy_distributed_environment
        from tinyvllm.engine.model_runner import STEP_STOP

        # STOP only to workers that wait for a header: to one inside a step it would pair with that
        # step's collectives and hang; those are terminated below.
        if self.ready and not self.in_step and self.dead() is None:
            try:
                broadcast_step_header([STEP_STOP])
            except Exception:  # a worker died meanwhile: it is terminated below
                pass
        for _, p, _ in self.procs:
            p.join(timeout=5)
        for _, p, _ in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()
        destroy_distributed_environment()


class MultiprocExecutor:
    """Starts ranks 1..N-1, makes this process rank 0, watches them; see the module docstring."""

    def __init__(self, config: EngineConfig, path: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        n = config.tensor_parallel_size
        self.world_size = n
        self._workers = workers = _Workers()
        self._finalizer = weakref.finalize(self, workers.shutdown)
        workers.backend = "nccl" if config.device.type == "cuda" else "gloo"
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (and the children inherit it)
        port = _free_port()
        store = dist.TCPStore("127.0.0.1", port, n, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout_s))
        ctx = mp.get_context("spawn")
        try:
            for rank in range(1, n):
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=worker_main, name=f"tinyvllm-tp-rank{rank}", daemon=True,
                                args=(rank, n, port, config, path, send, os.getpid(), timeout_s))
                p.start()
                send.close()
                workers.procs.append((rank, p, recv))
            keys = [RENDEZVOUS_KEY.format(rank=r) for r in range(1, n)]
            deadline = time.monotonic() + timeout_s
            while not store.check(keys):  # each worker is up, or one died starting: say which
                self.check_health()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tensor parallel workers did not start within {timeout_s:.0f} s")
                time.sleep(0.05)
            self.tp = init_distributed_environment(n, 0, local_rank=0, backend=workers.backend, store=store,
                                                   timeout_s=timeout_s)
        except BaseException:
            self.shutdown()
            raise
        config.device = self.tp.device
        threading.Thread(target=self._watch, args=(workers,), name="tinyvllm-tp-watch", daemon=True).start()

    @staticmethod
    def _watch(workers: _Workers) -> None:
        """Wake when a worker process ends; if the engine did not stop it, log it and (NCCL) abort
        the group so that rank 0 does not wait on its GPU for a peer that is gone."""
        multiprocessing.connection.wait([p.sentinel for _, p, _ in workers.procs])
        if workers.closed:
            return
        rank, proc, _ = workers.dead() or (None, None, None)
        logger.error("tinyvllm: tensor parallel worker rank %s (pid %s) died with exit code %s", rank,
                     getattr(proc, "pid", None), getattr(proc, "exitcode", None))
        if workers.backend == "nccl":
            try:
                from torch.distributed.distributed_c10d import _abort_process_group

                _abort_process_group()
            except Exception:  # older torch, or already torn down: the group's timeout still holds
                pass

    @property
    def in_step(self) -> bool:
        return self._workers.in_step

    @in_step.setter
    def in_step(self, value: bool) -> None:
        self._workers.in_step = value

    def mark_ready(self) -> None:
        """Every rank built its runner: from now on the workers wait for step headers."""
        self._workers.ready = True

    def check_health(self) -> None:
        """A RuntimeError naming the first worker found dead; nothing if all are alive."""
        dead = self._workers.dead()
        if dead is not None:
            raise RuntimeError(self._workers.death_message(*dead))

    def raise_if_dead(self, cause: BaseException, wait_s: float = 5.0) -> None:
        """After a failed collective: if a worker died (waiting up to ``wait_s`` for a dying one to
        exit), raise the error naming it from ``cause``; else return (the caller re-raises)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = self._workers.dead()
            if dead is not None:
                raise RuntimeError(self._workers.death_message(*dead)) from cause
            if time.monotonic() > deadline or self._workers.closed:
                return
            time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [p.pid for _, p, _ in self._workers.procs]

    def shutdown(self) -> None:
        """Stop every worker and leave the group (idempotent)."""
        self._finalizer()
