"""The model's generation_config.json sets the sampling defaults of what a request leaves unset, as in
vLLM (``--generation-config auto``, its default): ``LLM.get_default_sampling_params()`` and
``generate`` without SamplingParams, and a server request without temperature or max_tokens;
"vllm" turns it off; a folder of its own may stand in. On a tiny random Llama on the CPU."""

from __future__ import annotations

import json
import shutil

import pytest

from engine_helpers import make_tiny_llama
from tinyvllm import LLM, SamplingParams
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.generation_config import load_sampling_defaults

ENGINE = dict(device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=64)
# what a model's creators ship: the sampling fields vLLM reads, and others it does not
SHIPPED = {"temperature": 0.0, "max_new_tokens": 3, "top_k": 5, "do_sample": True, "bos_token_id": 1,
           "transformers_version": "4.46.0"}  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    (path / "generation_config.json").write_text(json.dumps(SHIPPED))
    return str(path)


def test_the_sampling_fields_are_read_by_samplingparams_names(model, tmp_path):
    assert load_sampling_defaults(model) == {"temperature": 0.0, "top_k": 5, "max_tokens": 3}
    assert load_sampling_defaults(model, "vllm") == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0.9, "repetition_penalty": 1.1}))
    assert load_sampling_defaults(model, str(tmp_path)) == {"top_p": 0.9, "repetition_penalty": 1.1}
    assert load_sampling_defaults(str(tmp_path / "model.gguf")) == {}  # (a GGUF ships none)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        load_sampling_defaults(model, str(tmp_path / "bad"))
    (tmp_path / "bad" / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match="generation_config.json: temperature "):
        load_sampling_defaults(model, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="^generation_config "):
        EngineConfig(model, device="cpu", generation_config=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="^generation_config "):
        EngineConfig(model, device="cpu", generation_config=None)


def test_llm_without_sampling_params_samples_as_the_model_recommends(model):
    llm = LLM(model=model, **ENGINE)
    default = llm.get_default_sampling_params()
    assert (default.temperature, default.top_k, default.max_tokens) == (0.0, 5, 3)
    greedy = llm.generate("hello", SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    got = llm.generate("hello", use_tqdm=False)[0].outputs[0]
    assert got.token_ids == greedy.token_ids and len(got.token_ids) == 3
    plain = LLM(model=model, generation_config="vllm", **ENGINE).get_default_sampling_params()
    assert (plain.temperature, plain.top_k, plain.max_tokens) == (SamplingParams().temperature, SamplingParams().top_k, 16)


def test_a_server_request_takes_the_models_defaults_for_what_it_leaves_unset(model, tmp_path):
    httpx = pytest.importorskip("httpx")
    from server_helpers import serve

    greedy = LLM(model=model, **ENGINE).generate("hello", SamplingParams(temperature=0, max_tokens=3),
                                                 use_tqdm=False)[0].outputs[0]  # fmt: skip
    chat = {"messages": [{"role": "user", "content": "hello"}], "ignore_eos": True}
    with serve(model, "--max-model-len", "64", "--num-kv-blocks", "64", tmp_dir=tmp_path) as server:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hello"}, timeout=60).json()
        assert r["usage"]["completion_tokens"] == 16  # (a completion's max_tokens is 16 unless given: OpenAI's)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=60).json()
        assert r["choices"][0]["text"] == greedy.text  # temperature unset: the model's 0, greedy
        r = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).json()
        assert r["usage"]["completion_tokens"] == 3  # max_tokens unset: the model's max_new_tokens
        r = httpx.post(server.url + "/v1/chat/completions", json=chat | {"max_tokens": 5}, timeout=60).json()
        assert r["usage"]["completion_tokens"] == 5
        assert "generation config" in server.log_text()
    plain = tmp_path / "plain"
    shutil.copytree(model, plain)
    with serve(plain, "--max-model-len", "64", "--num-kv-blocks", "64", "--generation-config", "vllm",
               tmp_dir=tmp_path) as server:  # fmt: skip
        r = httpx.post(server.url + "/v1/chat/completions", json=chat | {"temperature": 0}, timeout=60).json()
        assert r["usage"]["completion_tokens"] > 3  # no max_tokens: until the model's length
