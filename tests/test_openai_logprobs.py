"""The engine's per-position logprobs (dict[token_id, Logprob(logprob, rank, decoded_token)]) in
OpenAI's completions and chat shapes, with the slice a streamed chunk carries."""

from __future__ import annotations

import math
from collections import namedtuple

import pytest

pytest.importorskip("fastapi", reason="the OpenAI server needs the serve extra: pip install -e '.[serve]'")

from tinyvllm.entrypoints.openai.logprobs import chat_logprobs, completion_logprobs  # noqa: E402
from tinyvllm.outputs import CompletionOutput  # noqa: E402

Logprob = namedtuple("Logprob", "logprob rank decoded_token")


class Tok:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def output():
    # position 0 sampled 5 (the best), position 1 sampled 9 (not among the top 2), position 2 sampled "é"
    steps = [
        {5: Logprob(math.log(0.6), 1, "Hi"), 7: Logprob(math.log(0.3), 2, " yo"), 8: Logprob(math.log(0.1), 3, "!")},
        {9: Logprob(math.log(0.05), 4, None), 2: Logprob(math.log(0.5), 1, ","), 3: Logprob(math.log(0.4), 2, ".")},
        {4: Logprob(math.log(0.9), 1, "é"), 1: Logprob(math.log(0.1), 2, "e")},
    ]
    return CompletionOutput(index=0, text="Hi<9>é", token_ids=[5, 9, 4], logprobs=steps)


def test_completion_shape_lists_the_sampled_token_and_the_top_k():
    lp = completion_logprobs(output(), 0, 2, Tok(), 0)
    assert lp.tokens == ["Hi", "<9>", "é"]  # a Logprob without decoded_token is decoded by the tokenizer
    assert lp.token_logprobs == [math.log(0.6), math.log(0.05), math.log(0.9)]
    assert lp.text_offset == [0, 2, 5]
    assert lp.top_logprobs[0] == {"Hi": math.log(0.6), " yo": math.log(0.3)}
    assert lp.top_logprobs[1] == {",": math.log(0.5), ".": math.log(0.4), "<9>": math.log(0.05)}  # sampled added


def test_a_stream_chunk_carries_only_its_new_positions():
    lp = completion_logprobs(output(), 2, 1, Tok(), 5)
    assert lp.tokens == ["é"] and lp.text_offset == [5] and lp.top_logprobs == [{"é": math.log(0.9)}]
    chat = chat_logprobs(output(), 1, 2, Tok())
    assert [c.token for c in chat.content] == ["<9>", "é"]


def test_chat_shape_has_bytes_and_its_own_top_list():
    chat = chat_logprobs(output(), 0, 2, Tok())
    last = chat.content[2]
    assert last.token == "é" and last.bytes == [0xC3, 0xA9] and last.logprob == math.log(0.9)
    assert [t.token for t in last.top_logprobs] == ["é", "e"]
    assert [t.token for t in chat.content[1].top_logprobs] == [",", "."]  # top-k only, best first
    assert completion_logprobs(CompletionOutput(0, "x", [1]), 0, 2, Tok(), 0) is None  # none asked: None


def test_two_ids_with_the_same_text_keep_the_better_logprob():
    steps = [{5: Logprob(-0.1, 1, "\ufffd"), 6: Logprob(-1.0, 2, "\ufffd"), 7: Logprob(-2.0, 3, "x")}]
    lp = completion_logprobs(CompletionOutput(0, "", [5], logprobs=steps), 0, 3, Tok(), 0)
    assert lp.top_logprobs == [{"\ufffd": -0.1, "x": -2.0}]


def test_a_delta_without_text_waits_for_the_next_and_goes_out_joined():
    """UnsentDeltas: tokens that bring no text yet (half a character, a possible stop string) are
    held, then sent with the next delta that has text, their logprobs first; a finish goes out even
    without text."""
    from tinyvllm.entrypoints.openai.serving_engine import UnsentDeltas

    lp = lambda t: {t: Logprob(-0.5, 1, None)}  # noqa: E731
    unsent = UnsentDeltas()
    assert unsent.take(0, CompletionOutput(0, "", [40], logprobs=[lp(40)])) is None
    assert unsent.take(1, CompletionOutput(1, "x", [7], logprobs=[lp(7)])).token_ids == [7]  # (another choice)
    joined = unsent.take(0, CompletionOutput(0, "é", [41], logprobs=[lp(41)]))
    assert (joined.text, joined.token_ids, [list(d) for d in joined.logprobs]) == ("é", [40, 41], [[40], [41]])
    assert unsent.take(0, CompletionOutput(0, "", [42], logprobs=[lp(42)])) is None
    end = unsent.take(0, CompletionOutput(0, "", [2], logprobs=[lp(2)], finish_reason="stop"))
    assert end.token_ids == [42, 2] and end.finish_reason == "stop" and end.text == ""
