"""`tinyvllm serve` through the official `openai` client and raw HTTP: one real server process
(tiny random Llama, CPU, with an API key) shared by the module.

The oracle is the offline API in this process: ``LLM.generate`` / ``LLM.chat`` on the same model,
greedy, give the text each request must get, whether it is streamed, batched with 63 others, or
sent alone; logprobs are checked against transformers' forward pass."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import httpx
import pytest

from server_helpers import serve
from tinyvllm import SamplingParams

openai = pytest.importorskip("openai")

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 128


def supports(**kw) -> bool:
    """Whether this build's SamplingParams accepts these fields (another branch adds n, logprobs, penalties)."""
    try:
        SamplingParams(**kw)
        return True
    except (TypeError, ValueError):
        return False


needs_n = pytest.mark.skipif(not supports(n=2), reason="SamplingParams has no n yet")
needs_logprobs = pytest.mark.skipif(not supports(logprobs=2), reason="SamplingParams has no logprobs yet")


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    with serve(tiny_llama_dir, "--api-key", KEY, "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "400",
               "--served-model-name", "tiny", tmp_dir=tmp_path_factory.mktemp("serve")) as s:  # fmt: skip
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    from tinyvllm import LLM

    return LLM(model=str(tiny_llama_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=400)


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def offline(llm, prompt, max_tokens, **kw):
    return llm.generate(prompt, greedy(max_tokens, **kw), use_tqdm=False)[0].outputs[0]


# ---- completions and chat ------------------------------------------------------------------------
def test_completion_matches_offline_and_counts_usage(client, llm):
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    want = offline(llm, "Hello there", 12)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    prompt_len = len(llm.get_tokenizer().encode("Hello there"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_len, 12, prompt_len + 12)
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")


def test_streamed_completion_joins_to_the_non_streamed_text(client, llm):
    kw = dict(model="tiny", prompt=[5, 6, 7, 8], max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert whole.choices[0].text == offline(llm, {"prompt_token_ids": [5, 6, 7, 8]}, 20).text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == 4 and not chunks[-1].choices


def test_chat_streamed_and_not_match_offline_chat(client, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    kw = dict(model="tiny", messages=messages, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    want = llm.chat(messages, greedy(16), use_tqdm=False)[0]
    assert whole.choices[0].message.content == want.outputs[0].text
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(want.prompt_token_ids) and whole.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_ends_the_text_before_it_streamed_or_not(client, llm):
    full = offline(llm, "abc", 24).text
    stop = full[8:10]  # a stop string the greedy text surely contains
    want = full[: full.index(stop)]
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=24, temperature=0, stop=stop,
                                            stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_several_prompts_in_one_completion_request(client, llm):
    r = client.completions.create(model="tiny", prompt=["one", "two", "three"], max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [offline(llm, p, 5).text for p in ["one", "two", "three"]]
    assert r.usage.completion_tokens == 15


def test_models_tokenize_detokenize(server, llm):
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    tok = httpx.post(server.url + "/tokenize", headers=AUTH, json={"prompt": "Hello"}).json()
    assert tok["tokens"] == llm.get_tokenizer().encode("Hello") and tok["count"] == len(tok["tokens"])
    back = httpx.post(server.url + "/detokenize", headers=AUTH, json={"tokens": tok["tokens"]}).json()
    assert back["prompt"] == llm.get_tokenizer().decode(tok["tokens"])
    chat = httpx.post(server.url + "/tokenize", headers=AUTH, json={"messages": [{"role": "user", "content": "x"}]}).json()
    assert chat["tokens"] == llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "x"}], tokenize=True)


# ---- n and logprobs (need the features branch; skip until then) ------------------------------------
@needs_n
def test_n_2_returns_two_choices_streamed_and_not(client, llm):
    """n = 2 with a seed (n > 1 needs sampling, as in vLLM): two choices, the same two streamed and
    not, each the offline engine's completion of the same request."""
    from tinyvllm import SamplingParams

    kw = dict(model="tiny", prompt="xy", max_tokens=6, temperature=1.0, seed=3, n=2)
    want = [c.text for c in llm.generate(["xy"], SamplingParams(n=2, seed=3, temperature=1.0, max_tokens=6,
                                                                ignore_eos=True), use_tqdm=False)[0].outputs]
    r = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == want
    assert r.usage.completion_tokens == 12
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(**kw, stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[0], texts[1]] == want
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=4, temperature=1.0, seed=1, extra_body={"ignore_eos": True})  # fmt: skip
    assert sorted(c.index for c in chat.choices) == [0, 1]


@needs_logprobs
def test_completion_logprobs_match_transformers(client, llm, tiny_llama_dir):
    import torch
    from transformers import LlamaForCausalLM

    prompt_ids = [7, 8, 9, 10]
    r = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    lp = r.choices[0].logprobs
    gen = offline(llm, {"prompt_token_ids": prompt_ids}, 6).token_ids
    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + gen])).logits[0].float()
    want = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1).gather(1, torch.tensor(gen)[:, None])[:, 0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.token_logprobs == pytest.approx(want.tolist(), abs=1e-3)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # (at most 3 + the sampled token; fewer when two ids decode to the same text, e.g. lone bytes)
        assert 1 <= len(top) <= 4 and logprob == pytest.approx(max(top.values())) and top[token] == pytest.approx(logprob)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_echo_with_logprobs_scores_the_prompt_as_transformers_does(client, llm, tiny_llama_dir):
    """lm-evaluation-harness's loglikelihood request (echo=True, logprobs=1, max_tokens=1): the
    prompt comes back before the completion, its tokens' logprobs first (the first one None), each
    the model's log-probability of that prompt token given the ones before; streamed, the same."""
    import torch
    from transformers import LlamaForCausalLM

    prompt_ids = [7, 8, 9, 10, 11]
    kw = dict(model="tiny", prompt=prompt_ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    r = client.completions.create(**kw).choices[0]
    gen = offline(llm, {"prompt_token_ids": prompt_ids}, 1)
    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + gen.token_ids])).logits[0].float()
    ids = torch.tensor(prompt_ids[1:] + gen.token_ids)
    want = torch.log_softmax(logits[:-1], -1).gather(1, ids[:, None])[:, 0]
    prompt_text = llm.get_tokenizer().decode(prompt_ids)
    assert r.text == prompt_text + gen.text
    lp = r.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt_ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want.tolist(), abs=1e-3)
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(prompt_text)  # (the completion after the prompt)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.text
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:])
    plain = client.completions.create(model="tiny", prompt="hello", max_tokens=2, temperature=0, echo=True).choices[0]
    assert plain.text.startswith("hello") and plain.logprobs is None


