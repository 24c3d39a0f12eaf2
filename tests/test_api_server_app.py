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
