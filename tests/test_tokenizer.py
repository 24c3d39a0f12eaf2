"""Tokenizer and chat templates against transformers on the same files; incremental detokenization."""

from __future__ import annotations

import jinja2
import pytest

from fixtures import (
    LLAMA3_TOKENIZER_MEMBER,
    LLAMA_MODELS_REQUIREMENT,
    build_llama3_tokenizer_dir,
    fetch_from_pypi_or_skip,
)
from tinyvllm.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world",
    " leading space and  double  spaces",
    "digits 12345 and 3.14159, $100,000",
    "I'm sure they'll say \"don't\".\n\n\tTabs\r\nand CRLF",
    "héllo wörld — naïve café",
    "日本語のテキスト、中文测试",
    "emoji 😀🎉 flags 🇫🇷 family 👨‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks 😀"}],
]  # fmt: skip


@pytest.fixture(scope="module")
def smollm2(smollm2_path, smollm2_tokenizer):
    """Ours and transformers' tokenizer of the real GGUF (conftest.py marks its users smollm2)."""
    from transformers import AutoTokenizer

    return smollm2_tokenizer, AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    model_file = fetch_from_pypi_or_skip(LLAMA_MODELS_REQUIREMENT, LLAMA3_TOKENIZER_MEMBER)
    directory = build_llama3_tokenizer_dir(model_file, tmp_path_factory.mktemp("llama3-tokenizer"))
    return Tokenizer.from_pretrained(directory), PreTrainedTokenizerFast.from_pretrained(str(directory))


def compare(tok: Tokenizer, ref) -> None:
    for text in TEXTS:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                expected = ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
                assert tok.decode(ids, skip_special_tokens=skip) == expected, (text, skip)


def test_smollm2_gguf_matches_transformers(smollm2):
    tok, ref = smollm2
    compare(tok, ref)
    assert tok.bos_token_id == ref.bos_token_id == 1
    assert tok.eos_token_ids == [ref.eos_token_id] == [2]
    assert tok.vocab_size == len(ref) == 49152
    assert tok.encode("12345", add_special_tokens=False) == [33, 34, 35, 36, 37]  # smollm: digits one by one


def test_smollm2_chat_template_matches_transformers(smollm2):
    tok, ref = smollm2
    for chat in CHATS:
        for gen in (True, False):
            text = tok.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            ids = tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
            assert ids == ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_hf_directory_saved_by_transformers(smollm2, tmp_path):
    """transformers 5 writes tokenizer.json + chat_template.jinja; we read that layout too."""
    tok, ref = smollm2
    ref.save_pretrained(tmp_path)
    from_dir = Tokenizer.from_pretrained(tmp_path)
    compare(from_dir, ref)
    assert from_dir.apply_chat_template(CHATS[1]) == tok.apply_chat_template(CHATS[1])
    assert from_dir.eos_token_ids == [2]


def test_llama3_matches_transformers(llama3):
    tok, ref = llama3
    compare(tok, ref)
    assert tok.encode("Hello world") == [128000, 9906, 1917]  # Meta's published ids
    assert tok.bos_token_id == 128000 and tok.vocab_size == 128256
    assert tok.eos_token_ids == [128009, 128001, 128008]  # <|eot_id|>, then generation_config's


def test_llama3_chat_template_matches_transformers(llama3):
    tok, ref = llama3
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    for chat in CHATS:
        for gen in (True, False):
            for kwargs in ({}, {"date_string": "26 Jul 2024"}, {"tools": tools}):
                text = tok.apply_chat_template(chat, add_generation_prompt=gen, **kwargs)
                assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen, **kwargs)
                ids = tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, **kwargs)
                assert ids == ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False, **kwargs)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n")
    assert '"name": "get_weather"' in text  # tojson(indent=4), not HTML-escaped
    two_calls = [{"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": {}}}] * 2}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="single tool-calls"):
        tok.apply_chat_template(two_calls)


