"""AsyncLLMEngine: the LLMEngine driven by one background task, for a server's many clients.

    engine = AsyncLLMEngine.from_config(EngineConfig(max_model_len=2048))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=8), request_id="r0"):
        print(out.outputs[0].text)          # the text so far; out.finished on the last one

Every client coroutine calls :meth:`generate` (or :meth:`add_request`, which adds the request at
once and returns its :class:`RequestStream`) and gets its own stream of RequestOutputs. One
background task, the *engine loop*, owns the LLMEngine:

    while there is work:
        take the requests that arrived and the aborts that were asked for since the last step
        in the engine thread: add_request(...) each, abort_request(...) each, then step()
        hand each RequestOutput to its request's queue (a finished one closes the stream)
    then sleep until a request arrives

So requests join the running batch at the next step (continuous batching does the rest), and a
request that is aborted (its client disconnected: the generator is closed or cancelled) leaves
the batch, with its KV blocks freed, before the next step runs.

Why a thread: ``LLMEngine.step()`` ends with the one device->host copy of the sampled ids, which
waits for the GPU. Called on the event loop it would freeze every connection for the whole step,
so it runs in one dedicated worker thread (always the same one: a CUDA context and the
engine's state are touched from one thread only) while the event loop keeps accepting requests,
streaming chunks and noticing disconnects. The loop touches the LLMEngine only from that thread,
and only one step is ever in flight.

With the engine in its own process (``engine_process=True``, what ``tinyvllm serve`` runs;
tinyvllm/engine/engine_core.py) there is nothing to wait for in a thread: ``generate`` and
``abort`` write the request or the abort down the pipe at once (the engine process takes it before
its next step), and the loop awaits the steps' outputs on the event loop itself, woken by the
thread that reads the pipe. An output crosses one thread boundary on its way to its stream, not two.

An exception from a step fails the requests that were in the engine (each stream raises
:class:`EngineError`), frees their blocks, and the loop keeps serving new requests.
:meth:`shutdown` ends every open stream with :class:`EngineShutdownError`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.gc_heap import frozen_heap
from tinyvllm.engine.llm_engine import LLMEngine, PromptType
from tinyvllm.outputs import RequestOutput
from tinyvllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("tinyvllm")


class EngineError(RuntimeError):
    """The engine failed while this request was in it (a server answers 500)."""


class EngineShutdownError(RuntimeError):
    """The engine is shutting down; the request was ended (a server answers 503)."""


class RequestStream:
    """One request's RequestOutputs as the engine makes them (an async iterator, the last one
    finished). ``close()`` / ``aclose()`` before the last output aborts the request: its blocks are
    freed before the next step. (A class, not an async generator: closing a generator that never
    started runs none of its code, and a request added early must be abortable before it is read.)

    When this reader is behind (several steps' outputs queued), they come out as one: a cumulative
    output holds everything the earlier ones did, so only the newest counts; DELTA outputs are
    added up. So a slow consumer costs one item per turn of the event loop, not one per step
    (vLLM's output collector merges the same way)."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, queue: asyncio.Queue, kind: Any) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine, self._queue, self._kind = engine, queue, kind

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        queue, kind = self._queue, self._kind
        while not queue.empty() and not isinstance(item, BaseException) and kind != RequestOutputKind.FINAL_ONLY:
            newer = queue.get_nowait()
            item = newer if kind == RequestOutputKind.CUMULATIVE or isinstance(newer, BaseException) \
                else item.add(newer)  # fmt: skip
        if isinstance(item, BaseException):
            self.finished = True  # the engine already dropped it
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Abort the request unless its last output came (or it failed); idempotent."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()


@dataclass
class _NewRequest:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    prompt_token_ids: list[int] | None = None


@dataclass
class _Work:
    """What the engine thread does before its next step (filled on the event loop)."""

    new: list[_NewRequest] = field(default_factory=list)
    aborts: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.new or self.aborts)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}  # open requests: their output queues
        self._work = _Work()
        self._wake: asyncio.Event | None = None  # set when work arrives (made on the running loop)
        self._loop_task: asyncio.Task | None = None
        self._shutdown = False
        # One thread, always the same: the LLMEngine (and the CUDA context) is touched from it only.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinyvllm-engine")
        # An engine in its own process is driven from the event loop itself (its calls only write
        # to a pipe; its step_async() awaits the outputs): see _engine_process_loop.
        self._direct = hasattr(engine, "step_async")
        self.num_steps = 0
        self._lock = threading.Lock()  # guards the stats snapshot, written by the engine thread
        self._stats = self._read_stats()

    @classmethod
    def from_config(cls, config: EngineConfig, *, engine_process: bool = False) -> "AsyncLLMEngine":
        """``engine_process``: the LLMEngine in a process of its own (tinyvllm/engine/engine_core.py:
        what ``tinyvllm serve`` uses, so that the HTTP work never holds the engine's steps back);
        else in this process, stepped by the engine thread."""
        if engine_process:
            from tinyvllm.engine.engine_core import EngineCoreClient

            return cls(EngineCoreClient(config))
        return cls(LLMEngine.from_config(config))

    @classmethod
    def from_model(cls, model: str | None = None, *, engine_process: bool = False, **kwargs: Any) -> "AsyncLLMEngine":
        return cls.from_config(EngineConfig(model, **kwargs), engine_process=engine_process)

    # ---- the clients' side (event loop) ------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def default_sampling(self) -> dict[str, Any]:
        """The model's sampling defaults for fields a request leaves unset (its generation config)."""
        return self.engine.default_sampling

    @property
    def is_running(self) -> bool:
        """The loop runs (and an engine process, if any, is alive): what /health answers."""
        alive = getattr(self.engine, "is_alive", None)
        return self._loop_task is not None and not self._loop_task.done() and (alive is None or alive())

    def start(self) -> None:
        """Start the engine loop on the running event loop (``generate`` does it on first use)."""
        if self._shutdown:
            raise EngineShutdownError("the engine has been shut down")
        if not self.is_running:
            if self._direct:
                self.engine.attach(asyncio.get_running_loop())
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_engine_loop(), name="tinyvllm-engine-loop")

    def add_request(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        prompt_token_ids: list[int] | None = None,
    ) -> RequestStream:
        """Add a request now and return its stream of RequestOutputs (vLLM V1's
        ``AsyncLLM.add_request``): the engine takes it before its next step whether or not the
        stream is being read yet. Closing the stream before the last output aborts the request.

        A server adds a request as soon as its handler has checked it, not when its response
        starts streaming: between the two lie several turns of the event loop, and when a
        thousand requests arrive at once each turn is long (each request's every stage runs in
        turn), so a lazy add left the engine stepping half-empty batches for hundreds of ms.
        Raises ValueError/TypeError for a value the engine refuses at once, :class:`EngineError`
        if the engine process is gone."""
        self.start()
        request_id = str(request_id)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        if self._direct:  # straight down the pipe: the engine process takes it before its next step
            try:
                self.engine.add_request(request_id, prompt, sampling_params, prompt_token_ids=prompt_token_ids)
            except (ValueError, TypeError):  # a caller's bad value (as the engine's own refusals)
                raise
            except Exception as e:  # noqa: BLE001 - the engine process is gone
                raise EngineError(f"the engine failed: {type(e).__name__}: {e}") from e
        else:
            self._work.new.append(_NewRequest(request_id, prompt, sampling_params, prompt_token_ids))
        self._streams[request_id] = queue
        self._wake.set()
        return RequestStream(self, request_id, queue, getattr(sampling_params, "output_kind", None))

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield this request's RequestOutputs as the engine makes progress; the last is finished.

        The request is added at the first ``__anext__`` (:meth:`add_request` adds it at once).
        Closing the generator early (``break``, the consuming task cancelled: a client that went
        away) aborts the request. A request the engine refuses raises ValueError/TypeError from the
        first ``__anext__``; an engine failure raises :class:`EngineError`.
        """
        stream = self.add_request(prompt, sampling_params, request_id, prompt_token_ids=prompt_token_ids)
        async with aclosing(stream):
            async for out in stream:
                yield out

    def abort(self, request_id: str) -> None:
        """Stop a request: it leaves the batch (blocks freed) before the next step. Unknown ids are ignored."""
        if self._streams.pop(request_id, None) is not None:
            if self._direct:
                self._abort_now([request_id])
                return
            pending = [r for r in self._work.new if r.request_id == request_id]
            if pending:  # its client left before it was even added: it never reaches the engine
                self._work.new.remove(pending[0])
                return
            self._work.aborts.add(request_id)
            if self._wake is not None:
                self._wake.set()

    def get_stats(self) -> dict[str, int]:
        """A snapshot for /metrics: requests waiting and running, KV blocks total and free."""
        if getattr(self.engine, "live_stats", False):  # an engine process: its last step's numbers
            return self._read_stats()
        with self._lock:
            return dict(self._stats)

    def _read_stats(self) -> dict[str, int]:
        return self.engine.scheduler_stats() | {"num_open_streams": len(self._streams), "num_steps": self.num_steps}

    async def shutdown(self) -> None:
        """End every open stream with EngineShutdownError, abort its request, stop the loop."""
        if self._shutdown:
            return
        self._shutdown = True
        err = EngineShutdownError("the server is shutting down; the request was ended")
        for queue in self._streams.values():
            queue.put_nowait(err)
        if self._direct:
            self._abort_now(list(self._streams))
        else:
            self._work.aborts.update(self._streams)
        self._streams.clear()
        if self._wake is not None:
            self._wake.set()
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._loop_task), timeout=10.0)
            except (asyncio.TimeoutError, Exception):  # a stuck step: do not hang the shutdown
                logger.warning("tinyvllm: the engine loop did not stop within 10 s")
        try:  # (in the engine thread, after the loop's last step: stops an engine process, TP workers)
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._executor, self.engine.shutdown), 15.0)
        except Exception:  # noqa: BLE001 - shutting down anyway
            logger.warning("tinyvllm: the engine did not shut down cleanly", exc_info=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- the engine loop (one task) and the engine thread ------------------------------------
    async def _run_engine_loop(self) -> None:
        # The server's start-up heap (and, with the engine in a thread, the engine's) is frozen
        # while the loop runs: no full garbage collection walks it between steps (gc_heap.py).
        with frozen_heap():
            await self._engine_loop()

    def _abort_now(self, request_ids: list[str]) -> None:
        """(An engine process) the aborts straight down the pipe; a dead process has nothing to abort."""
        try:
            self.engine.abort_request(request_ids)
        except Exception:  # noqa: BLE001
            logger.debug("tinyvllm: abort not sent (the engine process is gone)", exc_info=True)

    async def _engine_loop(self) -> None:
        if self._direct:
            return await self._engine_process_loop()
        loop = asyncio.get_running_loop()
        while True:
            if not self._work and not self.engine.has_unfinished_requests():
                if self._shutdown:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            work, self._work = self._work, _Work()
            # The streams this step serves. A stream aborted while the step runs (and maybe replaced
            # by a new request under the same id) must not receive the step's outputs.
            streams = dict(self._streams)
            try:
                outputs, refused = await loop.run_in_executor(self._executor, self._engine_step, work)
            except Exception as e:  # noqa: BLE001 - an engine bug must fail requests, not the server
                logger.exception("tinyvllm: engine step failed")
                await self._fail_all(loop, e, work)
                continue
            self.num_steps += 1
            for request_id, exc in refused:
                queue = self._streams.pop(request_id, None)
                if queue is not None:
                    queue.put_nowait(exc)
            for out in outputs:
                queue = streams.get(out.request_id)
                if queue is None or self._streams.get(out.request_id) is not queue:
                    continue  # aborted meanwhile: nobody is listening
                queue.put_nowait(out)
                if out.finished:
                    del self._streams[out.request_id]
            if self._shutdown and not self.engine.has_unfinished_requests() and not self._work:
                return

    async def _engine_process_loop(self) -> None:
        """The loop for an engine in its own process: requests and aborts already went down the
        pipe (``generate``, ``abort``); here the steps' outputs come back, awaited on this loop (the
        reader thread wakes it), and go to their streams. No thread of this process waits for them."""
        while True:
            if not self.engine.has_unfinished_requests():
                if self._shutdown:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await self.engine.step_async()
            except Exception as e:  # noqa: BLE001 - an engine failure fails requests, not the server
                logger.exception("tinyvllm: engine step failed")
                await self._fail_all(asyncio.get_running_loop(), e, _Work())
                continue
            self.num_steps += 1
            for request_id, exc in self.engine.pop_refused():
                queue = self._streams.pop(request_id, None)
                if queue is not None:
                    queue.put_nowait(exc)
            # (The client dropped the outputs of aborted requests: every output here belongs to the
            # request now holding its id.)
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is None:
                    continue
                queue.put_nowait(out)
                if out.finished:
                    del self._streams[out.request_id]
            # Let the streams send what they just got before the next step's outputs are taken
            # (step_async does not suspend when outputs are already waiting).
            await asyncio.sleep(0)

    def _engine_step(self, work: _Work) -> tuple[list[RequestOutput], list[tuple[str, BaseException]]]:
        """In the engine thread: apply the aborts, add the new requests, run one step. (Aborts
        first: a client may abort a request and start another under the same id before this runs.
        The aborted requests' final outputs are dropped here: nobody listens to them any more.)"""
        engine = self.engine
        refused = []
        if work.aborts:
            engine.abort_request(list(work.aborts))
            engine._pending = [o for o in engine._pending if o.request_id not in work.aborts]
        for r in work.new:
            try:
                engine.add_request(r.request_id, r.prompt, r.params, prompt_token_ids=r.prompt_token_ids)
            except (ValueError, TypeError) as e:
                refused.append((r.request_id, e))
        outputs = engine.step()
        pop_refused = getattr(engine, "pop_refused", None)  # (an engine process refuses asynchronously)
        if pop_refused is not None:
            refused += pop_refused()
        with self._lock:
            self._stats = self._read_stats()
        return outputs, refused

    async def _fail_all(self, loop: asyncio.AbstractEventLoop, exc: Exception, work: _Work) -> None:
        """A step raised: the requests in the engine (and those this step was adding) fail with
        EngineError and their blocks are freed. Requests that arrived during the step are kept."""
        err = EngineError(f"the engine failed: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        failed = set(self.engine.requests) | {r.request_id for r in work.new}
        for rid in failed:
            queue = self._streams.pop(rid, None)
            if queue is not None:
                queue.put_nowait(err)

        def clean() -> None:
            engine = self.engine
            engine.abort_request(list(engine.requests))
            engine._pending.clear()  # the abort outputs: their streams already have the error
            with self._lock:
                self._stats = self._read_stats()

        try:
            if self._direct:  # (the pipe is written from the event loop only)
                clean()
            else:
                await loop.run_in_executor(self._executor, clean)
        except Exception:  # noqa: BLE001
            logger.exception("tinyvllm: could not clean up after the failed step")