# ---- 64 concurrent streams -----------------------------------------------------------------------------
def test_64_concurrent_streams_match_offline_and_free_every_block(server, llm):
    prompts = [f"#{i}:" for i in range(64)]
    lengths = [3 + (7 * i) % 9 for i in range(64)]
    want = llm.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)

    async def one(client, prompt, n):
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})  # fmt: skip
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths)))

    got = asyncio.run(main())
    assert got == [w.outputs[0].text for w in want]
    m = server.wait_idle()
    assert m["tinyvllm:num_free_kv_blocks"] == m["tinyvllm:num_kv_blocks"] == 400


# ---- disconnects -----------------------------------------------------------------------------------------
def _aborted(m):
    return m.get('tinyvllm:request_success_total{finished_reason="abort"}', 0.0)


def test_a_client_that_disconnects_mid_stream_is_aborted_and_its_blocks_freed(server):
    before = server.wait_idle()
    body = {"model": "tiny", "prompt": "a long story", "max_tokens": 110, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen == 3:
                    break  # leave: closing the response closes the connection
    after = server.wait_idle()
    assert _aborted(after) == _aborted(before) + 1
    generated = after["tinyvllm:generation_tokens_total"] - before["tinyvllm:generation_tokens_total"]
    assert 3 <= generated < 110, "the request ran on after its client left"
    assert after["tinyvllm:num_free_kv_blocks"] == after["tinyvllm:num_kv_blocks"]


def test_a_non_streaming_client_that_gives_up_is_aborted(server):
    before = server.wait_idle()
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 120, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=httpx.Timeout(30, read=0.1))
    after = server.wait_idle()
    assert _aborted(after) == _aborted(before) + 1
    assert after["tinyvllm:generation_tokens_total"] - before["tinyvllm:generation_tokens_total"] < 120
    assert after["tinyvllm:num_free_kv_blocks"] == after["tinyvllm:num_kv_blocks"]


