"""AsyncLLMEngine: one background loop steps the LLMEngine for many concurrent streams.

Against the toy engine of engine_helpers (FakeRunner: history-dependent logits read back through
the paged cache), so a request that joins, leaves or is aborted mid-batch and disturbs another
shows up as a token mismatch against the same request run alone."""

import asyncio
import time

from engine_helpers import make_fake_engine, run_to_completion
from tinyvllm import SamplingParams
from tinyvllm.engine.async_llm_engine import AsyncLLMEngine, EngineError, EngineShutdownError

GREEDY = dict(temperature=0.0, ignore_eos=True)


async def collect(engine, prompt, params, rid):
    """All outputs of one request; checks each is an extension of the one before."""
    outs = []
    async for out in engine.generate(prompt, params, rid):
        if outs:
            prev = outs[-1].outputs[0]
            assert out.outputs[0].text.startswith(prev.text)
            assert out.outputs[0].token_ids[: len(prev.token_ids)] == prev.token_ids
        outs.append(out)
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    return outs


def test_concurrent_streams_match_offline_and_free_every_block():
    reqs = [(f"r{i}", {"prompt_token_ids": [2 + i, 3, 4 + i % 5][: 1 + i % 3]}, SamplingParams(max_tokens=5 + i, **GREEDY))
            for i in range(12)]  # fmt: skip
    want = run_to_completion(make_fake_engine(), {0: reqs})

    async def main():
        engine = AsyncLLMEngine(make_fake_engine())
        results = await asyncio.gather(*(collect(engine, p, sp, rid) for rid, p, sp in reqs))
        await engine.shutdown()
        return engine, results

    engine, results = asyncio.run(main())
    for (rid, _, _), outs in zip(reqs, results):
        assert outs[-1].outputs[0].token_ids == want[rid].outputs[0].token_ids
        assert outs[-1].outputs[0].text == want[rid].outputs[0].text
    bm = engine.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.engine.has_unfinished_requests()


def test_a_request_joins_the_running_batch():
    async def main():
        engine = AsyncLLMEngine(make_fake_engine())
        gen_a = engine.generate([5, 6], SamplingParams(max_tokens=30, **GREEDY), "a")
        await gen_a.__anext__()  # a is running
        task_b = asyncio.create_task(collect(engine, [7], SamplingParams(max_tokens=4, **GREEDY), "b"))
        rest_a = [o async for o in gen_a]
        await task_b
        await engine.shutdown()
        return engine.engine.model_runner.batches, rest_a

    batches, rest_a = asyncio.run(main())
    assert rest_a[-1].finished and len(rest_a[-1].outputs[0].token_ids) == 30
    assert any({"a", "b"} <= {rid for rid, _ in step} for step in batches), "b never shared a step with a"


def test_closing_a_stream_aborts_its_request_and_frees_blocks_within_one_step():
    async def main():
        engine = AsyncLLMEngine(make_fake_engine(max_model_len=64))
        gen = engine.generate([5, 6, 7], SamplingParams(max_tokens=50, **GREEDY), "gone")
        for _ in range(3):
            await gen.__anext__()
        steps_at_close = len(engine.engine.model_runner.batches)
        await gen.aclose()  # what a disconnected client's cancelled response does
        other = await collect(engine, [9], SamplingParams(max_tokens=3, **GREEDY), "next")
        await engine.shutdown()
        return engine, steps_at_close, other

    engine, steps_at_close, other = asyncio.run(main())
    later = [step for step in engine.engine.model_runner.batches[steps_at_close:] if any(r == "gone" for r, _ in step)]
    assert len(later) <= 1, "the aborted request ran more than the step that was already in flight"
    assert other[-1].finished
    bm = engine.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.engine.requests


