"""What the completion and chat endpoints share: the model check, the request -> SamplingParams
mapping, the prompt checks, errors, and the plumbing of streams (vLLM's serving_engine.py).

Request fields -> SamplingParams. The mapping names every field SamplingParams may have, vLLM's
names included (``n``, ``logprobs``, ``presence_penalty``, ``frequency_penalty``,
``repetition_penalty``, ``logit_bias``). It passes only the fields that this build's SamplingParams
has (read from its dataclass fields): a request that asks for one it lacks gets a 400 saying
so, unless it asks for the neutral value (``presence_penalty=0``), which changes nothing. A value
SamplingParams refuses becomes a 400 naming the field (its ValueError's first word).

Every failure is an :class:`OpenAIError` with its HTTP status; api_server.py turns it into
OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from contextlib import aclosing, contextmanager
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse

from tinyvllm.engine.async_llm_engine import AsyncLLMEngine, EngineError, EngineShutdownError, RequestStream
from tinyvllm.entrypoints.openai.metrics import ServerMetrics
from tinyvllm.entrypoints.openai.protocol import (
    ErrorInfo, ErrorResponse, PromptTokensDetails, SamplingFields, UsageInfo, random_id,
)  # fmt: skip
from tinyvllm.outputs import CompletionOutput, RequestOutput
from tinyvllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("tinyvllm")

# A field a request may set although SamplingParams lacks it, as long as it asks for this value.
_NEUTRAL = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
            "logit_bias": {}, "logprobs": None, "prompt_logprobs": None, "best_of": 1}  # fmt: skip


class OpenAIError(Exception):
    """A request that fails with ``status``; ``param`` names the field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.status))


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 500: "internal_server_error",
                503: "service_unavailable_error"}  # fmt: skip


class ClientDisconnected(Exception):
    """The client went away before its non-streamed response was ready; the request was aborted."""


def sampling_params_fields() -> set[str]:
    """The fields this build's SamplingParams accepts."""
    return {f.name for f in dataclasses.fields(SamplingParams) if f.init}


