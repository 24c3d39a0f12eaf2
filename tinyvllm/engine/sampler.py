"""Sampler: turns a batch of logits into one next token per sequence.

Everything runs on the logits' device, vectorised over the batch: each row has
its own temperature / top-k / top-p / min-p, held in small per-row tensors, so a
batch mixing greedy and random requests is one set of kernels, not a Python
loop over requests. The only device->host transfer of a step is the final
``.tolist()`` of the chosen ids, which the ModelRunner does.

The pipeline, per row (the order vLLM's v1 sampler uses):

1. ``min_tokens`` suppression: while a request has produced fewer than
   ``min_tokens`` tokens, its EOS and stop-token logits are set to -inf.
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
"""

from __future__ import annotations

from typing import Iterable

import torch

from tinyvllm.engine.sequence import Sequence


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
    banned: list[list[int]] | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]; returns a [B] long tensor on the logits' device.

    ``top_k``/``top_p``/``min_p`` may be None when no row uses them (skips the work).
    ``banned[i]`` lists token ids row i may not produce this step (min_tokens).
    """
    B = logits.shape[0]
    device = logits.device
    logits = logits.float()
    if banned is not None and any(banned):
        rows = [i for i, ids in enumerate(banned) for _ in ids]
        cols = [t for ids in banned for t in ids]
        logits = logits.clone()
        logits[_to_device(rows, torch.long, device), _to_device(cols, torch.long, device)] = float("-inf")

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


class Sampler:
    """Per-step glue: reads each sequence's SamplingParams and calls :func:`sample`.

    ``eos_token_ids`` are banned (with each request's stop token ids) while a request has fewer
    than ``min_tokens`` outputs. Unseeded requests draw from this sampler's generator, seeded
    with ``seed`` (``LLM(seed=...)``; None: 0) on ``device``.
    """

    def __init__(self, eos_token_ids: Iterable[int] = (), seed: int | None = 0, device: str | torch.device = "cpu"):
        self.eos_token_ids = list(eos_token_ids)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(0 if seed is None else seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.sampling_params for s in seqs]
        banned = []
        for s, p in zip(seqs, params):
            ids: list[int] = []
            if s.num_output_tokens < p.min_tokens:
                ids = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            banned.append(ids)
        return sample(
            logits,
            temperature=[float(p.temperature) for p in params],
            top_k=[p.top_k for p in params],
            top_p=[float(p.top_p) for p in params],
            min_p=[float(p.min_p) for p in params],
            generators=[s.generator for s in seqs],
            default_generator=self.generator,
            banned=banned,
        )
