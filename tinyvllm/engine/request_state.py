"""RequestState: one request as the engine tracks it (its n sequences and its log-probabilities).

A request with ``SamplingParams(n=k)`` is k sequences (vLLM's "parallel sampling"), each with its
own copy of the params (:func:`child_params`); the engine reports them together. The
log-probabilities the sampler sends back (tinyvllm/engine/logprobs.py) are recorded here in
vLLM's shapes: one ``dict[token_id, Logprob]`` per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tinyvllm.engine.logprobs import PromptLogprobsChunk, TokenLogprobs
from tinyvllm.engine.sequence import Sequence
from tinyvllm.outputs import Logprob, PromptLogprobs, RequestOutput, SampleLogprobs
from tinyvllm.sampling_params import RequestOutputKind, SamplingParams


class TokenTexts:
    """Each token alone as text (``Logprob.decoded_token``; special tokens spelled out, as vLLM),
    decoded once per token id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def __call__(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._text.get(token_id)
        if text is None:
            text = self._text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def logprob_dict(self, scored: TokenLogprobs) -> dict[int, Logprob]:
        """vLLM's per-position dict: the scored token (its own rank) first, then the top k (ranks
        1..k); a scored token that is also in the top k appears once."""
        ranks = [scored.rank] + list(range(1, len(scored.token_ids)))
        return {t: Logprob(lp, r, self(t)) for t, lp, r in zip(scored.token_ids, scored.logprobs, ranks)}


@dataclass
class RequestState:
    """One request as the engine tracks it: its ``n`` sequences (``seqs[i]`` is completion i) and
    the log-probabilities its outputs carry (None where the request did not ask for them)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams  # the request's own (its n, its prompt_logprobs)
    seqs: list[Sequence] = field(default_factory=list)
    logprobs: list[SampleLogprobs | None] = field(default_factory=list)  # per sequence
    cumulative_logprobs: list[float | None] = field(default_factory=list)  # per sequence
    prompt_logprobs: PromptLogprobs | None = None
    error: str | None = None  # why the request failed (finish_reason "error")
    # DELTA outputs: per sequence, the characters, tokens and log-probabilities already returned
    sent: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    # Streaming (DELTA / CUMULATIVE): steps that gave it tokens since its last output, and whether it
    # had one (EngineConfig.stream_interval: an output every that many steps, the first at once)
    unsent_steps: int = 0
    streamed: bool = False

    def make_output(self) -> RequestOutput:
        """The request's output as its ``output_kind`` wants it: everything so far, or (DELTA) what
        is new since its last output, the prompt's ids and log-probabilities in the first only."""
        return RequestOutput.from_wire(self.wire_output())

    def wire_output(self, prompt_once: bool = False) -> tuple:
        """:meth:`make_output` as plain tuples (``RequestOutput.to_wire``'s form): what an engine
        process sends, built without the objects. ``prompt_once``: a DELTA output after the first
        leaves the prompt's text out too (the receiver has it from the first), and a running
        stream's plain delta is sent short (see ``RequestOutput.from_wire``)."""
        delta = self.params.output_kind == RequestOutputKind.DELTA
        first = not self.sent
        completions = []
        for index, seq in enumerate(self.seqs):
            text = seq.output_text
            end = len(text)  # of the text that may be shown
            p = seq.sampling_params
            if seq.finish_reason is None and p.stop and not p.include_stop_str_in_output:
                # While running, hold back a tail that could be the start of a stop string,
                # so a streamed text never shows characters that a later stop would cut.
                end = max(0, end - (max(len(s) for s in p.stop) - 1))
            logprobs = self.logprobs[index]
            t0, k0, l0 = self.sent.get(index, (0, 0, 0)) if delta else (0, 0, 0)
            token_ids = seq.token_ids[len(seq.prompt_token_ids) + k0 :]  # (a delta slices only its new part)
            while token_ids and token_ids[-1] < 0:  # a placeholder of a step in flight (async scheduling)
                token_ids.pop()
            if delta:
                self.sent[index] = (end, k0 + len(token_ids), 0 if logprobs is None else len(logprobs))
            text = text[t0:end] if t0 or end < len(text) else text
            if logprobs is not None:
                logprobs = logprobs[l0:]
            completions.append((index, text, token_ids, self.cumulative_logprobs[index], logprobs,
                                seq.finish_reason, seq.stop_reason))  # (CompletionOutput's fields)
        # (A server makes one of these per running request per step: the prompt's ids are shared,
        # not copied, as vLLM's outputs share them; nothing in the engine changes them.)
        later_delta = delta and not first
        if later_delta and prompt_once and len(completions) == 1 and completions[0][4] is None and not self.finished:
            # The common case of an engine process: a running single stream without log-probabilities.
            # Only what is new travels, (request_id, token_ids, text): half the pickling, and the
            # receiver builds two objects instead of four (RequestOutput.from_wire).
            return (self.request_id, completions[0][2], completions[0][1])
        m = self.seqs[0].metrics
        return (self.request_id, None if later_delta and prompt_once else self.prompt,
                None if later_delta else self.prompt_token_ids, completions, self.finished, self.error,
                None if self.prompt_logprobs is None or later_delta else list(self.prompt_logprobs),
                m.as_tuple(), m.num_cached_tokens)  # fmt: skip

    @property
    def finished(self) -> bool:
        if len(self.seqs) == 1:  # (n = 1, the common case: this runs per request per step)
            return self.seqs[0].finish_reason is not None
        return all(seq.finish_reason is not None for seq in self.seqs)

    def record_logprobs(self, index: int, scored: TokenLogprobs, texts: TokenTexts) -> None:
        """Sequence ``index``'s newest token's log-probabilities."""
        self.logprobs[index].append(texts.logprob_dict(scored))
        self.cumulative_logprobs[index] += scored.logprobs[0]

    def record_prompt_logprobs(self, chunk: PromptLogprobsChunk, texts: TokenTexts) -> None:
        """A prompt chunk's log-probabilities (position p scores prompt token p)."""
        for j, scored in enumerate(chunk.positions):
            self.prompt_logprobs[chunk.start + j] = texts.logprob_dict(scored)


def engine_needs_text(params: SamplingParams) -> bool:
    """Whether the engine itself must detokenize a sequence with these params: only where the
    text decides when it ends (stop strings, checked on the text the moment each token is known,
    so the request stops at the token that completes one and frees its blocks in that step).
    Any other sequence's text can be made anywhere from its token ids: an engine process leaves
    it to the server's process (``LLMEngine.text_in_client``, engine_core.py)."""
    return bool(params.stop)


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sequence ``index``'s params for a request of ``n > 1`` (vLLM's ParentRequest): n = 1, the
    seed ``seed + index``; the prompt's log-probabilities are computed by sequence 0 only."""
    child = params.clone()
    child.n = 1
    if params.seed is not None:
        child.seed = params.seed + index
    if index > 0:
        child.prompt_logprobs = None
    return child
