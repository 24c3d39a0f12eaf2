"""POST /v1/chat/completions: a conversation in, the assistant's reply out, whole or streamed.

The messages are rendered with the model's chat template (tinyvllm.tokenizer, the same Jinja
sandbox transformers uses) and tokenized without adding special tokens (the template writes BOS),
exactly as ``LLM.chat`` does, so the server and the offline API give the same reply. A streamed
reply opens each choice with ``delta: {"role": "assistant", "content": ""}``, then sends the new
text of each step, then a chunk with the ``finish_reason``; with ``stream_options.include_usage``
a last chunk holds the usage (and every chunk the usage so far with vLLM's
``continuous_usage_stats``); ``data: [DONE]`` ends the stream.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from tinyvllm.entrypoints.openai.logprobs import chat_logprobs
from tinyvllm.entrypoints.openai.protocol import (
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatMessage, ChatResponseMessage,
    ChatStreamChoice, DeltaMessage, UsageInfo,
)  # fmt: skip
from tinyvllm.entrypoints.openai.serving_engine import (
    EngineStreamingResponse, OpenAIError, OpenAIServing, UnsentDeltas, error_event, last_items, new_request_id,
    raise_as_openai_error, sse,
)  # fmt: skip


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> the {"role", "content"} dicts a chat template reads; text parts are joined."""
    if not messages:
        raise OpenAIError(400, "messages must be a non-empty list.", param="messages")
    result = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise OpenAIError(400, f"content parts of type {part.type!r} are not supported (text only).",
                                      param="messages")  # fmt: skip
                texts.append(part.text)
            content = "\n".join(texts)
        msg = {"role": m.role, "content": content if content is not None else ""}
        if m.name is not None:
            msg["name"] = m.name
        result.append(msg)
    return result


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args: Any, chat_template: str | None = None, trust_request_chat_template: bool = False,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.chat_template = chat_template  # `serve --chat-template` (None: the model's own)
        self.trust_request_chat_template = trust_request_chat_template

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
               chat_template_kwargs: dict | None = None, chat_template: str | None = None,
               continue_final_message: bool = False) -> tuple[str, list[int]]:  # fmt: skip
        """The prompt text and ids of a conversation (400 if the template refuses it), rendered with
        ``chat_template`` (a request's own), else the server's ``--chat-template``, else the model's."""
        import jinja2

        dicts = messages_to_dicts(messages)
        kwargs = dict(chat_template_kwargs or {})
        template = chat_template or self.chat_template
        if template is not None:
            kwargs["chat_template"] = template
        try:
            text = self.tokenizer.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message, **kwargs)  # fmt: skip
        except (ValueError, jinja2.TemplateError) as e:
            raise OpenAIError(400, f"the chat template could not render the messages: {e}", param="messages") from e
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Any = None):
        self.check_model(request.model)
        if request.tools:
            raise OpenAIError(400, "tools are not supported by tinyvllm.", param="tools")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise OpenAIError(400, "response_format other than text is not supported by tinyvllm.", param="response_format")
        if request.chat_template is not None and not self.trust_request_chat_template:
            raise OpenAIError(400, "a request's own chat_template needs the server started with "
                              "--trust-request-chat-template.", param="chat_template")  # fmt: skip
        if request.continue_final_message and request.add_generation_prompt:
            raise OpenAIError(400, "continue_final_message continues the last message: set add_generation_prompt "
                              "to false.", param="continue_final_message")  # fmt: skip
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs=true.", param="top_logprobs")
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        max_tokens = self.default("max_tokens", max_tokens)  # (unset: the model's default, if it has one)
        text, ids = self.render(request.messages, request.add_generation_prompt, request.chat_template_kwargs,
                                request.chat_template, request.continue_final_message)  # fmt: skip
        self.check_prompt(ids, max_tokens, what="messages")
        num_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self.sampling_params(request, max_tokens=max_tokens, logprobs=num_logprobs)
        request_id = new_request_id("chatcmpl")
        added = self.add_requests([{"prompt": text, "prompt_token_ids": ids}], params, [request_id])
        if request.stream:
            return EngineStreamingResponse(self._stream(added.outputs, request, request_id, len(ids), num_logprobs), added)
        try:
            with raise_as_openai_error():
                (final,) = await last_items(added.outputs, raw_request, 1)
        finally:
            added.close()
        if final.error:
            raise OpenAIError(400, final.error, param="messages")
        choices = [
            ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
                       stop_reason=c.stop_reason,
                       logprobs=chat_logprobs(c, 0, num_logprobs, self.tokenizer) if num_logprobs is not None else None)
            for c in final.outputs
        ]  # fmt: skip
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        usage = self.usage(len(ids), completion_tokens, final.num_cached_tokens or 0)
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

    async def _stream(self, merged: AsyncIterator, request: ChatCompletionRequest, request_id: str,
                      num_prompt_tokens: int, num_logprobs: int | None) -> AsyncIterator[str]:  # fmt: skip
        created = int(time.time())

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=choices, usage=usage))

        sent_tokens: dict[int, int] = {}  # choice index -> tokens sent (a choice is here once its role went out)
        finished: set[int] = set()
        cached = 0  # prompt tokens the prefix cache served
        options = request.stream_options
        continuous = options is not None and options.include_usage and options.continuous_usage_stats

        def usage() -> UsageInfo:
            return self.usage(num_prompt_tokens, sum(sent_tokens.values()), cached)

        unsent = UnsentDeltas()
        try:
            async with aclosing(merged) as stream:
                async for _, out in stream:  # (DELTA outputs: each choice's new tokens and text)
                    if out.error:
                        raise OpenAIError(400, out.error, param="messages")
                    if out.num_cached_tokens is not None:
                        cached = out.num_cached_tokens
                    for c in out.outputs:
                        i = c.index
                        if i in finished:
                            continue
                        if i not in sent_tokens:  # the first chunk of a choice names the role
                            sent_tokens[i] = 0
                            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                        if (c := unsent.take(i, c)) is None:
                            continue  # nothing new to show yet (a held-back character or stop-string prefix)
                        logprobs = chat_logprobs(c, 0, num_logprobs, self.tokenizer) if num_logprobs is not None else None
                        sent_tokens[i] += len(c.token_ids)
                        if c.finish_reason is not None:
                            finished.add(i)
                        yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(content=c.text), logprobs=logprobs,
                                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason)],
                                    usage() if continuous else None)  # fmt: skip
            if options is not None and options.include_usage:
                yield chunk([], usage())
        except Exception as e:  # noqa: BLE001 - the status line is gone: the error travels as an event
            yield error_event(e)
        yield sse("[DONE]")
