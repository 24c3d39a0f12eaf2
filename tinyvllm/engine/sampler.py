"""Sampler: turns a batch of logits into one next token per sequence (and their log-probabilities).

Everything runs on the logits' device, vectorised over the batch: each row has
its own temperature / top-k / top-p / min-p, held in small per-row tensors, so a
batch mixing greedy and random requests is one set of kernels, not a Python
loop over requests. The only device->host transfer of a step is the copy of the
chosen ids (with any log-probabilities: :meth:`SamplerOutput.to_host`), which the
ModelRunner does.

The pipeline, per row (the order vLLM's v1 sampler uses):

0. log-probabilities, for the rows that asked (``SamplingParams.logprobs``): ``log_softmax``
   of these raw logits, before anything below changes them (tinyvllm/engine/logprobs.py).
1. logits processors (tinyvllm/engine/logits_processors.py): ``allowed_token_ids``,
   ``bad_words``, ``min_tokens`` (while a request has produced fewer than ``min_tokens``
   tokens, its EOS and stop-token logits are set to -inf), ``logit_bias``, then the
   presence / frequency / repetition penalties. Skipped when no row uses them.
2. greedy rows (temperature 0) take ``argmax`` of these logits; the rest go on.
3. temperature: ``logits / T``.
4. min-p: drop tokens whose probability is below ``min_p * max_prob``.
5. top-k: keep tokens whose logit is >= the k-th largest (ties at the k-th value kept).
6. top-p: sort descending; keep a token if the probability mass strictly before it
   is < p (so the smallest prefix whose mass reaches p; the top token always stays).
7. sample from ``softmax`` of what is left, with the exponential-race trick:
   ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` is distributed exactly as
   ``Categorical(p)``, and needs no cumulative sum or host sync.
   A request with ``seed`` draws its ``E`` from its own ``torch.Generator``, so its
   tokens do not depend on which other requests share the batch; the others share
   the Sampler's own generator (seeded by ``LLM(seed=...)``).
8. the log-probabilities of the chosen tokens (their rank, and each row's top k) are
   gathered from step 0's; prompt log-probabilities likewise, from the prompt rows' logits.
"""

from __future__ import annotations

from typing import Iterable

import torch

