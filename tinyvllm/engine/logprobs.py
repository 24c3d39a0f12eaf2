"""Log-probabilities on the device, and the step's results on their way to the host.

What a request gets (vLLM's meaning, its default "raw logprobs"): for a scored token ``t`` at a
position whose logits are ``z``, ``log_softmax(z)[t]``, computed from the model's logits before
temperature, penalties or any other processing, so the numbers describe the model, not the
request's sampling knobs. With them come the token's ``rank`` (how many tokens have a
log-probability at least as high: 1 for the most likely) and the ``k`` most likely tokens with
theirs (``SamplingParams.logprobs=k``). The scored token is the sampled one for a generated
position, and the prompt's next token for a prompt position (``prompt_logprobs``).

All of it runs on the logits' device, vectorised over the rows: one ``log_softmax``, one
``gather`` for the scored tokens, one comparison-and-sum for their ranks, one ``topk`` at the
largest k any row asked for (a row that asked for fewer takes a prefix of it on the host). The
host receives the results with the sampled ids in ONE device->host copy:
:meth:`SamplerOutput.to_host` bit-casts the float32 log-probabilities to int32 and concatenates
them with the token ids and ranks, then splits and casts back on the host (exact: no rounding
through another type). A step where no row asked for log-probabilities copies only the ids, as
before.

Prompt log-probabilities need the logits of every prompt position, not only the last one: the
model runner adds those rows to its lm_head for the sequences that ask (:func:`prompt_logprob_spans`
says which), and keeps the lm_head on last rows only otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence as SequenceLike

import torch


class TokenLogprobs(NamedTuple):
    """One scored position, on the host: ``token_ids[0]`` is the scored token, then the top k
    (most likely first); ``logprobs`` pairs with them; ``rank`` is the scored token's."""

    token_ids: list[int]
    logprobs: list[float]
    rank: int


class PromptLogprobsChunk(NamedTuple):
    """The prompt positions one step scored for one sequence: ``positions[j]`` scores prompt token
    ``start + j`` (``start >= 1``: the first prompt token has no logits before it)."""

    start: int
    positions: list[TokenLogprobs]


@dataclass
class LogprobsTensors:
    """Scored positions on the device, one row each: ``token_ids`` [N, 1 + k] (column 0 the scored
    token, then the top k), ``logprobs`` [N, 1 + k] float32, ``ranks`` [N] (the scored token's)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    ranks: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.token_ids.shape[0]

    @property
    def width(self) -> int:
        return self.token_ids.shape[1]


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the vocabulary, in float32: [N, V] -> [N, V]."""
    return torch.log_softmax(logits.float(), dim=-1)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int) -> LogprobsTensors:
    """Score ``token_ids`` [N] (one per row of ``logprobs`` [N, V]) and add each row's top
    ``num_logprobs``. The rank is vLLM's: the number of tokens whose log-probability is >= the
    scored one's (1 for the argmax; ties count against the token)."""
    token_ids = token_ids.long().unsqueeze(1)
    token_logprobs = logprobs.gather(1, token_ids)
    ranks = (logprobs >= token_logprobs).sum(dim=-1)
    if num_logprobs > 0:
        top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)
        token_ids = torch.cat([token_ids, top_ids], dim=1)
        token_logprobs = torch.cat([token_logprobs, top_logprobs], dim=1)
    return LogprobsTensors(token_ids, token_logprobs, ranks)


class PromptSpan(NamedTuple):
    """Sequence ``seq_index`` of the batch needs the logits of its positions ``first ..
    first + count - 1`` (this step's rows ``row .. row + count - 1``): position p scores prompt token p + 1."""

    seq_index: int
    first: int
    count: int
    row: int = 0


def prompt_logprob_spans(seqs: SequenceLike, num_scheduled_tokens: SequenceLike[int]) -> list[PromptSpan]:
    """Which of this step's rows prompt log-probabilities need.

    A sequence computing positions ``start .. end - 1`` scores, from the logits of position p, the
    prompt token p + 1, for every p with p + 1 < L (L prompt tokens): positions ``start ..
    min(end, L - 1) - 1``. Only sequences whose ``prompt_logprobs`` is set and that have no output
    yet ask (a preempted sequence recomputing its prompt already reported it); ``row`` is the
    first position's row in the step's flat, token-major batch.
    """
    spans: list[PromptSpan] = []
    row = 0
    for i, (seq, n) in enumerate(zip(seqs, num_scheduled_tokens)):
        if seq.sampling_params.prompt_logprobs is not None and seq.num_output_tokens == 0:
            start = seq.num_computed_tokens
            stop = min(start + n, seq.num_prompt_tokens - 1)
            if stop > start:
                spans.append(PromptSpan(i, start, stop - start, row))
        row += n
    return spans


