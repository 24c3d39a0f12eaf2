"""`tinyvllm serve --chat-template` (vLLM's flag): chat requests are rendered with the server's
template, given as a file or inline, instead of the model's; a request brings its own only when the
server trusts it (`--trust-request-chat-template`); a bad template stops the server at start-up
with one line. On a tiny random Llama on the CPU."""

from __future__ import annotations

import pytest

from engine_helpers import make_tiny_llama
from server_helpers import serve

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

TEMPLATE = "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def tokenize(server, body: dict) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_the_servers_template_renders_the_chat_and_a_request_brings_its_own_only_if_trusted(model, tmp_path):
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    chat = {"messages": MESSAGES, "max_tokens": 2}
    with serve(model, "--max-model-len", "64", "--num-kv-blocks", "32", "--chat-template", str(tmp_path / "t.jinja"),
               tmp_dir=tmp_path) as server:  # fmt: skip
        want = tokenize(server, {"prompt": "<<hi>>", "add_special_tokens": False})
        assert tokenize(server, {"messages": MESSAGES}) == want  # (the file's template, not the model's)
        r = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).json()
        assert r["usage"]["prompt_tokens"] == len(want)
        r = httpx.post(server.url + "/v1/chat/completions", json=chat | {"chat_template": "{{ 'x' }}"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
    inline = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    with serve(model, "--max-model-len", "64", "--num-kv-blocks", "32", "--chat-template", TEMPLATE,
               "--trust-request-chat-template", tmp_dir=tmp_path) as server:  # fmt: skip
        assert tokenize(server, {"messages": MESSAGES}) == want  # (inline)
        r = httpx.post(server.url + "/v1/chat/completions", json=chat | {"chat_template": inline}, timeout=60).json()
        assert r["usage"]["prompt_tokens"] == len(tokenize(server, {"prompt": "[hi]", "add_special_tokens": False}))


@pytest.mark.parametrize("value, match", [("no/such/template.jinja", "no such file"),
                                          ("{% for m in messages %}", "does not compile")])  # fmt: skip
def test_a_bad_chat_template_is_one_line_at_start_up(value, match):
    from tinyvllm.entrypoints.openai.api_server import load_chat_template

    with pytest.raises(ValueError, match=match):
        load_chat_template(value)


def test_continue_final_message_goes_on_with_the_assistants_begun_reply(model, tmp_path):
    from tinyvllm.tokenizer import Tokenizer

    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, here"}]
    want = Tokenizer.from_pretrained(model).apply_chat_template(conv, add_generation_prompt=False, tokenize=True,
                                                                continue_final_message=True)  # fmt: skip
    body = {"messages": conv, "max_tokens": 2, "continue_final_message": True, "add_generation_prompt": False}
    with serve(model, "--max-model-len", "64", "--num-kv-blocks", "32", tmp_dir=tmp_path) as server:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want), r.text
        r = httpx.post(server.url + "/v1/chat/completions", json=body | {"add_generation_prompt": True}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"
