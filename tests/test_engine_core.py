"""The engine in its own process (EngineCoreClient, what `tinyvllm serve` runs): the same tokens and
text as offline LLM.generate for concurrent streams, each output kind as asked (cumulative, delta,
final), a refused request failing its own stream only, aborts freeing blocks, and the process gone
after shutdown. On a tiny random Llama on the CPU (float32)."""

from __future__ import annotations

import asyncio
import os
import pickle
import queue
import signal
import threading
import time

import pytest

from engine_helpers import make_tiny_llama
from tinyvllm import LLM, SamplingParams
from tinyvllm.engine.async_llm_engine import AsyncLLMEngine
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.outputs import RequestOutput
from tinyvllm.sampling_params import RequestOutputKind

ENGINE = dict(device="cpu", dtype="float32", max_model_len=128, max_num_seqs=8, num_kv_blocks=64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def test_streams_through_the_engine_process_match_offline_and_end_clean(model):
    prompts = [[5 + i, 9, 12 + i][: 1 + i % 3] for i in range(10)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 2 * i, ignore_eos=True) for i in range(10)]
    want = LLM(model=model, **ENGINE).generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    async def main():
        engine = AsyncLLMEngine.from_config(EngineConfig(model, **ENGINE), engine_process=True)

        async def run(i, kind=RequestOutputKind.CUMULATIVE):
            p = params[i].clone()
            p.output_kind = kind
            return [o async for o in engine.generate({"prompt_token_ids": prompts[i]}, p, f"r{i}")]

        kinds = [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY]
        results = await asyncio.gather(*(run(i, kinds[i % 3]) for i in range(10)))
        bad = SamplingParams(logprobs=10**6)  # more than the vocabulary: refused in the engine's process
        with pytest.raises(ValueError, match="logprobs must be at most the vocabulary size"):
            async for _ in engine.generate([5, 6], bad, "bad"):
                pass
        # an abort frees its blocks: leave a long request after its first output
        gen = engine.generate([7, 8], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True), "left")
        await gen.__anext__()
        await gen.aclose()
        # the same id again at once: it must not inherit the aborted request's outputs in flight
        again = [o async for o in engine.generate({"prompt_token_ids": prompts[0]}, params[0], "left")]
        for _ in range(200):
            stats = engine.get_stats()
            if stats["num_requests_running"] == 0 and stats["num_free_kv_blocks"] == stats["num_kv_blocks"]:
                break
            await asyncio.sleep(0.02)
        proc = engine.engine._proc
        await engine.shutdown()
        return results, stats, proc, again

    results, stats, proc, again = asyncio.run(main())
    assert again[-1].outputs[0].token_ids == want[0].outputs[0].token_ids and again[-1].prompt_token_ids == prompts[0]
    for i, outs in enumerate(results):
        kind = [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY][i % 3]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        if kind == RequestOutputKind.FINAL_ONLY:
            assert len(outs) == 1
        total = outs[0]
        for o in outs[1:]:
            total = total.add(o) if kind == RequestOutputKind.DELTA else o
        assert total.outputs[0].token_ids == want[i].outputs[0].token_ids, i
        assert total.outputs[0].text == want[i].outputs[0].text
        assert total.prompt_token_ids == prompts[i]
    assert stats["num_requests_running"] == 0 and stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    assert not proc.is_alive()


def test_an_engine_that_cannot_start_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="the engine failed to start"):
        AsyncLLMEngine.from_config(EngineConfig(str(tmp_path / "no-such-model"), device="cpu"), engine_process=True)


def test_a_dead_engine_process_fails_requests_and_health(model):
    from tinyvllm.engine.async_llm_engine import EngineError

    async def main():
        engine = AsyncLLMEngine.from_config(EngineConfig(model, **ENGINE), engine_process=True)
        engine.start()
        assert engine.is_running
        engine.engine._proc.kill()
        engine.engine._proc.join(10)
        with pytest.raises(EngineError, match="the engine process is gone"):
            async for _ in engine.generate([5, 6], SamplingParams(max_tokens=3), "after"):
                pass
        running = engine.is_running
        await engine.shutdown()
        return running

    assert asyncio.run(main()) is False  # /health answers 503