@dataclass
class ModelRunnerOutput:
    """One step's results on the host, one entry per scheduled sequence (vLLM's name).

    ``logprobs[i]``: the sampled token's log-probability, rank and top k (None if the sequence did
    not ask). ``prompt_logprobs[i]``: the prompt tokens this step scored for it (None if none).
    """

    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobsChunk | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.sampled_token_ids)
        if not self.logprobs:
            self.logprobs = [None] * n
        if not self.prompt_logprobs:
            self.prompt_logprobs = [None] * n


@dataclass
class SamplerOutput:
    """What the sampler leaves on the device: the sampled ids [B]; for the rows
    ``logprob_rows`` (and their own ``num_logprobs``), the sampled tokens' log-probabilities; for
    the ``prompt_spans``, the prompt tokens' (``prompt_num_logprobs`` per span)."""

    sampled_token_ids: torch.Tensor
    logprobs: LogprobsTensors | None = None
    logprob_rows: list[int] = field(default_factory=list)
    num_logprobs: list[int] = field(default_factory=list)
    prompt_logprobs: LogprobsTensors | None = None
    prompt_spans: list[PromptSpan] = field(default_factory=list)
    prompt_num_logprobs: list[int] = field(default_factory=list)

    def to_host(self) -> ModelRunnerOutput:
        """Copy everything to the host in one transfer (it waits for the step's kernels)."""
        return self.unpack(self.pack().cpu())

    def pack(self) -> torch.Tensor:
        """Everything the host needs as ONE device tensor: the ids alone (int64), or with any
        log-probabilities the ids, token ids, bit-cast logprobs and ranks as int32."""
        if self.logprobs is None and self.prompt_logprobs is None:
            return self.sampled_token_ids
        parts = [self.sampled_token_ids.to(torch.int32)]
        for t in (self.logprobs, self.prompt_logprobs):
            if t is not None:
                # float32 -> int32 is a bit-cast (a view), undone on the host: exact.
                bits = t.logprobs.float().contiguous().view(torch.int32)
                parts += [t.token_ids.to(torch.int32).flatten(), bits.flatten(), t.ranks.to(torch.int32)]
        return torch.cat(parts)

    def unpack(self, host: torch.Tensor) -> ModelRunnerOutput:
        """:meth:`pack`'s tensor, now on the host, as a ModelRunnerOutput."""
        if self.logprobs is None and self.prompt_logprobs is None:
            return ModelRunnerOutput(host.tolist())
        B = self.sampled_token_ids.shape[0]
        out = ModelRunnerOutput(host[:B].tolist())
        offset = B

        def unpack(t: LogprobsTensors) -> list[TokenLogprobs]:
            nonlocal offset
            n, w = t.num_rows, t.width
            ids = host[offset : offset + n * w].view(n, w).tolist()
            lps = host[offset + n * w : offset + 2 * n * w].view(torch.float32).view(n, w).tolist()
            ranks = host[offset + 2 * n * w : offset + 2 * n * w + n].tolist()
            offset += 2 * n * w + n
            return [TokenLogprobs(i, l, r) for i, l, r in zip(ids, lps, ranks)]

        if self.logprobs is not None:
            for row, k, lp in zip(self.logprob_rows, self.num_logprobs, unpack(self.logprobs)):
                out.logprobs[row] = TokenLogprobs(lp.token_ids[: 1 + k], lp.logprobs[: 1 + k], lp.rank)
        if self.prompt_logprobs is not None:
            rows = unpack(self.prompt_logprobs)
            r = 0
            for span, k in zip(self.prompt_spans, self.prompt_num_logprobs):
                positions = [
                    TokenLogprobs(p.token_ids[: 1 + k], p.logprobs[: 1 + k], p.rank) for p in rows[r : r + span.count]
                ]
                out.prompt_logprobs[span.seq_index] = PromptLogprobsChunk(span.first + 1, positions)
                r += span.count
        return out
