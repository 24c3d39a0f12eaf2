"""POST /v1/completions: prompts in, completions out, whole or streamed as server-sent events.

    prompt: "text" | ["text", ...] | [token ids] | [[token ids], ...]

Each prompt is one engine request (with ``n`` completions each); choice ``index`` is
``prompt_index * n + completion_index``, as in vLLM. A streamed choice's chunks carry exactly the
text the engine added since the previous chunk: the engine's text never splits a UTF-8
character (incremental detokenization) and holds back what could be the start of a stop string,
so the chunks joined are the non-streamed text.

``echo``: each choice's text starts with its prompt (the first chunk of a stream carries it), and
with ``logprobs`` its logprobs start with the prompt's (the engine's ``prompt_logprobs``; the first
token's are None). That is how lm-evaluation-harness scores a continuation: ``echo=True,
logprobs=1, max_tokens=1`` on context + continuation, then the continuation's token logprobs.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from tinyvllm.entrypoints.openai.logprobs import completion_logprobs, prompt_logprobs
from tinyvllm.entrypoints.openai.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from tinyvllm.entrypoints.openai.serving_engine import (
    EngineStreamingResponse, OpenAIError, OpenAIServing, UnsentDeltas, error_event, last_items, new_request_id,
    raise_as_openai_error, sse,
)  # fmt: skip


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Any = None):
        self.check_model(request.model)
        if request.suffix:
            raise OpenAIError(400, "suffix is not supported by tinyvllm.", param="suffix")
        prompts = await self._prompts(request)
        echo_logprobs = request.logprobs if request.echo else None  # (the prompt's, to echo them)
        params = self.sampling_params(request, max_tokens=request.max_tokens, logprobs=request.logprobs,
                                      prompt_logprobs=echo_logprobs)  # fmt: skip
        request_id = new_request_id("cmpl")
        added = self.add_requests(prompts, params, [f"{request_id}-{i}" for i in range(len(prompts))])
        num_prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        if request.stream:
            body = self._stream(added.outputs, request, request_id, params.n, num_prompt_tokens, prompts)
            return EngineStreamingResponse(body, added)
        try:
            with raise_as_openai_error():
                finals = await last_items(added.outputs, raw_request, len(prompts))
        finally:
            added.close()
        choices = []
        for i, out in enumerate(finals):
            if out.error:
                raise OpenAIError(400, out.error, param="prompt")
            for c in out.outputs:
                echoed, logprobs = self._echo(request, prompts[i], out)
                logprobs = completion_logprobs(c, 0, request.logprobs or 0, self.tokenizer, len(echoed), logprobs)
                choices.append(CompletionChoice(index=i * params.n + c.index, text=echoed + c.text, logprobs=logprobs,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))  # fmt: skip
        completion_tokens = sum(len(c.token_ids) for out in finals for c in out.outputs)
        cached = sum(out.num_cached_tokens or 0 for out in finals)
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                  usage=self.usage(num_prompt_tokens, completion_tokens, cached))  # fmt: skip

    def _echo(self, request: CompletionRequest, prompt: dict, out: Any) -> tuple[str, Any]:
        """What ``echo`` puts before a choice: the prompt's text, and with ``logprobs`` the prompt's
        logprobs (else None); ("", None) without echo."""
        if not request.echo:
            return "", None
        ids = prompt["prompt_token_ids"]
        text = prompt["prompt"] if prompt["prompt"] is not None else self.tokenizer.decode(ids)
        if request.logprobs is None or out.prompt_logprobs is None:
            return text, None
        return text, prompt_logprobs(ids, out.prompt_logprobs, request.logprobs, self.tokenizer)

    async def _prompts(self, request: CompletionRequest) -> list[dict]:
        """Every prompt as {"prompt": text or None, "prompt_token_ids": ids}, each checked."""
        p = request.prompt
        if isinstance(p, str) or (p and all(isinstance(t, int) for t in p)):
            p = [p]
        if not p:
            raise OpenAIError(400, "prompt must not be empty.", param="prompt")
        prompts = []
        for item in p:
            text, ids = (item, await self.encode(item)) if isinstance(item, str) else (None, list(item))
            self.check_prompt(ids, self.default("max_tokens", request.max_tokens))
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return prompts

    async def _stream(self, merged: AsyncIterator, request: CompletionRequest, request_id: str, n: int,
                      num_prompt_tokens: int, prompts: list[dict]) -> AsyncIterator[str]:  # fmt: skip
        created = int(time.time())
        sent_text: dict[int, int] = {}  # choice index -> characters sent
        sent_tokens: dict[int, int] = {}  # choice index -> tokens sent
        echoed: dict[int, int] = {}  # choice index -> characters of its echoed prompt (sent in its first chunk)
        finished: set[int] = set()
        num_logprobs = request.logprobs
        cached: dict[int, int] = {}  # prompt index -> its tokens the prefix cache served
        options = request.stream_options
        continuous = options is not None and options.include_usage and options.continuous_usage_stats

        def usage() -> Any:
            return self.usage(num_prompt_tokens, sum(sent_tokens.values()), sum(cached.values()))

        unsent = UnsentDeltas()
        first: dict[int, Any] = {}  # prompt index -> its first output (an echo's prompt logprobs)
        try:
            async with aclosing(merged) as stream:
                async for i, out in stream:  # (DELTA outputs: each choice's new tokens and text)
                    if out.error:
                        raise OpenAIError(400, out.error, param="prompt")
                    first.setdefault(i, out)
                    if out.num_cached_tokens is not None:
                        cached[i] = out.num_cached_tokens
                    for c in out.outputs:
                        index = i * n + c.index
                        if index in finished or (c := unsent.take(index, c)) is None:
                            continue  # nothing new to show yet (a held-back character or stop-string prefix)
                        head, logprobs = "", None
                        if index not in echoed:  # its first chunk: the echoed prompt, if asked
                            head, logprobs = self._echo(request, prompts[i], first[i])
                            echoed[index] = len(head)
                        t0 = sent_text.get(index, 0)
                        if num_logprobs is not None:
                            logprobs = completion_logprobs(c, 0, num_logprobs, self.tokenizer, echoed[index] + t0, logprobs)
                        sent_text[index] = t0 + len(c.text)
                        sent_tokens[index] = sent_tokens.get(index, 0) + len(c.token_ids)
                        if c.finish_reason is not None:
                            finished.add(index)
                        choice = CompletionChoice(index=index, text=head + c.text, logprobs=logprobs,
                                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)  # fmt: skip
                        yield sse(CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[choice],
                                                     usage=usage() if continuous else None))  # fmt: skip
            if options is not None and options.include_usage:
                yield sse(CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[], usage=usage()))
        except Exception as e:  # noqa: BLE001 - the status line is gone: the error travels as an event
            yield error_event(e)
        yield sse("[DONE]")
