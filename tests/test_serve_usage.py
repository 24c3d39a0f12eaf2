"""What a response's usage reports beyond the token counts (vLLM's options): with
`serve --enable-prompt-tokens-details` the prompt tokens the prefix cache served
(`usage.prompt_tokens_details.cached_tokens`, OpenAI's field), and with
`stream_options.continuous_usage_stats` the usage so far in every streamed chunk. On a tiny random
Llama on the CPU."""

from __future__ import annotations

import pytest

from engine_helpers import make_tiny_llama
from server_helpers import serve

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

PROMPT = list(range(5, 45))  # 40 tokens: two full blocks of 16, then 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    with serve(model, "--max-model-len", "96", "--num-kv-blocks", "48", "--enable-prompt-tokens-details",
               tmp_dir=tmp_path_factory.mktemp("serve")) as s:  # fmt: skip
        yield s


def test_usage_reports_the_prompt_tokens_the_prefix_cache_served(server):
    body = {"prompt": PROMPT, "max_tokens": 2, "ignore_eos": True}
    first = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["usage"]
    second = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["usage"]
    assert first["prompt_tokens"] == second["prompt_tokens"] == 40
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["prompt_tokens_details"] == {"cached_tokens": 32}  # (its two full blocks)
    chat = {"messages": [{"role": "user", "content": "the same conversation twice"}], "max_tokens": 2}
    usages = [httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).json()["usage"] for _ in range(2)]
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] == 16 * (usages[1]["prompt_tokens"] // 16)


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "count"}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "count"}]})])  # fmt: skip
def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(server, path, body):
    body = body | {"max_tokens": 5, "ignore_eos": True, "stream": True,
                   "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    import json

    chunks = []
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    with_text = [c for c in chunks if c["choices"] and (c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content"))]
    assert with_text and all(c["usage"] is not None for c in with_text)
    counts = [c["usage"]["completion_tokens"] for c in with_text]
    assert counts == sorted(counts) and chunks[-1]["usage"]["completion_tokens"] == 5 and not chunks[-1]["choices"]
