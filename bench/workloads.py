"""The end-to-end workloads (course chapter 15, section 11, names them and gives their floors), as lists of requests.

    latency   batch B of 32-token prompts, 128 greedy tokens each; and one 1024-token prompt (TTFT)
    nano      256 requests: random.seed(0); prompt ids randint(0, 10000), prompt lengths
              randint(100, 1024), then output lengths randint(100, 1024) (in that order, so the
              totals are 142,827 prompt and 133,966 output tokens); temperature 0.6
    random    1000 requests x 1024 prompt / 128 output tokens; temperature 1.0 (vLLM's
              throughput benchmark)

Every request has ``ignore_eos``: it makes exactly ``max_tokens`` tokens, so every engine does
the same work. ``tiny=True`` shrinks the lengths (and the id range to the tiny model's vocabulary)
for CPU runs of the same code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """One request of a workload: its prompt ids, how many tokens it must generate, how to sample."""

    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float


@dataclass(frozen=True)
class LatencySpec:
    """The latency workload's sizes."""

    batches: tuple[int, ...] = (1, 8, 32, 128)
    prompt_len: int = 32
    decode_tokens: int = 128  # decode steps timed (prefill excluded)
    ttft_prompt_len: int = 1024


LATENCY = LatencySpec()
TINY_LATENCY = LatencySpec(batches=(1, 2), prompt_len=8, decode_tokens=8, ttft_prompt_len=32)


def _max_id(vocab_size: int | None) -> int:
    return 10000 if vocab_size is None else min(10000, vocab_size - 1)


def latency_prompts(batch: int, prompt_len: int, vocab_size: int | None = None, seed: int = 1) -> list[list[int]]:
    """``batch`` prompts of ``prompt_len`` random ids (different per row, same for every engine)."""
    rng = random.Random(seed)
    return [[rng.randint(0, _max_id(vocab_size)) for _ in range(prompt_len)] for _ in range(batch)]


def nano_requests(n: int = 256, *, tiny: bool = False, vocab_size: int | None = None) -> list[Request]:
    """nano-vllm's benchmark: ``n`` requests of random lengths, temperature 0.6.

    The draws come in nano-vllm's order (every prompt, then every output length): at n = 256 the
    totals are perf.md's 142,827 prompt and 133,966 output tokens."""
    rng = random.Random(0)
    lo, hi = (8, 48) if tiny else (100, 1024)
    out_lo, out_hi = (4, 12) if tiny else (100, 1024)
    top = _max_id(vocab_size)
    prompts = [[rng.randint(0, top) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    outputs = [rng.randint(out_lo, out_hi) for _ in range(n)]
    return [Request(p, o, 0.6) for p, o in zip(prompts, outputs)]


def random_requests(n: int = 1000, *, tiny: bool = False, vocab_size: int | None = None) -> list[Request]:
    """``n`` requests of 1024 random prompt ids and 128 output tokens (tiny: 32 and 8), temperature 1.0."""
    rng = random.Random(0)
    prompt_len, output_len = (32, 8) if tiny else (1024, 128)
    top = _max_id(vocab_size)
    return [Request([rng.randint(0, top) for _ in range(prompt_len)], output_len, 1.0) for _ in range(n)]


def token_counts(requests: list[Request]) -> tuple[int, int]:
    """(prompt tokens, output tokens) of a workload."""
    return sum(len(r.prompt_token_ids) for r in requests), sum(r.max_tokens for r in requests)
