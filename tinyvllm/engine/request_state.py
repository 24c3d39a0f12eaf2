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
from tinyvllm.outputs import Logprob, PromptLogprobs, SampleLogprobs
from tinyvllm.sampling_params import SamplingParams


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

    @property
    def finished(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.seqs)

    def record_logprobs(self, index: int, scored: TokenLogprobs, texts: TokenTexts) -> None:
        """Sequence ``index``'s newest token's log-probabilities."""
        self.logprobs[index].append(texts.logprob_dict(scored))
        self.cumulative_logprobs[index] += scored.logprobs[0]

    def record_prompt_logprobs(self, chunk: PromptLogprobsChunk, texts: TokenTexts) -> None:
        """A prompt chunk's log-probabilities (position p scores prompt token p)."""
        for j, scored in enumerate(chunk.positions):
            self.prompt_logprobs[chunk.start + j] = texts.logprob_dict(scored)


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
