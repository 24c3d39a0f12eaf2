"""`tinyvllm serve` on the real default model (SmolLM2-135M-Instruct, its real tokenizer and chat
template): a reply with multi-byte characters streams in chunks that are each whole UTF-8 text
(no U+FFFD from a character cut between two tokens) and join to the non-streamed reply."""

from __future__ import annotations

import pytest

from server_helpers import serve

openai = pytest.importorskip("openai")


def test_streamed_chat_with_multibyte_text_joins_to_the_whole_reply(smollm2_path, tmp_path):
    with serve(smollm2_path, "--max-model-len", "256", "--served-model-name", "smol", tmp_dir=tmp_path) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        kw = dict(model="smol", max_tokens=24, temperature=0,
                  messages=[{"role": "user", "content": "Write three emoji that describe the sea, then one word in Japanese."}])  # fmt: skip
        whole = client.chat.completions.create(**kw).choices[0].message.content
        chunks = [c.choices[0].delta.content for c in client.chat.completions.create(stream=True, **kw)
                  if c.choices and c.choices[0].delta.content]  # fmt: skip
    assert any(ord(ch) > 0x7FF for ch in whole), f"the reply has no multi-byte character to test: {whole!r}"
    assert "".join(chunks) == whole and len(chunks) > 3
    assert not any("\ufffd" in c for c in chunks)