class _SlowServerConn:
    """A stand-in for the engine's end of the pipe whose server reads no step until released: a
    step's send blocks (a full pipe). Records what the engine sends, and sees the engine go idle."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sent: list[tuple] = []
        self.release, self.idle = threading.Event(), threading.Event()
        self.received = 0
        r, self.full_pipe = os.pipe()
        os.set_blocking(self.full_pipe, False)
        try:
            while True:
                os.write(self.full_pipe, b"x" * 65536)
        except BlockingIOError:
            pass
        self._keep = r  # (the read end stays open, unread)

    def poll(self, timeout: float | None = 0) -> bool:
        if timeout is None:  # the engine has no work: it sleeps until the server writes
            if self.received:  # (after the request came: it is done)
                self.idle.set()
            while self.inbox.empty():
                time.sleep(0.01)
        return not self.inbox.empty()

    def recv(self) -> tuple:
        self.received += 1
        return self.inbox.get()

    def send(self, msg: tuple) -> None:
        if msg[0] != "ready":
            self.release.wait(60)
        self.sent.append(msg)

    def send_bytes(self, data: bytes) -> None:  # (a message the engine pickled itself)
        self.send(pickle.loads(data))

    def fileno(self) -> int:  # a pipe with no room: the engine must not write from its own thread
        return self.full_pipe


def test_the_engine_steps_on_while_the_server_reads_late(model):
    """engine_core_main sends through a thread of its own: with the server not reading (the first
    send blocked), the engine still runs its request to the end and goes idle; once the server
    reads, every step's output arrives, in order. (Run in this process's main thread: the engine's
    loop sets a signal handler. It also freezes the heap for good, which the test undoes.)"""
    from tinyvllm.engine import gc_heap
    from tinyvllm.engine.engine_core import engine_core_main

    conn = _SlowServerConn()
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    conn.inbox.put(("add", "r", {"prompt_token_ids": [5, 6, 7]}, params, None))
    ran_while_blocked = []

    def server() -> None:
        try:
            ran_while_blocked.append(conn.idle.wait(20))  # the request finished while nothing was read
            conn.release.set()
            deadline = time.time() + 60
            while not any(m[0] == "step" and any(RequestOutput.from_wire(o).finished for o in m[1])
                          for m in list(conn.sent)):
                if time.time() > deadline:
                    break
                time.sleep(0.01)
        finally:  # (whatever happened here, the engine's loop ends)
            conn.inbox.put(("stop",))

    sigint = signal.getsignal(signal.SIGINT)
    depth = gc_heap._depth
    t = threading.Thread(target=server, daemon=True)
    t.start()
    try:
        engine_core_main(EngineConfig(model, **ENGINE), conn)
        t.join(30)
    finally:
        signal.signal(signal.SIGINT, sigint)
        while gc_heap._depth > depth:
            gc_heap.thaw_heap()
    assert ran_while_blocked == [True]
    assert conn.sent[0][0] == "ready"
    deltas = [RequestOutput.from_wire(o) for m in conn.sent[1:] if m[0] == "step" for o in m[1]]
    assert sum(len(o.outputs[0].token_ids) for o in deltas) == 12
    assert [o.finished for o in deltas] == [False] * (len(deltas) - 1) + [True]


def test_outputs_of_the_engine_process_reach_the_event_loop_without_a_waiting_thread(model):
    """With the engine in its own process, requests go down the pipe from the event loop and the
    outputs come up to it from the pipe's reader thread: no thread of the server's process blocks
    on the engine's steps (the engine thread of the in-process engine is never started), and the
    first output is the same as offline."""
    want = LLM(model=model, **ENGINE).generate([{"prompt_token_ids": [5, 6, 7]}],
                                               SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                                               use_tqdm=False)[0]

    async def main():
        engine = AsyncLLMEngine.from_config(EngineConfig(model, **ENGINE), engine_process=True)
        outs = [o async for o in engine.generate({"prompt_token_ids": [5, 6, 7]},
                                                 SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), "r")]
        threads = [t.name for t in threading.enumerate()]
        await engine.shutdown()
        return outs, threads

    outs, threads = asyncio.run(main())
    for t in threading.enumerate():  # (the pipe closed: the readers end; let them go before later tests)
        if t.name == "tinyvllm-engine-reader":
            t.join(10)
    assert outs[-1].outputs[0].token_ids == want.outputs[0].token_ids
    assert "tinyvllm-engine-reader" in threads
    assert not [name for name in threads if name.startswith("tinyvllm-engine_")], threads  # (the executor's)


class _BusyEngineProcess:
    """An engine-process client whose outputs are always already waiting: ``step_async`` returns
    without suspending, one token for request "r" per call, ``steps`` of them."""

    live_stats = True

    def __init__(self, steps: int) -> None:
        self.steps, self.requests = steps, {}
        self._pending: list = []

    def attach(self, loop) -> None:
        pass

    def add_request(self, request_id, prompt, params, *, prompt_token_ids=None) -> None:
        self.requests[request_id] = params

    def abort_request(self, request_id) -> None:
        self.requests.clear()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def pop_refused(self) -> list:
        return []

    def scheduler_stats(self) -> dict:
        return {}

    async def step_async(self) -> list:
        from tinyvllm.outputs import CompletionOutput

        self.steps -= 1
        done = self.steps == 0
        if done:
            self.requests.clear()
        return [RequestOutput("r", None, [1], [CompletionOutput(0, "x", [7])], finished=done)]


def test_the_engine_process_loop_lets_the_streams_run_between_steps():
    """Outputs already waiting at every step (a busy engine, a slow server): each step's output
    still reaches its stream before the next step's is taken: a cumulative stream, which keeps only
    the newest of the outputs waiting for it, gets every step's (without the loop yielding it would
    wake once, after the last step, with one output)."""

    async def main():
        engine = AsyncLLMEngine(_BusyEngineProcess(steps=5))
        params = SamplingParams(max_tokens=5, output_kind=RequestOutputKind.CUMULATIVE)
        outs = [o async for o in engine.generate([1], params, "r")]
        await engine.shutdown()
        return outs

    outs = asyncio.run(main())
    assert len(outs) == 5 and [o.finished for o in outs] == [False] * 4 + [True]


def test_stream_interval_thins_a_streams_outputs_and_keeps_its_tokens(model):
    """``stream_interval=4`` in the engine's process (`tinyvllm serve --stream-interval 4`): a
    cumulative stream grows by multiples of 4 tokens after its first (one output may carry
    several, when the server reads late), and ends with exactly offline's tokens and text."""
    params = SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True)
    want = LLM(model=model, **ENGINE).generate([{"prompt_token_ids": [5, 9, 12]}], params, use_tqdm=False)[0]

    async def main():
        engine = AsyncLLMEngine.from_config(EngineConfig(model, stream_interval=4, **ENGINE), engine_process=True)
        try:
            return [o async for o in engine.generate({"prompt_token_ids": [5, 9, 12]}, params, "r")]
        finally:
            await engine.shutdown()

    outs = asyncio.run(main())
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths[0] == 1 and lengths[-1] == 18 and len(outs) <= 1 + 18 // 4 + 1
    assert all((n - 1) % 4 == 0 for n in lengths[1:-1]), lengths
    assert outs[-1].outputs[0].token_ids == want.outputs[0].token_ids and outs[-1].outputs[0].text == want.outputs[0].text