def make_sampling_params(**fields: Any) -> SamplingParams:
    """SamplingParams from request fields (None = not given); OpenAIError(400) naming a bad field."""
    known = sampling_params_fields()
    kwargs = {}
    for name, value in fields.items():
        if value is None:
            continue
        if name not in known:
            if name in _NEUTRAL and value == _NEUTRAL[name]:
                continue
            raise OpenAIError(400, f"{name} is not supported by this build of tinyvllm (got {value!r}).", param=name)
        kwargs[name] = value
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        message = str(e)
        first = message.split(" ", 1)[0]
        raise OpenAIError(400, message, param=first if first in known else None) from e


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], metrics: ServerMetrics, *,
                 enable_prompt_tokens_details: bool = False) -> None:  # fmt: skip
        self.engine = engine
        self.served_model_names = served_model_names
        self.metrics = metrics
        self.max_model_len = engine.config.max_model_len
        self.enable_prompt_tokens_details = enable_prompt_tokens_details

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> UsageInfo:
        """A response's token counts; with ``--enable-prompt-tokens-details`` (vLLM's) also how many
        prompt tokens the prefix cache served (``prompt_tokens_details.cached_tokens``, OpenAI's field)."""
        details = PromptTokensDetails(cached_tokens=cached_tokens) if self.enable_prompt_tokens_details else None
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)  # fmt: skip

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model")

    def default(self, name: str, value: Any) -> Any:
        """A request's field, or where it left it unset, the model's default for it (its
        generation_config.json: tinyvllm/generation_config.py), or None."""
        return value if value is not None else self.engine.default_sampling.get(name)

    def sampling_params(self, request: SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:  # fmt: skip
        """The request's SamplingParams: its fields; where it leaves temperature, top_p, top_k, min_p,
        repetition_penalty or max_tokens unset, the model's recommended values (vLLM's
        ``--generation-config auto``); else OpenAI's defaults (temperature 1, top_p 1)."""
        logit_bias = None
        if request.logit_bias:
            try:
                logit_bias = {int(k): float(v) for k, v in request.logit_bias.items()}
            except ValueError as e:
                raise OpenAIError(400, f"logit_bias keys must be token ids, got {list(request.logit_bias)!r}.",
                                  param="logit_bias") from e
        d = self.default
        # DELTA outputs (vLLM's server does the same): each carries only what is new, so a stream
        # sends it as it is and a whole response joins them once (last_items); a CUMULATIVE one
        # would be rebuilt, copying the whole sequence so far, at every step.
        return make_sampling_params(output_kind=RequestOutputKind.DELTA,
            n=request.n, temperature=d("temperature", request.temperature), top_p=d("top_p", request.top_p),
            top_k=d("top_k", request.top_k), min_p=d("min_p", request.min_p), seed=request.seed, stop=request.stop,
            stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos, max_tokens=d("max_tokens", max_tokens),
            min_tokens=request.min_tokens, include_stop_str_in_output=request.include_stop_str_in_output,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            repetition_penalty=d("repetition_penalty", request.repetition_penalty), logit_bias=logit_bias,
            best_of=request.best_of,
        )  # fmt: skip

    def check_prompt(self, prompt_ids: list[int], max_tokens: int | None, what: str = "prompt") -> None:
        """The checks the engine would fail the request on, made here so they answer 400 up front."""
        n = len(prompt_ids)
        config = self.engine.config
        if n == 0:
            raise OpenAIError(400, f"The {what} is empty.", param=what)
        vocab = getattr(self.engine.engine, "vocab_size", None)
        if vocab is not None:
            bad = [t for t in prompt_ids if not 0 <= t < vocab]
            if bad:
                raise OpenAIError(400, f"Token id {bad[0]} is out of vocabulary (vocab_size={vocab}).", param=what)
        if n + (max_tokens or 1) > self.max_model_len:
            asked = f"{n + max_tokens} tokens ({n} in the {what}, {max_tokens} in the completion)" if max_tokens \
                else f"{n} tokens in the {what} and none left for the completion"
            raise OpenAIError(
                400, f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{asked}. Please reduce the length of the {what} or completion.", param="max_tokens" if max_tokens and n < self.max_model_len else what,
            )  # fmt: skip
        if n + 1 > config.max_seq_len:
            raise OpenAIError(400, f"The {what} ({n} tokens) does not fit in the KV cache, which holds "
                              f"{config.max_seq_len} tokens.", param=what)  # fmt: skip

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize off the event loop (a long prompt takes milliseconds)."""
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    def add_requests(self, prompts: list[dict], params: SamplingParams, request_ids: list[str]) -> AddedRequests:
        """Add one engine request per prompt now, as soon as the handler has checked them (not when
        the response starts: see ``AsyncLLMEngine.add_request``); their outputs are DELTA ones (see
        :meth:`sampling_params`), with the server's metrics recorded along the way. If one is
        refused, those added before it are aborted and the refusal raised as an OpenAIError."""
        arrival = time.perf_counter()  # (the server's TTFT starts before the adds, as the engine's clock does)
        streams: list[RequestStream] = []
        try:
            with raise_as_openai_error():
                for prompt, request_id in zip(prompts, request_ids):
                    streams.append(self.engine.add_request(prompt, params, request_id))
        except BaseException:
            for s in streams:
                s.close()
            raise
        delta = params.output_kind == RequestOutputKind.DELTA
        metered = [self.metrics.track(s, len(p["prompt_token_ids"]), delta=delta, arrival=arrival)
                   for s, p in zip(streams, prompts)]  # fmt: skip
        return AddedRequests(merge_async_iterators(metered), streams)


@dataclasses.dataclass
class AddedRequests:
    """The engine requests of one HTTP request: ``outputs`` yields ``(prompt index, output)`` as
    they come; ``close()`` aborts those not finished, whether or not their outputs were ever read
    (a streamed response calls it when it ends, however it ends: :class:`EngineStreamingResponse`)."""

    outputs: AsyncIterator[tuple[int, RequestOutput]]
    streams: list[RequestStream]

    def close(self) -> None:
        for s in self.streams:
            s.close()


class EngineStreamingResponse(StreamingResponse):
    """Server-sent events for requests added before the response began: when the response ends
    (finished, failed, or its client gone before the first chunk, when the body never started and
    so never ran its own clean-up), the requests not finished are aborted."""

    def __init__(self, body: AsyncIterator[str], requests: AddedRequests) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.requests = requests

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.requests.close()


# ---- streams -----------------------------------------------------------------------------------
async def merge_async_iterators(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Yield ``(i, item)`` from several async iterators as items arrive; closing this closes them all
    (so every request of a multi-prompt completion is aborted when its client leaves)."""
    if len(iterators) == 1:
        async with aclosing(iterators[0]) as it:
            async for item in it:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator) -> None:
        try:
            async with aclosing(it):
                async for item in it:
                    await queue.put((i, item))
            await queue.put((i, done))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def last_items(stream: AsyncIterator[tuple[int, RequestOutput]], raw_request: Any, count: int) -> list[RequestOutput]:
    """The whole output of each of ``count`` merged requests (their DELTA outputs joined once); if
    the client disconnects first, the requests are aborted and ClientDisconnected is raised."""

    async def consume() -> list[RequestOutput]:
        deltas: list[list[RequestOutput]] = [[] for _ in range(count)]
        async with aclosing(stream) as s:
            async for i, out in s:
                deltas[i].append(out)
        return [RequestOutput.merge(d) if d else None for d in deltas]

    work = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()  # runs the generators' finally blocks: the requests are aborted
            await asyncio.gather(work, return_exceptions=True)
            raise ClientDisconnected()
        watch.cancel()
    return work.result()


async def _wait_for_disconnect(raw_request: Any) -> None:
    if raw_request is None:
        await asyncio.Event().wait()
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


class UnsentDeltas:
    """A stream's completions in DELTA form, held back while they bring no text: a token that ends
    inside a UTF-8 character, or text held back as a possible stop string, brings tokens (and their
    logprobs) but nothing to show. They go out with the next delta that has text, or a finish."""

    def __init__(self) -> None:
        self._held: dict[int, CompletionOutput] = {}

    def take(self, index: int, c: CompletionOutput) -> CompletionOutput | None:
        """Choice ``index``'s new delta ``c``, joined to what was held back; None while there is
        nothing to send (it is held)."""
        held = self._held.pop(index, None)
        if held is not None:
            c = CompletionOutput(c.index, held.text + c.text, held.token_ids + c.token_ids, c.cumulative_logprob,
                                 None if held.logprobs is None else held.logprobs + (c.logprobs or []),
                                 c.finish_reason, c.stop_reason)  # fmt: skip
        if not c.text and c.finish_reason is None:
            self._held[index] = c
            return None
        return c


def sse(data: Any) -> str:
    """One server-sent event carrying ``data`` (a pydantic model, a dict or "[DONE]")."""
    if hasattr(data, "model_dump_json"):
        data = data.model_dump_json()
    elif not isinstance(data, str):
        data = json.dumps(data)
    return f"data: {data}\n\n"


def as_openai_error(e: Exception) -> OpenAIError:
    """What a failure during generation answers: the engine failed (500), it is shutting down (503),
    it refused the request (400)."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, EngineShutdownError):
        return OpenAIError(503, str(e))
    if isinstance(e, EngineError):
        return OpenAIError(500, str(e))
    if isinstance(e, (ValueError, TypeError)):
        return OpenAIError(400, str(e))
    logger.exception("tinyvllm: request failed", exc_info=e)
    return OpenAIError(500, f"internal error: {type(e).__name__}: {e}")


@contextmanager
def raise_as_openai_error():
    try:
        yield
    except (ClientDisconnected, OpenAIError):
        raise
    except Exception as e:  # noqa: BLE001
        raise as_openai_error(e) from e


def error_event(e: Exception) -> str:
    """An error inside a stream that has already sent its status line: an event with the error object."""
    return sse(as_openai_error(e).response())


def new_request_id(prefix: str) -> str:
    return random_id(prefix)
