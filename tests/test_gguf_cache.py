"""The fast start: a GGUF parsed once, then read from its converted copy in the cache
(tinyvllm/gguf_cache.py), and a folder holding only a .gguf loads it.

A tiny GGUF with a sentencepiece vocabulary, a chat template and a second end-of-sequence id
goes through the conversion; the copy must give back exactly what the GGUF gives: the same
config, the same weights bit for bit, a tokenizer that encodes, decodes, stops and chats the same.
"""

from __future__ import annotations

import os

import gguf
import pytest
import torch

from fixtures import random_weights, tiny_config_dict, write_gguf
from tinyvllm import gguf_cache
from tinyvllm.config import ModelConfig
from tinyvllm.gguf_loader import load_gguf
from tinyvllm.loader import load_checkpoint, load_model, resolve_model
from tinyvllm.tokenizer import Tokenizer

PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "llo", "hello", "▁hello", "▁w", "or",
          "▁wor", "ld", "▁world", "!", "<|eot|>"]  # fmt: skip
TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
TEXTS = ["hello world!", " hello  world", "héllo wörld 😀", "hello</s>world<|eot|>", ""]


def add_tokenizer(w: gguf.GGUFWriter) -> None:
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(PIECES))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(PIECES) - 1) + [3])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(len(TOKENS) - 1)
    w.add_unk_token_id(0)
    w.add_chat_template(TEMPLATE)


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYVLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYVLLM_GGUF_CACHE", raising=False)
    config = ModelConfig.from_dict(tiny_config_dict(vocab_size=len(TOKENS)))
    (tmp_path / "models").mkdir()
    return write_gguf(tmp_path / "models" / "tiny.gguf", config, random_weights(config, seed=3),
                      gguf.GGMLQuantizationType.Q4_1, metadata=add_tokenizer)


def count_parses(monkeypatch) -> list[str]:
    """Every gguf.GGUFReader built from now on (the slow part of reading a GGUF)."""
    opened = []
    real = gguf_cache.open_gguf

    def counting(path):
        opened.append(str(path))
        return real(path)

    monkeypatch.setattr(gguf_cache, "open_gguf", counting)
    return opened


def assert_same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    for text in TEXTS:
        assert a.encode(text) == b.encode(text), text
        assert a.decode(a.encode(text)) == b.decode(b.encode(text)), text
    assert a.eos_token_ids == b.eos_token_ids and a.bos_token_id == b.bos_token_id
    conv = [{"role": "user", "content": "hello"}]
    assert a.apply_chat_template(conv) == b.apply_chat_template(conv)


def test_first_start_parses_once_and_keeps_a_copy_that_later_starts_read(tiny_gguf, monkeypatch, capsys):
    want_config, want_weights = load_gguf(tiny_gguf, torch.float32)
    want_tok = Tokenizer.from_gguf(tiny_gguf)
    assert want_tok.eos_token_ids == [2, len(TOKENS) - 1]  # the eot id is an end of sequence too

    opened = count_parses(monkeypatch)
    config, weights, tok = gguf_cache.load_gguf_model(tiny_gguf, torch.float32)
    assert opened == [str(tiny_gguf)]  # once, for the weights and the tokenizer together
    target = gguf_cache.converted_dir(tiny_gguf)
    assert f"converted tiny.gguf into {target}" in capsys.readouterr().err
    assert sorted(os.listdir(target)) == ["config.json", "generation_config.json", "model.safetensors",
                                          "tokenizer.json", "tokenizer_config.json"]  # fmt: skip

    config2, weights2, tok2 = gguf_cache.load_gguf_model(tiny_gguf, torch.float32)
    assert opened == [str(tiny_gguf)]  # not parsed again
    assert capsys.readouterr().err == ""  # said once, the first time
    for cfg, w, t in ((config, weights, tok), (config2, weights2, tok2)):
        assert cfg == want_config
        assert w.keys() == want_weights.keys()
        assert all(torch.equal(w[n], want_weights[n]) for n in w)  # float32 keeps the dequantized values exactly
        assert_same_tokenizer(t, want_tok)
    _, half, _ = gguf_cache.load_gguf_model(tiny_gguf, torch.bfloat16)
    assert all(torch.equal(half[n], want_weights[n].to(torch.bfloat16)) for n in half)


def test_an_edited_gguf_gets_a_new_copy_and_a_damaged_copy_is_replaced(tiny_gguf, capsys):
    gguf_cache.load_gguf_model(tiny_gguf, torch.float32)
    first = gguf_cache.converted_dir(tiny_gguf)
    st = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert gguf_cache.converted_dir(tiny_gguf) != first
    second = gguf_cache.converted_dir(tiny_gguf)
    gguf_cache.load_gguf_model(tiny_gguf, torch.float32)
    (second / "model.safetensors").write_bytes(b"\0" * 100)
    capsys.readouterr()
    _, weights, _ = gguf_cache.load_gguf_model(tiny_gguf, torch.float32)
    err = capsys.readouterr().err
    assert "is damaged" in err and "converted tiny.gguf" in err
    assert torch.equal(weights["model.norm.weight"], load_gguf(tiny_gguf)[1]["model.norm.weight"])


def test_no_copy_when_turned_off(tiny_gguf, monkeypatch, capsys):
    monkeypatch.setenv("TINYVLLM_GGUF_CACHE", "0")
    opened = count_parses(monkeypatch)
    gguf_cache.load_gguf_model(tiny_gguf, torch.float32)
    assert opened == [str(tiny_gguf)] and not gguf_cache.converted_dir(tiny_gguf).exists()
    assert capsys.readouterr().err == ""


def test_a_folder_holding_only_a_gguf_loads_it(tiny_gguf):
    folder = tiny_gguf.parent
    assert resolve_model(str(folder)) == str(tiny_gguf)
    config, weights = load_checkpoint(folder)
    want_config, want_weights = load_gguf(tiny_gguf)
    assert config == want_config and torch.equal(weights["lm_head.weight"], want_weights["lm_head.weight"])
    assert load_model(folder)[0] == want_config
    (folder / "other.gguf").write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"holds 2 .gguf files \(other.gguf, tiny.gguf\) and no config.json: pass one"):
        resolve_model(str(folder))


def test_smollm2_converted_copy_is_the_gguf(smollm2_path, smollm2_checkpoint, smollm2_tokenizer):
    """The default model read from its converted copy (made now if the cache has none) equals the GGUF."""
    config, weights, tok = gguf_cache.load_gguf_model(smollm2_path, torch.float32)
    want_config, want_weights = smollm2_checkpoint
    assert config == want_config and weights.keys() == want_weights.keys()
    assert all(torch.equal(weights[n], want_weights[n]) for n in weights)
    for text in ["The capital of France is", "def f(x):\n    return x ** 2  # 😀", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == smollm2_tokenizer.encode(text)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(conv) == smollm2_tokenizer.apply_chat_template(conv)
    assert tok.eos_token_ids == smollm2_tokenizer.eos_token_ids
