"""The LLMEngine in a process of its own, for the server: ``EngineCoreClient`` (in the server's
process) and ``engine_core_main`` (the engine's process). vLLM calls the same split EngineCore.

Why a process. In one process the HTTP side (a JSON chunk per token per stream, about 100 us of
Python each) and the engine's host work (scheduling, inputs, detokenization) share one interpreter
lock. At 200 streams the event loop's 20 ms of chunks per step starved the engine, and the GPU
waited: the server reached 0.16 of offline throughput (bench/results, row 92). In its own process
the engine steps back to back whatever the server is doing; a slow stream costs the server only.

What crosses the pipe is small. The server sends each request with ``output_kind=DELTA``, so a
step's outputs carry only the new tokens and text (about 4 us each to pickle; a cumulative output
grows with the sequence). And the text, as in vLLM V1, is made on the server's side: the engine
detokenizes only the requests whose stop strings it must check (``engine_needs_text``); for the
others it sends token ids, and this client runs the same incremental detokenizer on them
(``_Tracked.make_text``), in the server's process, while the engine runs its next steps. At 256
running requests that takes about a quarter of the engine's host time per step off it.

The client hands each caller what it asked for: the deltas as they come (what the server asks for),
the cumulative output (the deltas added up each step, ``RequestOutput.add``), or the final output
(the deltas joined once at the end, ``RequestOutput.merge``). When the server falls behind, the
client drains every step that has arrived at once.

Messages (a multiprocessing Pipe, pickled):

    server -> engine  ("add", request_id, prompt, params, prompt_token_ids) | ("abort", [ids]) | ("stop",)
    engine -> server  ("ready", config, vocab_size, tokenizer, stats, default_sampling)   once, after loading
                      ("error", message)                                    instead, if loading failed
                      ("step", outputs, refused, stats)                     after each step; outputs:
                          each a RequestOutput in its wire form (RequestOutput.to_wire: tuples, 20x
                          cheaper to pickle than the objects; the prompt's text in the first only);
                          refused: [(request_id, exception)] that add_request raised (a caller's bad value)
                      ("failed", message, [request ids])                    a step raised; those
                          requests are gone from the engine, the engine goes on
The engine's messages leave through a sender thread (``_Outbox``): stepping never waits on the pipe.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import multiprocessing as mp
import queue
import select
import signal
import sys
import threading
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import Any

from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.gc_heap import freeze_heap
from tinyvllm.engine.request_state import engine_needs_text
from tinyvllm.outputs import RequestOutput
from tinyvllm.sampling_params import RequestOutputKind, SamplingParams
from tinyvllm.tokenizer import IncrementalDetokenizer

logger = logging.getLogger("tinyvllm")


class EngineCoreError(RuntimeError):
    """The engine process failed a step (the requests it held are gone) or died."""


# ---- the engine's process ----------------------------------------------------------------------
class _Outbox:
    """The engine process's sender: a thread that pickles and writes each message, in order, so
    that the engine never waits on a full pipe. A server busy with its streams may read late (its
    reader thread shares the server's interpreter lock); meanwhile the steps' messages queue here
    and the GPU keeps working. vLLM's EngineCore sends from a thread of its own for the same reason.
    (Nothing in a queued message changes after it is queued: each step's outputs are new objects.)

    But a thread hop has a price at low load: the sender needs the interpreter lock, and the
    engine's main thread keeps it through its next step's host work (scheduling, inputs, launches)
    until it blocks on the GPU, up to Python's 5 ms switch interval; every token of a lone stream
    would reach the server one step's host time late. So a small message (a step of a few
    requests) with nothing queued ahead of it is written at once, by the engine's thread, when
    the pipe has room for it: select() calls the pipe (a Unix socket pair) writable only with far
    more room than these few kilobytes, so the write cannot block. Everything else takes the thread."""

    DIRECT_MAX_OUTPUTS = 8  # a step with more outputs is pickled and written by the thread
    DIRECT_MAX_BYTES = 4092  # one page with multiprocessing's 4-byte length header (a plain pipe's PIPE_BUF)

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._writing = threading.Lock()  # held while a message is written (by either thread)
        self._count = threading.Lock()  # guards _queued (held briefly, never during a write)
        self._queued = 0  # messages queued and not yet written
        self.num_direct = 0  # messages written by the engine's own thread (for tests)
        self._thread = threading.Thread(target=self._run, name="tinyvllm-engine-sender", daemon=True)
        self._thread.start()

    def send(self, msg: tuple) -> None:
        if self._error is not None:
            raise BrokenPipeError(f"the server went away: {self._error}")
        if msg[0] != "step" or len(msg[1]) <= self.DIRECT_MAX_OUTPUTS:
            data = ForkingPickler.dumps(msg)
            if len(data) <= self.DIRECT_MAX_BYTES and self._write_now(data):
                return
            msg = data  # (already pickled: the thread writes the bytes)
        with self._count:
            self._queued += 1
        self._queue.put(msg)

    def _write_now(self, data: memoryview) -> bool:
        """Write ``data`` from this thread if nothing is queued ahead of it, no write is under way
        and the pipe has room; False otherwise (the caller queues it)."""
        with self._count:
            if self._queued or not self._writing.acquire(blocking=False):
                return False
        try:
            fileno = getattr(self._conn, "fileno", None)
            if fileno is None or not select.select([], [fileno()], [], 0)[1]:
                return False
            try:
                self._conn.send_bytes(data)
            except (BrokenPipeError, OSError) as e:
                self._error = e
                raise BrokenPipeError(f"the server went away: {e}") from e
            self.num_direct += 1
            return True
        finally:
            self._writing.release()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds), then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (msg := self._queue.get()) is not None:
            try:
                with self._writing:
                    if isinstance(msg, (bytes, memoryview)):
                        self._conn.send_bytes(msg)
                    else:
                        self._conn.send(msg)
            except (BrokenPipeError, OSError) as e:  # the server is gone: the engine's next send says so
                self._error = e
                return
            finally:
                with self._count:
                    self._queued -= 1


def configure_engine_process(engine: Any) -> None:
    """What an engine process changes in its LLMEngine (also what bench/bench_host.py measures):
    outputs in their wire form, and the text left to the client where the engine needs none."""
    engine.wire_outputs = True  # each output as a tuple (RequestOutput.to_wire): 20x cheaper to pickle
    engine.text_in_client = True  # (the client detokenizes: _Tracked.make_text)


def engine_core_main(config: EngineConfig, conn: Any, log_level: int = logging.INFO) -> None:
    """Load the engine, say ready, then step while there is work and wait for messages while there is none."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the whole process group: the server decides
    logging.basicConfig(stream=sys.stderr, format="%(message)s")
    logging.getLogger("tinyvllm").setLevel(log_level)
    from tinyvllm.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine.from_config(config)
    except BaseException as e:  # noqa: BLE001 - the server reports it and exits
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    configure_engine_process(engine)
    freeze_heap(collect=True)  # this process runs only the engine: its start-up heap is never garbage (gc_heap.py)
    conn.send(("ready", engine.config, engine.vocab_size, engine.tokenizer, engine.scheduler_stats(),
               engine.default_sampling))  # fmt: skip
    outbox = _Outbox(conn)
    try:
        while True:
            if not engine.has_unfinished_requests():
                conn.poll(None)  # idle: sleep until the server writes
            refused: list[tuple[str, BaseException]] = []
            while conn.poll(0):  # everything that arrived since the last step
                msg = conn.recv()
                if msg[0] == "stop":
                    return
                if msg[0] == "add":
                    _, rid, prompt, params, ids = msg
                    try:
                        engine.add_request(rid, prompt, params, prompt_token_ids=ids)
                    except (ValueError, TypeError) as e:
                        refused.append((rid, e))
                elif msg[0] == "abort":
                    engine.abort_request(msg[1])
            if not engine.has_unfinished_requests() and not refused:
                continue
            try:
                outputs = engine.step() if engine.has_unfinished_requests() else []
            except Exception as e:  # noqa: BLE001 - fail this step's requests, keep serving
                logger.exception("tinyvllm: engine step failed")
                failed = list(engine.requests)
                engine.abort_request(failed)
                engine._pending.clear()  # (the abort outputs: the server fails those streams itself)
                outbox.send(("failed", f"{type(e).__name__}: {e}", failed))
                continue
            outbox.send(("step", outputs, refused, engine.scheduler_stats()))
    except (EOFError, BrokenPipeError):  # the server went away
        return
    finally:
        outbox.close()
        engine.shutdown()


# ---- the server's side -------------------------------------------------------------------------
@dataclass
class _Tracked:
    kind: RequestOutputKind  # what the caller asked for
    total: RequestOutput | None = None  # CUMULATIVE: the deltas so far, added up
    deltas: list[RequestOutput] = field(default_factory=list)  # FINAL_ONLY: the deltas so far
    prompt: str | None = None  # the prompt's text, from the first output
    # A request whose text is made here (the engine sent token ids only): its params, and each
    # completion's incremental detokenizer, made at its first tokens. None: the engine sent the text.
    params: SamplingParams | None = None
    prompt_token_ids: list[int] | None = None
    detokenizers: dict[int, IncrementalDetokenizer] = field(default_factory=dict)

    def make_text(self, delta: RequestOutput, tokenizer: Any) -> None:
        """Fill in each completion's new text from its new token ids, as the engine would have:
        the same detokenizer fed the same ids, and a token stop (EOS, a stop id; no stop strings
        here) adds no text unless ``include_stop_str_in_output``."""
        if delta.prompt_token_ids is not None:
            self.prompt_token_ids = delta.prompt_token_ids
        for c in delta.outputs:
            if not c.token_ids:
                continue
            detok = self.detokenizers.get(c.index)
            if detok is None:
                detok = self.detokenizers[c.index] = IncrementalDetokenizer(tokenizer, self.prompt_token_ids or [])
            ids = c.token_ids
            if c.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                ids = ids[:-1]  # (the token that stopped it is the delta's last)
            c.text = "".join([detok.step(t) for t in ids])


class EngineCoreClient:
    """What AsyncLLMEngine needs of an LLMEngine (``add_request``, ``abort_request``, ``step``,
    ``has_unfinished_requests``, ``requests``, ``config``, ``tokenizer``, ``vocab_size``, ``is_alive``,
    ``scheduler_stats``, ``default_sampling``), over a pipe to the engine's process. ``step()`` waits for the engine's
    next step (without the interpreter lock) and returns the outputs of every step that arrived."""

    def __init__(self, config: EngineConfig) -> None:
        ctx = mp.get_context("spawn")  # (fork after CUDA or threads is unsafe)
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=engine_core_main, args=(config, child, logging.getLogger("tinyvllm").level),
                                 name="tinyvllm-engine-core", daemon=True)  # fmt: skip
        self._proc.start()
        child.close()
        try:
            msg = self._conn.recv()
        except EOFError:
            msg = ("error", f"the engine process exited with {self._proc.join(5) or self._proc.exitcode}")
        if msg[0] != "ready":
            self._proc.join(5)
            raise RuntimeError(f"the engine failed to start: {msg[1]}")
        _, self.config, self.vocab_size, self.tokenizer, self._stats, self.default_sampling = msg
        # A reader thread empties the pipe as messages come, so the engine never waits on a full
        # pipe while the server is busy; ``step()`` takes them from this queue.
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None  # (see attach())
        self._arrived: asyncio.Event | None = None
        threading.Thread(target=self._read, name="tinyvllm-engine-reader", daemon=True).start()
        self.requests: dict[str, _Tracked] = {}
        self._pending: list[RequestOutput] = []  # (AsyncLLMEngine's clean-up clears it; nothing waits here)
        self._refused: list[tuple[str, BaseException]] = []
        self._draining: set[str] = set()  # aborted here, the engine's last output for them not seen yet

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None, *,
                    prompt_token_ids: list[int] | None = None) -> None:  # fmt: skip
        params = params if params is not None else SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        kind = params.output_kind
        if kind != RequestOutputKind.DELTA:
            params = copy.copy(params)  # (only a field of its own changes: a deep clone cost 26 us a request)
            params.output_kind = RequestOutputKind.DELTA
        self._send(("add", request_id, prompt, params, prompt_token_ids))
        text_here = self.tokenizer is not None and not engine_needs_text(params)
        self.requests[request_id] = _Tracked(kind, params=params if text_here else None)

    def abort_request(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            if self.requests.pop(rid, None) is not None:
                # Its outputs already on their way are dropped until its last one (the abort's), so
                # that a new request under the same id does not inherit them.
                self._draining.add(rid)
        self._send(("abort", ids))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def is_alive(self) -> bool:
        """Whether the engine's process still runs (a server's /health)."""
        return self._proc.is_alive()

    live_stats = True  # scheduler_stats() may be read from any thread, at any time

    def scheduler_stats(self) -> dict[str, int]:
        """The engine's numbers as of its last step: requests waiting and running, KV blocks."""
        return dict(self._stats)

    def pop_refused(self) -> list[tuple[str, BaseException]]:
        """The requests the engine refused since the last call, with add_request's exception."""
        refused, self._refused = self._refused, []
        return refused

    # ---- steps -----------------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver to this event loop: from now on the reader thread wakes ``loop`` as each message
        arrives, and :meth:`step_async` (on that loop) takes the steps: one thread hop from the pipe
        to the event loop instead of two (reader, then a thread blocked in :meth:`step`)."""
        self._arrived = asyncio.Event()
        self._loop = loop

    async def step_async(self) -> list[RequestOutput]:
        """:meth:`step` for the attached event loop: await the engine's next step without blocking
        the loop, then take every step that has arrived."""
        if not self.requests:
            return []
        while self._inbox.empty():
            self._arrived.clear()  # (the reader's set() runs on this loop: it cannot slip in between)
            if self._inbox.empty():
                await self._arrived.wait()
        return self.step()

    def step(self) -> list[RequestOutput]:
        """Wait for the engine's next step, take every step that has arrived, and return one
        output per request that advanced (each delta for a DELTA caller)."""
        if not self.requests:
            return []
        latest: dict[str, RequestOutput] = {}
        deltas: list[RequestOutput] = []
        while True:
            msg = self._recv()
            if msg[0] == "failed":
                raise EngineCoreError(msg[1])
            _, outputs, refused, _ = msg
            for rid, exc in refused:
                self._draining.discard(rid)
                if self.requests.pop(rid, None) is not None:
                    self._refused.append((rid, exc))
            for wire in outputs:
                delta = RequestOutput.from_wire(wire)
                if delta.request_id in self._draining:
                    if delta.finished:
                        self._draining.discard(delta.request_id)
                    continue
                tracked = self.requests.get(delta.request_id)
                if tracked is None:
                    continue  # aborted meanwhile
                if tracked.prompt is None:
                    tracked.prompt = delta.prompt  # (the first output carries it; later ones on the wire do not)
                if tracked.params is not None:
                    tracked.make_text(delta, self.tokenizer)
                if tracked.kind == RequestOutputKind.DELTA:
                    delta.prompt = tracked.prompt
                    deltas.append(delta)  # (as it came: no sum to keep)
                elif tracked.kind == RequestOutputKind.CUMULATIVE:
                    tracked.total = delta if tracked.total is None else tracked.total.add(delta)
                    latest[delta.request_id] = tracked.total
                else:  # FINAL_ONLY: the deltas kept, joined once at the end (not re-added every step)
                    tracked.deltas.append(delta)
                    if delta.finished:
                        latest[delta.request_id] = RequestOutput.merge(tracked.deltas)
                if delta.finished:
                    del self.requests[delta.request_id]
            if self._inbox.empty():
                return deltas + list(latest.values())

    def shutdown(self) -> None:
        """Stop the engine's process (it frees the GPU); idempotent."""
        if self._proc.is_alive():
            try:
                self._send(("stop",))
            except EngineCoreError:
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)

    def _send(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except (BrokenPipeError, OSError) as e:
            raise EngineCoreError(f"the engine process is gone (exit code {self._proc.exitcode})") from e

    def _read(self) -> None:
        """The reader thread: every message into the inbox; the pipe's end as an error."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                msg = ("gone",)
            if msg[0] == "step":
                self._stats = msg[3]  # (live: /metrics reads it between steps the server has not taken)
            self._inbox.put(msg)
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._arrived.set)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass
            if msg[0] == "gone":
                return

    def _recv(self) -> tuple:
        msg = self._inbox.get()
        if msg[0] == "gone":
            self._inbox.put(msg)  # (every later call fails the same way)
            self._proc.join(1)
            raise EngineCoreError(f"the engine process is gone (exit code {self._proc.exitcode})")
        return msg