def test_text_made_on_the_servers_side_equals_the_engines_own(smollm2_path):
    """The engine process detokenizes only the requests with stop strings; the others' text is made
    by the client from the token ids. On the real tokenizer (multi-byte characters, EOS ending the
    reply) every request's text, ids and finish equal offline LLM.generate's, whose engine made it."""
    from tinyvllm.engine.engine_core import configure_engine_process
    from tinyvllm.engine.llm_engine import LLMEngine

    engine_kw = dict(device="cpu", dtype="float32", max_model_len=256, max_num_seqs=8, num_kv_blocks=96)
    offline = LLM(model=smollm2_path, **engine_kw)
    chat = offline.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Write three emoji that describe the sea, then one word in Japanese."}],
        add_generation_prompt=True)  # fmt: skip
    # a stop id that greedy decoding of "The sea is" surely meets: its 4th token
    stop_id = offline.generate("The sea is", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids[3]
    prompts = [chat, chat, chat, "The sea is", "The sea is", "The sea is", chat]
    params = [
        SamplingParams(temperature=0, max_tokens=48),  # ends with EOS
        SamplingParams(temperature=0, max_tokens=48, stop=["sea"]),  # a stop string: the engine's text
        SamplingParams(temperature=1.0, seed=7, max_tokens=20, n=2),
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]),  # its token is no text ...
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id], include_stop_str_in_output=True),
        SamplingParams(temperature=0.9, seed=11, max_tokens=30, output_kind=RequestOutputKind.DELTA),
        SamplingParams(temperature=0, max_tokens=48, include_stop_str_in_output=True),
    ]
    want = offline.generate(prompts, params, use_tqdm=False)
    assert any(ord(ch) > 0x7FF for ch in want[0].outputs[0].text), want[0].outputs[0].text
    assert want[0].outputs[0].finish_reason == "stop" and want[3].outputs[0].stop_reason == stop_id
    assert want[3].outputs[0].text != want[4].outputs[0].text  # (the stop token has text)

    # The engine process's LLMEngine: no text for a request without stop strings, text for one with.
    engine = LLMEngine.from_config(EngineConfig(smollm2_path, **engine_kw))
    configure_engine_process(engine)
    delta = SamplingParams(temperature=0, max_tokens=6, output_kind=RequestOutputKind.DELTA)
    engine.add_request("plain", "The sea is", delta)
    engine.add_request("stops", "The sea is", SamplingParams(temperature=0, max_tokens=6, stop=["zzz"],
                                                             output_kind=RequestOutputKind.DELTA))  # fmt: skip
    sent = {"plain": [], "stops": []}
    while engine.has_unfinished_requests():
        for w in engine.step():
            out = RequestOutput.from_wire(w)
            sent[out.request_id].append((out.outputs[0].text, out.outputs[0].token_ids))
    assert all(text == "" for text, _ in sent["plain"]) and sum(len(ids) for _, ids in sent["plain"]) == 6
    assert "".join(text for text, _ in sent["stops"]) != ""

    async def main():
        server = AsyncLLMEngine.from_config(EngineConfig(smollm2_path, **engine_kw), engine_process=True)

        async def run(i):
            outs = [o async for o in server.generate(prompts[i], params[i], f"r{i}")]
            total = outs[0]
            for o in outs[1:]:
                total = total.add(o) if params[i].output_kind == RequestOutputKind.DELTA else o
            return total

        try:
            return await asyncio.gather(*(run(i) for i in range(len(prompts))))
        finally:
            await server.shutdown()

    for i, (got, w) in enumerate(zip(asyncio.run(main()), want)):
        assert [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in got.outputs] == \
            [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in w.outputs], i  # fmt: skip