def test_the_event_loop_stays_free_while_a_step_blocks():
    """A step that blocks its thread (as a GPU sync does) must not stall other coroutines."""
    inner = make_fake_engine()
    real_execute = inner.model_runner.execute

    def slow_execute(out):
        time.sleep(0.15)  # a long device->host copy
        return real_execute(out)

    inner.model_runner.execute = slow_execute

    async def main():
        engine = AsyncLLMEngine(inner)
        gaps = []
        done = asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        await collect(engine, [3, 4], SamplingParams(max_tokens=4, **GREEDY), "slow")
        done.set()
        await tick
        await engine.shutdown()
        return gaps

    gaps = asyncio.run(main())
    assert max(gaps) < 0.1, f"the event loop was blocked for {max(gaps):.3f} s"


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving():
    inner = make_fake_engine()
    real_execute = inner.model_runner.execute
    calls = {"n": 0}

    def flaky_execute(out):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device fell off the bus")
        return real_execute(out)

    inner.model_runner.execute = flaky_execute

    async def main():
        engine = AsyncLLMEngine(inner)
        try:
            await collect(engine, [3, 4], SamplingParams(max_tokens=10, **GREEDY), "victim")
        except EngineError as e:
            err = e
        else:
            raise AssertionError("the failed step did not fail its request")
        after = await collect(engine, [3, 4], SamplingParams(max_tokens=5, **GREEDY), "after")
        await engine.shutdown()
        return engine, err, after

    engine, err, after = asyncio.run(main())
    assert "device fell off the bus" in str(err)
    assert len(after[-1].outputs[0].token_ids) == 5
    bm = engine.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_refused_and_failed_requests_reach_their_own_stream_only():
    async def main():
        engine = AsyncLLMEngine(make_fake_engine(max_model_len=16))
        ok = asyncio.create_task(collect(engine, [3], SamplingParams(max_tokens=4, **GREEDY), "ok"))
        try:
            async for _ in engine.generate([3], "not params", "bad-type"):
                pass
        except TypeError as e:
            type_error = e
        too_long = await collect(engine, list(range(2, 30)), SamplingParams(max_tokens=4), "too-long")
        good = await ok
        await engine.shutdown()
        return type_error, too_long, good

    type_error, too_long, good = asyncio.run(main())
    assert "SamplingParams" in str(type_error)
    assert too_long[-1].outputs[0].finish_reason == "error" and "longer than" in too_long[-1].error
    assert good[-1].outputs[0].finish_reason == "length"


def test_shutdown_ends_open_streams_with_an_error():
    async def main():
        engine = AsyncLLMEngine(make_fake_engine(max_model_len=64))
        gen = engine.generate([5], SamplingParams(max_tokens=60, **GREEDY), "long")
        await gen.__anext__()
        await engine.shutdown()
        try:
            async for _ in gen:
                pass
        except EngineShutdownError:
            return engine, True
        return engine, False

    engine, raised = asyncio.run(main())
    assert raised
    bm = engine.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.engine.requests


def test_an_id_reused_right_after_its_abort_gets_only_its_own_outputs():
    """Abort a running request and start another under the same id before the next step: the
    aborts go first, and the aborted request's last output does not reach the new stream."""
    want = run_to_completion(make_fake_engine(), {0: [("x", [9, 4], SamplingParams(max_tokens=6, **GREEDY))]})

    async def main():
        engine = AsyncLLMEngine(make_fake_engine())
        old = engine.generate([5, 6], SamplingParams(max_tokens=50, **GREEDY), "x")
        await old.__anext__()
        await old.aclose()
        outs = await collect(engine, [9, 4], SamplingParams(max_tokens=6, **GREEDY), "x")
        await engine.shutdown()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].outputs[0].token_ids == want["x"].outputs[0].token_ids
    assert outs[-1].prompt_token_ids == [9, 4] and outs[-1].outputs[0].finish_reason == "length"


def test_add_request_runs_the_request_before_its_stream_is_read():
    """A server adds a request as soon as it is checked: the engine steps it while nobody reads."""
    async def main():
        engine = AsyncLLMEngine(make_fake_engine())
        stream = engine.add_request({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=6, **GREEDY), "early")
        for _ in range(200):  # (let the loop step it; nothing reads the stream meanwhile)
            if not engine.engine.has_unfinished_requests() and engine.num_steps:
                break
            await asyncio.sleep(0.01)
        steps_unread = engine.num_steps
        outs = [o async for o in stream]  # then read: the outputs waited in the stream
        await engine.shutdown()
        return steps_unread, outs

    steps_unread, outs = asyncio.run(main())
    assert steps_unread >= 1, "the engine never ran the request before its stream was read"
    want = run_to_completion(make_fake_engine(), {0: [("early", {"prompt_token_ids": [5, 6]},
                                                       SamplingParams(max_tokens=6, **GREEDY))]})  # fmt: skip
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == want["early"].outputs[0].token_ids


def test_closing_an_unread_stream_aborts_its_request():
    """The request of a client gone before its response started (its stream never read) is
    aborted by closing the stream: its blocks are freed and it stops running."""
    async def main():
        engine = AsyncLLMEngine(make_fake_engine(max_model_len=64))
        stream = engine.add_request([5, 6, 7], SamplingParams(max_tokens=50, **GREEDY), "unread")
        while not engine.num_steps:
            await asyncio.sleep(0.01)
        stream.close()
        steps_at_close = len(engine.engine.model_runner.batches)
        other = await collect(engine, [9], SamplingParams(max_tokens=3, **GREEDY), "next")
        await engine.shutdown()
        return engine, steps_at_close, other, stream

    engine, steps_at_close, other, stream = asyncio.run(main())
    later = [step for step in engine.engine.model_runner.batches[steps_at_close:] if any(r == "unread" for r, _ in step)]
    assert len(later) <= 1, "the closed stream's request kept running"
    assert other[-1].finished and stream.finished
    bm = engine.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.engine.has_unfinished_requests()