@pytest.mark.parametrize("which", [pytest.param("smollm2", marks=pytest.mark.smollm2), "llama3"])
def test_continue_final_message_stops_after_its_content_as_transformers_does(which, request):
    """An assistant reply begun by the caller is continued, not closed: the text ends with its
    content (kept as written, trailing space too, where the template keeps it)."""
    tok, ref = request.getfixturevalue(which)
    for chat in CHATS:
        for begun in ("Sure: {", "Sure: ", "  4"):
            conv = chat + [{"role": "assistant", "content": begun}]
            text = tok.apply_chat_template(conv, add_generation_prompt=False, continue_final_message=True)
            assert text == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=False,
                                                   continue_final_message=True)  # fmt: skip
            assert text.rstrip().endswith(begun.strip())
    with pytest.raises(ValueError, match="add_generation_prompt must be False"):
        tok.apply_chat_template(CHATS[0], continue_final_message=True)
    with pytest.raises(ValueError, match="does not appear"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
                                add_generation_prompt=False, continue_final_message=True)  # fmt: skip


@pytest.mark.parametrize("which", [pytest.param("smollm2", marks=pytest.mark.smollm2), "llama3"])
def test_incremental_detokenizer(which, request):
    tok, _ = request.getfixturevalue(which)
    prompt = tok.encode("Say something:")
    output = "Sure! 😀 日本語 🇫🇷 👨‍👩‍👧 café — done.\n"
    out_ids = tok.encode(output, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.step(t) for t in out_ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == detok.text == tok.decode(out_ids) == output
    assert any(p == "" for p in pieces)  # some emoji really span several tokens


@pytest.mark.parametrize("which", [pytest.param("smollm2", marks=pytest.mark.smollm2), "llama3"])
def test_detokenizer_stream_gives_the_windows_text(which, request, monkeypatch):
    """The fast path (tokenizers' DecodeStream) and the Python window give the same pieces, token
    by token: text with multi-token characters, random ids (special tokens among them), prompts
    of every length, cut inside a character too."""
    import random

    import tinyvllm.tokenizer as tokenizer_module

    if tokenizer_module.DecodeStream is None:
        pytest.skip("this tokenizers has no DecodeStream")
    tok, _ = request.getfixturevalue(which)
    rng = random.Random(0)
    text_ids = tok.encode("Sure! 😀 日本語 🇫🇷 👨‍👩‍👧 café — done.\n<|im_end|> x", add_special_tokens=False)
    cases = [(text_ids[:cut], text_ids[cut:]) for cut in range(0, 12)]
    cases += [([rng.randrange(tok.vocab_size) for _ in range(n)], [rng.randrange(tok.vocab_size) for _ in range(300)])
              for n in (0, 1, 3, 8)]  # fmt: skip
    for skip in (True, False):
        for prompt, generated in cases:
            fast = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
            fast_pieces = [fast.step(t) for t in generated]
            with monkeypatch.context() as m:
                m.setattr(tokenizer_module, "DecodeStream", None)
                window = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
            assert window._stream is None
            assert fast_pieces == [window.step(t) for t in generated], (prompt, skip)
            assert fast.text == window.text


def test_incremental_detokenizer_skips_special(smollm2):
    tok, _ = smollm2
    ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(detok.step(t) for t in ids) == "assistant\nHi"


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    """A tiny `tokenizer.ggml.model = llama` vocabulary (scores, byte fallback), as Llama 2 GGUFs carry."""
    import gguf
    import numpy as np
    from transformers import AutoTokenizer

    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "llo", "hello", "▁hello", "▁w", "or",
              "▁wor", "ld", "▁world", "!"]  # fmt: skip
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # unknown, control, byte, normal
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_pretrained(tmp_path / "spm.gguf")
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["hello world!", " hello  world", "hello</s>world", "héllo wörld 😀", "", "hellohello"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == 1  # sentencepiece GGUFs get BOS unless they say otherwise
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text.replace("</s>", "").lstrip(" ")