# ---- bad requests --------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("malformed JSON", "/v1/completions", '{"prompt": "x", "max_tokens":', 400, None),
    ("missing prompt", "/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("wrong type", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("wrong type in a list", "/v1/completions", {"prompt": [1, "two"]}, 400, "prompt"),
    ("bad value", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("negative temperature", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ("prompt longer than the model", "/v1/completions", {"prompt": [5] * (MAX_MODEL_LEN + 5)}, 400, "prompt"),
    ("max_tokens too large", "/v1/completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN * 4}, 400, "max_tokens"),
    ("max_tokens zero", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("empty prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("token id out of vocabulary", "/v1/completions", {"prompt": [10**6]}, 400, "prompt"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("message without role", "/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages"),
    ("unknown model in chat", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("unknown path", "/v1/embeddings", {"input": "x"}, 404, None),
]  # fmt: skip


@pytest.mark.parametrize("name, path, body, status, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_its_status_and_error_object_then_the_server_serves_on(server, name, path, body, status, param):
    kw = {"content": body, "headers": {**AUTH, "Content-Type": "application/json"}} if isinstance(body, str) \
        else {"json": body, "headers": AUTH}  # fmt: skip
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == status
    if param is not None:
        assert err["param"] == param, err
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "fine", "max_tokens": 2}, headers=AUTH, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_openai_client_raises_its_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10_000)


@pytest.mark.parametrize("field, value, neutral", [("presence_penalty", 0.5, 0.0), ("frequency_penalty", 0.5, 0.0),
                                                   ("repetition_penalty", 1.2, 1.0), ("logit_bias", {"5": 3.0}, {})])
def test_sampling_fields_this_build_lacks_are_refused_by_name(server, field, value, neutral):
    """Until SamplingParams has the field: asking for it is a 400 naming it; its neutral value is fine."""
    has = field in {f.name for f in dataclasses.fields(SamplingParams)}
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, field: value}, headers=AUTH)
    if has:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == field
        assert "not supported by this build" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, field: neutral}, headers=AUTH)
    assert r.status_code == 200, r.text


# ---- the API key ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_api_key_is_required_on_the_api_but_not_on_health(server, headers):
    for method, path, body in [("get", "/v1/models", None), ("post", "/v1/completions", {"prompt": "x"}),
                               ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                               ("post", "/tokenize", {"prompt": "x"})]:  # fmt: skip
        r = httpx.request(method, server.url + path, json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401, (path, r.text)
    assert httpx.get(server.url + "/health", headers=headers).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_metrics_count_the_prefix_caches_lookups_and_hits(server):
    """Prefix caching is on by default, as offline: the same 40-token prompt twice, the second finds
    its two full blocks of 16 in the cache."""
    before = server.wait_idle()
    for _ in range(2):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": list(range(5, 45)), "max_tokens": 1},
                       headers=AUTH, timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
    after = server.wait_idle()
    assert after["tinyvllm:prefix_cache_queries_total"] - before["tinyvllm:prefix_cache_queries_total"] == 80
    assert after["tinyvllm:prefix_cache_hits_total"] - before["tinyvllm:prefix_cache_hits_total"] == 32


def test_metrics_count_requests_tokens_and_latencies(server):
    before = server.wait_idle()
    httpx.post(server.url + "/v1/completions", json={"prompt": "count me", "max_tokens": 5, "ignore_eos": True},
               headers=AUTH, timeout=30)  # fmt: skip
    after = server.wait_idle()
    assert after["tinyvllm:generation_tokens_total"] - before["tinyvllm:generation_tokens_total"] == 5
    key = 'tinyvllm:request_success_total{finished_reason="length"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["tinyvllm:time_to_first_token_seconds_count"] == before["tinyvllm:time_to_first_token_seconds_count"] + 1
    assert after["tinyvllm:inter_token_latency_seconds_count"] - before["tinyvllm:inter_token_latency_seconds_count"] == 4
    assert after["tinyvllm:kv_cache_usage_perc"] == 0.0
    assert 5 <= after["tinyvllm:engine_steps_total"] - before["tinyvllm:engine_steps_total"] <= 7  # (a prompt step, 4 more)
    # the first token's stages (queue, prefill, delivery), each once, together within the TTFT
    ttft = after["tinyvllm:time_to_first_token_seconds_sum"] - before["tinyvllm:time_to_first_token_seconds_sum"]
    stages = 0.0
    for stage in ("request_queue_time", "request_prefill_time", "first_token_delivery"):
        k = f"tinyvllm:{stage}_seconds"
        assert after[k + "_count"] == before.get(k + "_count", 0) + 1, stage
        stages += after[k + "_sum"] - before.get(k + "_sum", 0)
    assert 0 < stages <= ttft + 0.005  # (two clocks: the engine's wall clock, the server's monotonic one)