class _GatedConn:
    """A pipe's engine end for _Outbox: records each message and the thread that wrote it; the
    first ``send`` waits for ``gate`` (a server reading late); ``fileno`` is a pipe with room."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple]] = []
        self.gate = threading.Event()
        self._r, self._w = os.pipe()

    def fileno(self) -> int:
        return self._w

    def send(self, msg: tuple) -> None:
        if not self.sent:
            self.gate.wait(20)
        self.sent.append((threading.current_thread().name, msg))

    def send_bytes(self, data) -> None:
        self.send(pickle.loads(data))


def test_the_engine_writes_a_small_step_itself_unless_something_is_queued_ahead():
    """_Outbox: a step of a few outputs, with nothing queued and room in the pipe, is written by
    the engine's own thread (no wait for the sender thread to get the interpreter lock); behind a
    queued message (a big step, a server reading late) small ones queue too, and all arrive in order."""
    from tinyvllm.engine.engine_core import _Outbox

    conn = _GatedConn()
    box = _Outbox(conn)
    small = [("step", [("s", [k], "")], [], {}) for k in range(5)]
    big = ("step", [(f"r{i}", [1], "") for i in range(_Outbox.DIRECT_MAX_OUTPUTS + 1)], [], {})
    box.send(big)  # more outputs than a direct write takes: the thread writes it (and waits at the gate)
    for msg in small:
        box.send(msg)
    conn.gate.set()
    box.close()
    assert [m for _, m in conn.sent] == [big] + small and box.num_direct == 0
    assert {name for name, _ in conn.sent} == {"tinyvllm-engine-sender"}
    idle = _GatedConn()
    idle.gate.set()
    box = _Outbox(idle)
    for msg in small:
        box.send(msg)
    box.close()
    assert idle.sent == [(threading.current_thread().name, m) for m in small] and box.num_direct == 5
