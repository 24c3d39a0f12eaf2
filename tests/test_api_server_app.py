"""The server app in-process (FastAPI's TestClient) over the toy engine: what happens when the
engine itself fails, which a real server process cannot be made to do on demand."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from engine_helpers import make_fake_engine  # noqa: E402
from tinyvllm.engine.async_llm_engine import AsyncLLMEngine  # noqa: E402
from tinyvllm.entrypoints.openai.api_server import build_app  # noqa: E402


@pytest.fixture
def failing_app():
    """An app whose engine's third model step raises."""
    inner = make_fake_engine(max_model_len=64)
    real_execute = inner.model_runner.execute
    calls = {"n": 0}

    def execute(out):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_execute(out)

    inner.model_runner.execute = execute
    engine = AsyncLLMEngine(inner)
    with TestClient(build_app(engine, ["toy"])) as client:
        yield client, engine


def test_an_engine_failure_is_a_500_error_object_and_the_next_request_succeeds(failing_app):
    client, engine = failing_app
    body = {"prompt": [3, 4, 5], "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == 500 and "illegal memory access" in err["message"] and err["type"] == "internal_server_error"
    ok = client.post("/v1/completions", json=body)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 10
    bm = engine.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert client.get("/health").status_code == 200


def test_an_engine_failure_mid_stream_is_an_error_event(failing_app):
    client, _ = failing_app
    body = {"prompt": [3, 4, 5], "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == 500
    assert all("choices" in json.loads(e) for e in events[:-2])


def test_health_is_503_once_the_engine_is_shut_down():
    engine = AsyncLLMEngine(make_fake_engine())
    with TestClient(build_app(engine, ["toy"])) as client:
        assert client.get("/health").status_code == 200
        client.portal.call(engine.shutdown)
        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"prompt": [3], "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == 503


def test_a_stream_whose_client_left_before_its_first_byte_is_aborted():
    """The request is added to the engine by the handler, before its response starts: a client
    gone before the response's first byte (the body never read) must still abort it."""
    import asyncio

    inner = make_fake_engine(max_model_len=64)
    body = json.dumps({"prompt": [3, 4, 5], "max_tokens": 60, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()  # fmt: skip
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}  # fmt: skip

    async def main():
        engine = AsyncLLMEngine(inner)
        app = build_app(engine, ["toy"])
        received = []

        async def receive():
            if not received:
                received.append(1)
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()

        async def send(message):
            if message["type"] == "http.response.start":  # the socket is gone: the first write fails
                while not engine.num_steps:  # (the request is already running)
                    await asyncio.sleep(0.005)
                raise OSError("connection reset by peer")

        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 - Starlette reports the disconnect its own way
            pass
        at_disconnect = len(inner.model_runner.batches)
        for _ in range(200):
            if not inner.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return at_disconnect

    at_disconnect = asyncio.run(main())
    ran = [step for step in inner.model_runner.batches if any(r.startswith("cmpl") for r, _ in step)]
    assert at_disconnect >= 1 and ran, "the request never ran before the client left"
    assert len(ran) <= at_disconnect + 1 < 60, "the request ran on after its client left"
    bm = inner.block_manager
    assert not inner.has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks


def test_a_refused_prompt_aborts_the_prompts_added_before_it():
    """A multi-prompt completion is added prompt by prompt in the handler: if the engine refuses a
    later prompt at once, the earlier ones (already running) are aborted and the refusal is a 400."""
    import asyncio

    from tinyvllm import SamplingParams
    from tinyvllm.entrypoints.openai.metrics import ServerMetrics
    from tinyvllm.entrypoints.openai.serving_engine import OpenAIError, OpenAIServing

    inner = make_fake_engine(max_model_len=64)

    async def main():
        engine = AsyncLLMEngine(inner)
        serving = OpenAIServing(engine, ["toy"], ServerMetrics(engine))
        real_add = engine.add_request

        def add_request(prompt, params, request_id, **kw):
            if request_id.endswith("-1"):
                raise ValueError("prompt 1 is refused")
            return real_add(prompt, params, request_id, **kw)

        engine.add_request = add_request
        prompts = [{"prompt": None, "prompt_token_ids": [3, 4, 5]}, {"prompt": None, "prompt_token_ids": [6]}]
        with pytest.raises(OpenAIError) as err:
            serving.add_requests(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), ["c-0", "c-1"])
        for _ in range(200):
            if not inner.has_unfinished_requests() and not engine._streams:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return err.value

    err = asyncio.run(main())
    assert err.status == 400 and "prompt 1 is refused" in err.message
    ran = [step for step in inner.model_runner.batches if any(r == "c-0" for r, _ in step)]
    assert len(ran) <= 1, "the first prompt ran on after the second was refused"
    bm = inner.block_manager
    assert not inner.has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks
