"""What a request returns: RequestOutput holding n CompletionOutputs (vLLM's shapes).

One CompletionOutput per completion of the prompt (``SamplingParams.n``; ``index`` 0..n-1).
The request is ``finished`` once all n are.

Log-probabilities (vLLM's shapes), when the request asked for them:

* ``CompletionOutput.logprobs`` (``SamplingParams(logprobs=k)``): one ``dict[token_id, Logprob]`` per
  generated token: the chosen token, plus the k most likely tokens (so k or k + 1 entries).
  ``cumulative_logprob`` is the sum of the chosen tokens' log-probabilities (None without logprobs).
* ``RequestOutput.prompt_logprobs`` (``SamplingParams(prompt_logprobs=k)``): the same for every
  prompt token, each scored by the logits of the position before it; the first prompt token has
  nothing before it, so its entry is ``None``.

The log-probabilities are the model's own ("raw"): ``log_softmax`` of the logits before
temperature, penalties or any other processing, as vLLM returns by default.

Every RequestOutput carries its RequestMetrics (the request's timeline) and the number of
prompt tokens served from the prefix cache.

``finish_reason`` is ``None`` while the request runs, then one of:

* ``"stop"``   an EOS token, a ``stop_token_ids`` token or a ``stop`` string ended it.
               ``stop_reason`` is the stop token id (int) or the stop string (str);
               it is ``None`` when EOS ended the request (as in vLLM).
* ``"length"`` ``max_tokens`` was reached, or the sequence reached the engine's
               length limit (``max_model_len`` or the KV-cache capacity).
* ``"abort"``  the request was aborted (``LLMEngine.abort_request``).
* ``"error"``  the request could never run (e.g. its prompt is longer than the model
               allows); ``RequestOutput.error`` holds the message. Other requests of
               the same batch are not affected.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from operator import attrgetter


@dataclass
class Logprob:
    """One token's log-probability at one position. ``rank``: 1 for the most likely token (a token
    tied with others counts them all: rank = how many tokens have a log-probability >= its own).
    ``decoded_token``: the token alone as text (None without a tokenizer)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]  # one dict per generated token
PromptLogprobs = list[dict[int, Logprob] | None]  # one per prompt token; None for the first


@dataclass
class RequestMetrics:
    """A request's timeline, in ``time.time()`` seconds (vLLM's names).

    ``arrival_time``: ``add_request``; ``first_scheduled_time``: the first step that ran
    it; ``first_token_time`` / ``last_token_time``: when its first / latest token was
    sampled (time to first token = ``first_token_time - arrival_time``);
    ``finished_time``: when it finished. ``num_cached_tokens``: prompt tokens its first
    step found in the prefix cache instead of computing them (also on RequestOutput).
    """

    arrival_time: float
    last_token_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None  # first_scheduled_time - arrival_time
    finished_time: float | None = None
    num_cached_tokens: int = 0

    def as_tuple(self) -> tuple:
        """The fields in order (``RequestMetrics(*t)`` rebuilds it): the wire form's metrics."""
        return _metrics_fields(self)


_metrics_fields = attrgetter(*(f.name for f in fields(RequestMetrics)))


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, token_ids={self.token_ids}, "
            f"cumulative_logprob={self.cumulative_logprob}, logprobs={self.logprobs}, "
            f"finish_reason={self.finish_reason}, stop_reason={self.stop_reason})"
        )


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    error: str | None = None  # set when finish_reason == "error"
    prompt_logprobs: PromptLogprobs | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache

    # ---- the wire form: what an engine process sends (tinyvllm/engine/engine_core.py) ----------
    # The same fields in the same order, as plain tuples: the completions as tuples of
    # CompletionOutput's fields, the metrics as a tuple of RequestMetrics' fields. Pickling a step's
    # 256 outputs takes about 40 us as tuples against 800 us as objects (each object costs pickle
    # a Python-level call); the receiving side builds the objects again.
    def to_wire(self) -> tuple:
        m = self.metrics
        return (self.request_id, self.prompt, self.prompt_token_ids,
                [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason)
                 for c in self.outputs],
                self.finished, self.error, self.prompt_logprobs, None if m is None else m.as_tuple(),
                self.num_cached_tokens)  # fmt: skip

    @classmethod
    def from_wire(cls, w: tuple) -> "RequestOutput":
        """The output from its wire form: ``to_wire``'s tuple, or the short one an engine process
        sends for most of a stream's deltas, ``(request_id, token_ids, text)``: one running
        completion (index 0) without log-probabilities; the rest is None, as in any later delta."""
        if len(w) == 3:
            return cls(w[0], None, None, [CompletionOutput(0, w[2], w[1])])
        request_id, prompt, prompt_token_ids, completions, finished, error, prompt_logprobs, m, cached = w
        return cls(request_id, prompt, prompt_token_ids, [CompletionOutput(*c) for c in completions], finished,
                   error, prompt_logprobs, None if m is None else RequestMetrics(*m), cached)  # fmt: skip

    def add(self, delta: "RequestOutput") -> "RequestOutput":
        """This (cumulative) output extended by ``delta``, a later DELTA output of the same request,
        as a new RequestOutput (neither is changed; vLLM's ``RequestOutput.add`` merges in place)."""
        new = {d.index: d for d in delta.outputs}  # (one, unless n > 1)
        outputs = []
        for old in self.outputs:  # (in index order)
            d = new.pop(old.index, None)
            outputs.append(old if d is None else CompletionOutput(
                d.index, old.text + d.text, old.token_ids + d.token_ids, d.cumulative_logprob,
                None if old.logprobs is None else old.logprobs + (d.logprobs or []), d.finish_reason, d.stop_reason,
            ))  # fmt: skip
        if new:  # a completion whose first delta this is
            outputs += [CompletionOutput(d.index, d.text, list(d.token_ids), d.cumulative_logprob,
                                         None if d.logprobs is None else list(d.logprobs), d.finish_reason,
                                         d.stop_reason) for d in new.values()]  # fmt: skip
            outputs.sort(key=lambda c: c.index)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=outputs, finished=delta.finished, error=delta.error or self.error,
            prompt_logprobs=self.prompt_logprobs if delta.prompt_logprobs is None else delta.prompt_logprobs,
            metrics=delta.metrics or self.metrics,
            num_cached_tokens=self.num_cached_tokens if delta.num_cached_tokens is None else delta.num_cached_tokens,
        )

    @classmethod
    def merge(cls, deltas: list["RequestOutput"]) -> "RequestOutput":
        """The DELTA outputs of one request, in order, as one output: what ``add`` would give
        folded over them, built in one pass (``add`` in a loop copies the growing lists every time)."""
        texts: dict[int, list[str]] = {}
        ids: dict[int, list[int]] = {}
        logprobs: dict[int, list | None] = {}
        last: dict[int, CompletionOutput] = {}
        for d in deltas:
            for c in d.outputs:
                if c.index not in last:
                    texts[c.index], ids[c.index] = [], []
                    logprobs[c.index] = None if c.logprobs is None else []
                texts[c.index].append(c.text)
                ids[c.index] += c.token_ids
                if logprobs[c.index] is not None:
                    logprobs[c.index] += c.logprobs or []
                last[c.index] = c
        outputs = [CompletionOutput(i, "".join(texts[i]), ids[i], last[i].cumulative_logprob, logprobs[i],
                                    last[i].finish_reason, last[i].stop_reason) for i in sorted(last)]  # fmt: skip
        first, end = deltas[0], deltas[-1]

        def newest(name: str):  # (the latest delta that carries the field)
            return next((getattr(d, name) for d in reversed(deltas) if getattr(d, name) is not None), None)

        return cls(request_id=first.request_id, prompt=newest("prompt"), prompt_token_ids=newest("prompt_token_ids"),
                   outputs=outputs, finished=end.finished, error=newest("error"),
                   prompt_logprobs=newest("prompt_logprobs"), metrics=newest("metrics"),
                   num_cached_tokens=newest("num_cached_tokens"))  # fmt: skip

    def __repr__(self) -> str:
        err = f", error={self.error!r}" if self.error else ""
        return (
            f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, prompt_logprobs={self.prompt_logprobs}, "
            f"outputs={self.outputs}, finished={self.finished}{err})"
        )
