"""The engine's logprobs in OpenAI's two shapes.

The engine gives, per generated position, ``dict[token_id, Logprob(logprob, rank, decoded_token)]``
(``CompletionOutput.logprobs``): the sampled token and the top-k of that step. OpenAI's completions
API wants parallel lists (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), its
chat API one entry per token with its own ``top_logprobs`` list and the token's UTF-8 ``bytes``.
A streamed chunk carries the logprobs of the tokens it adds: ``start`` is the first new position.
With ``echo`` the prompt's own come first (``prompt_logprobs``), its first token's None.
"""

from __future__ import annotations

from typing import Any

from tinyvllm.entrypoints.openai.protocol import ChatLogProbs, ChatTokenLogprob, ChatTopLogprob, CompletionLogProbs


def _decoded(token_id: int, logprob: Any, tokenizer: Any) -> str:
    text = getattr(logprob, "decoded_token", None)
    return text if text is not None else tokenizer.decode([token_id])


def _top(step: dict, num: int) -> list[tuple[int, Any]]:
    """The ``num`` most likely entries of one position, best first."""
    return sorted(step.items(), key=lambda kv: -kv[1].logprob)[:num]


def completion_logprobs(output: Any, start: int, num: int, tokenizer: Any, text_offset: int,
                        into: CompletionLogProbs | None = None) -> CompletionLogProbs | None:  # fmt: skip
    """Positions ``start..`` of ``output`` (a CompletionOutput); ``text_offset``: where the first
    new token's text starts in the completion. ``into``: append to these (an echoed prompt's)."""
    if output.logprobs is None:
        return None
    result = into if into is not None else CompletionLogProbs()
    _append(result, output.token_ids[start:], output.logprobs[start:], num, tokenizer, text_offset)
    return result


def prompt_logprobs(prompt_token_ids: list[int], logprobs: list, num: int, tokenizer: Any) -> CompletionLogProbs:
    """An echoed prompt's entries (``RequestOutput.prompt_logprobs``): its first token has nothing
    before it to be scored by, so its logprob and top list are None, as in vLLM and OpenAI."""
    result = CompletionLogProbs()
    _append(result, prompt_token_ids, logprobs, num, tokenizer, 0)
    return result


def _append(result: CompletionLogProbs, token_ids: list[int], steps: list, num: int, tokenizer: Any,
            text_offset: int) -> None:  # fmt: skip
    for token_id, step in zip(token_ids, steps):
        if step is None:  # (a prompt's first position)
            token = tokenizer.decode([token_id], skip_special_tokens=False)
            result.tokens.append(token)
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            token = _decoded(token_id, step[token_id], tokenizer)
            result.tokens.append(token)
            result.token_logprobs.append(step[token_id].logprob)
            top: dict[str, float] = {}
            for t, lp in _top(step, num):  # best first; two ids with the same text keep the better one
                top.setdefault(_decoded(t, lp, tokenizer), lp.logprob)
            top.setdefault(token, step[token_id].logprob)  # the scored token is always listed (vLLM)
            result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(token)


def chat_logprobs(output: Any, start: int, num: int, tokenizer: Any) -> ChatLogProbs | None:
    if output.logprobs is None:
        return None
    content = []
    for pos in range(start, len(output.token_ids)):
        token_id = output.token_ids[pos]
        step = output.logprobs[pos]
        token = _decoded(token_id, step[token_id], tokenizer)
        top = [ChatTopLogprob(token=(s := _decoded(t, lp, tokenizer)), logprob=lp.logprob, bytes=list(s.encode()))
               for t, lp in _top(step, num)]  # fmt: skip
        content.append(ChatTokenLogprob(token=token, logprob=step[token_id].logprob, bytes=list(token.encode()),
                                        top_logprobs=top))  # fmt: skip
    return ChatLogProbs(content=content)