from tinyvllm.engine.logits_processors import apply_logits_processors, to_device as _to_device
from tinyvllm.engine.logprobs import PromptSpan, SamplerOutput, compute_logprobs, gather_logprobs
from tinyvllm.engine.sequence import Sequence
from tinyvllm.sampling_params import SamplingParams


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens with prob < min_p * max prob, per row. min_p: [B] float."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Top-k then top-p masking with one sort. top_k: [B] long (0 = off); top_p: [B] float (1 = off)."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
        kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # (p == 1 is exactly "off": float32 rounding must not drop a tail token)
        drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        drop[:, 0] = False  # the most likely token always survives
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def random_sample(
    probs: torch.Tensor, generators: list[torch.Generator | None], default_generator: torch.Generator | None
) -> torch.Tensor:
    """One draw per row of Categorical(probs) via argmax(probs / Exp(1) noise)."""
    q = torch.empty_like(probs)
    if any(g is None for g in generators):
        q.exponential_(generator=default_generator)
    for i, g in enumerate(generators):
        if g is not None:
            q[i].exponential_(generator=g)
    return (probs / q).argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    *,
    temperature: list[float],
    top_k: list[int] | None = None,
    top_p: list[float] | None = None,
    min_p: list[float] | None = None,
    generators: list[torch.Generator | None] | None = None,
    default_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V] (already processed: see
    :func:`~tinyvllm.engine.logits_processors.apply_logits_processors`); returns a [B] long
    tensor on the logits' device.

    ``top_k``/``top_p``/``min_p`` may be None when no row uses them (skips the work).
    """
    B = logits.shape[0]
    device = logits.device
    logits = logits.float()
    greedy = [t == 0.0 for t in temperature]
    greedy_ids = logits.argmax(dim=-1)
    if all(greedy):
        return greedy_ids

    temp = _to_device([1.0 if g else t for g, t in zip(greedy, temperature)], torch.float32, device)
    x = logits / temp.unsqueeze(1)
    if min_p is not None and any(m > 0.0 for m in min_p):
        x = apply_min_p(x, _to_device(min_p, torch.float32, device))
    use_k = top_k is not None and any(k > 0 for k in top_k)
    use_p = top_p is not None and any(p < 1.0 for p in top_p)
    if use_k or use_p:
        x = apply_top_k_top_p(
            x,
            _to_device(top_k, torch.long, device) if use_k else None,
            _to_device(top_p, torch.float32, device) if use_p else None,
        )
    probs = torch.softmax(x, dim=-1)
    sampled = random_sample(probs, generators or [None] * B, default_generator)
    if not any(greedy):
        return sampled
    return torch.where(_to_device(greedy, torch.bool, device), greedy_ids, sampled)


def _plain(p: SamplingParams) -> bool:
    """Nothing to process and no log-probabilities: the row's token comes from its logits alone.
    (Checked per distinct params object: the requests of one ``LLM.generate`` share theirs, so a
    batch of 256 costs one check, not seven lists of 256.)"""
    return (p.logprobs is None and not p.min_tokens and p.allowed_token_ids is None
            and not p._bad_words_token_ids and not p.logit_bias and not p.presence_penalty
            and not p.frequency_penalty and p.repetition_penalty == 1.0)  # fmt: skip


class Sampler:
    """Per-step glue: reads each sequence's SamplingParams, computes the log-probabilities the
    rows asked for, applies the logits processors and calls :func:`sample`.

    ``eos_token_ids`` are banned (with each request's stop token ids) while a request has fewer
    than ``min_tokens`` outputs. Unseeded requests draw from this sampler's generator, seeded
    with ``seed`` (``LLM(seed=...)``; None: 0) on ``device``.
    """

    def __init__(self, eos_token_ids: Iterable[int] = (), seed: int | None = 0, device: str | torch.device = "cpu"):
        self.eos_token_ids = list(eos_token_ids)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(0 if seed is None else seed)

    def __call__(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        prompt_logits: torch.Tensor | None = None,
        prompt_spans: list[PromptSpan] = (),
        draws: list[bool] | None = None,
    ) -> SamplerOutput:
        """``logits`` [B, V]: row i is ``seqs[i]``'s next-token logits. ``prompt_logits`` [P, V]:
        the rows of the ``prompt_spans`` (tinyvllm.engine.logprobs.prompt_logprob_spans), in order.
        ``draws[i]`` False: row i's token will be dropped (a prompt chunk), so its own seeded
        generator is left as it is. Returns the sampled ids and the log-probabilities, still on
        the device."""
        params = [s.sampling_params for s in seqs]
        logits = logits.float()
        if not prompt_spans:  # two shortcuts to what steps 0-8 come to, without the per-row lists
            unique = list({id(p): p for p in params}.values())  # (an LLM.generate batch shares one)
            if all(_plain(p) and p.temperature == 0.0 for p in unique):
                return SamplerOutput(logits.argmax(dim=-1))
            p, B = unique[0], len(seqs)
            if len(unique) == 1 and _plain(p) and all(s.generator is None for s in seqs):
                return SamplerOutput(sample(logits, temperature=[float(p.temperature)] * B, top_k=[p.top_k] * B,
                                            top_p=[float(p.top_p)] * B, min_p=[float(p.min_p)] * B,
                                            default_generator=self.generator))  # fmt: skip
        device = logits.device
        # 0. raw log-probabilities, before any processing (only the rows that asked).
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = None
        if lp_rows:
            whole = len(lp_rows) == len(seqs)
            d_rows = None if whole else _to_device(lp_rows, torch.long, device)
            raw_logprobs = compute_logprobs(logits if whole else logits.index_select(0, d_rows))
        # 1-7. processors, then greedy or random.
        processed = apply_logits_processors(logits, seqs, self.eos_token_ids)
        token_ids = sample(
            processed,
            temperature=[float(p.temperature) for p in params],
            top_k=[p.top_k for p in params],
            top_p=[float(p.top_p) for p in params],
            min_p=[float(p.min_p) for p in params],
            generators=[s.generator if draws is None or draws[i] else None for i, s in enumerate(seqs)],
            default_generator=self.generator,
        )
        out = SamplerOutput(token_ids)
        # 8. the chosen tokens' log-probabilities; the prompt tokens'.
        if lp_rows:
            chosen = token_ids if d_rows is None else token_ids.index_select(0, d_rows)
            out.num_logprobs = [params[i].logprobs for i in lp_rows]
            out.logprobs = gather_logprobs(raw_logprobs, chosen, max(out.num_logprobs))
            out.logprob_rows = lp_rows
        if prompt_spans:
            targets = [  # position p scores prompt token p + 1
                t for sp in prompt_spans for t in seqs[sp.seq_index].token_ids[sp.first + 1 : sp.first + sp.count + 1]
            ]
            if prompt_logits is None or prompt_logits.shape[0] != len(targets):
                raise ValueError(f"prompt logprobs: {len(targets)} prompt rows expected, got "
                                 f"{None if prompt_logits is None else prompt_logits.shape[0]}")
            out.prompt_num_logprobs = [params[sp.seq_index].prompt_logprobs for sp in prompt_spans]
            out.prompt_logprobs = gather_logprobs(
                compute_logprobs(prompt_logits), _to_device(targets, torch.long, device), max(out.prompt_num_logprobs)
            )
            out.prompt_spans = list(prompt_spans)
        return out
