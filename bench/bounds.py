"""The ideal time of a run: each model step at the card's ceilings, summed over the steps.

A step streams bytes (weights, KV cache) and does matmul FLOPs. At best it does both at its
ceiling at once, so it takes at least

    step bound = max(bytes / copy bandwidth, FLOPs / matmul rate)

with both ceilings measured in the same run (a >= 1 GiB device copy; an 8192^3 bf16 matmul).
A run's bound is the sum over its steps; its fraction of the bound is bound / measured time.

Bytes of a step, each read once:
  * the weights: every parameter once (a tied embedding counts once: the lm_head reads the
    whole matrix, the embedding lookup only one row per token);
  * the KV cache: ``kv_bytes_per_token`` x the sum over sequences of their length after the
    step (cached + new tokens: each new token's k/v is written, then read with the rest).
FLOPs of a step (2 per multiply-add):
  * linear layers: 2 x ``linear_params`` per new token (q, k, v, o, gate, up, down of every
    layer) + 2 x ``lm_head_params`` per sequence (only each sequence's last token gets logits);
  * attention: ``attention_flops_per_pair`` = 4 x Hq x D x layers per (query, key) pair
    (Q K^T and P V); causally, a sequence with c cached and n new tokens has
    n c + n (n + 1) / 2 pairs.
At Llama-3.2-1B shapes a decode step (one new token per sequence) comes out memory-bound and a
prefill step of thousands of tokens compute-bound (about 1.95 GFLOP per prompt token of linear
layers plus its attention).

The steps come from the engine's real schedule (:class:`ScheduleRecorder` wraps its scheduler)
or from :func:`ideal_schedule`, the same first-come-first-served policy with a KV cache that
never runs out (no preemption). No torch here: it is arithmetic, tested on the CPU by hand.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class ModelShape:
    """What the bound needs to know of a model: its bytes and its FLOPs per token."""

    weight_bytes: int  # every parameter once
    kv_bytes_per_token: int  # k and v of one token, all layers
    linear_params: int  # weights every token multiplies (all layers' projections; no embedding, no lm_head)
    lm_head_params: int  # vocab x hidden: multiplied once per sequence per step
    attention_flops_per_pair: int  # 4 x Hq x D x layers
    params: int = 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any], dtype_bytes: int = 2) -> "ModelShape":
        """From a Llama config.json dict (bias-free projections, as Llama 3.2)."""
        h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
        layers, hq, hk = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        d = cfg.get("head_dim") or h // hq
        per_layer_linear = (hq * d + 2 * hk * d) * h + h * hq * d + 3 * i * h  # qkv, o, gate/up/down
        linear = layers * per_layer_linear
        norms = layers * 2 * h + h
        lm_head = v * h
        params = linear + norms + v * h + (0 if cfg.get("tie_word_embeddings") else lm_head)
        return cls(
            weight_bytes=params * dtype_bytes,
            kv_bytes_per_token=2 * layers * hk * d * dtype_bytes,
            linear_params=linear,
            lm_head_params=lm_head,
            attention_flops_per_pair=4 * hq * d * layers,
            params=params,
        )


@dataclass(frozen=True)
class Step:
    """One model step: sequence s had ``cached[s]`` tokens in the KV cache and runs ``new[s]`` more."""

    cached: tuple[int, ...]
    new: tuple[int, ...]

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.new)


@dataclass(frozen=True)
class StepCost:
    """A step's (or a run's) bytes, FLOPs and the times they take at the ceilings."""

    bytes: float
    flops: float
    memory_s: float
    compute_s: float

    @property
    def bound_s(self) -> float:
        return max(self.memory_s, self.compute_s)


def step_cost(step: Step, shape: ModelShape, bandwidth: float, matmul_rate: float) -> StepCost:
    """Bytes and FLOPs of one step (the module docstring gives the arithmetic) and their times.

    ``bandwidth`` in bytes/s, ``matmul_rate`` in FLOP/s."""
    tokens = sum(step.new)
    seq_lens = sum(c + n for c, n in zip(step.cached, step.new))
    pairs = sum(n * c + n * (n + 1) // 2 for c, n in zip(step.cached, step.new))
    nbytes = shape.weight_bytes + shape.kv_bytes_per_token * seq_lens
    flops = (2 * shape.linear_params * tokens + 2 * shape.lm_head_params * len(step.new)
             + shape.attention_flops_per_pair * pairs)
    return StepCost(nbytes, flops, nbytes / bandwidth, flops / matmul_rate)


def schedule_bound(steps: Iterable[Step], shape: ModelShape, bandwidth: float, matmul_rate: float) -> dict:
    """The bound of a run: the sum over its steps of max(memory time, compute time), split into
    prefill and decode steps. Times in seconds; ``bound_s`` is the total."""
    out = {"bound_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "prefill_steps": 0, "decode_steps": 0,
           "memory_bound_steps": 0, "compute_bound_steps": 0, "bytes": 0.0, "flops": 0.0}
    for step in steps:
        cost = step_cost(step, shape, bandwidth, matmul_rate)
        kind = "decode" if step.is_decode else "prefill"
        out[f"{kind}_s"] += cost.bound_s
        out[f"{kind}_steps"] += 1
        out["memory_bound_steps" if cost.memory_s >= cost.compute_s else "compute_bound_steps"] += 1
        out["bound_s"] += cost.bound_s
        out["bytes"] += cost.bytes
        out["flops"] += cost.flops
    return out


def latency_steps(batch: int, prompt_len: int, decode_tokens: int) -> list[Step]:
    """The decode steps of the latency workload: ``batch`` sequences of ``prompt_len`` prompt tokens
    (the prefill made the first output token), then ``decode_tokens`` steps of one token each."""
    return [Step((prompt_len + k,) * batch, (1,) * batch) for k in range(decode_tokens)]


def ideal_schedule(prompt_lens: list[int], output_lens: list[int], max_num_seqs: int,
                   max_num_batched_tokens: int) -> list[Step]:
    """The steps tinyvllm's scheduler policy makes when the KV cache never runs out.

    First come, first served: a prefill step admits waiting requests in order while the running
    ones stay under ``max_num_seqs`` and the step's prompt tokens under ``max_num_batched_tokens``
    (stopping at the first that does not fit); it makes each one's first output token. When no
    request can be admitted, a decode step runs every running request one token. A request
    leaves as soon as it has ``output_lens[i]`` tokens."""
    if len(prompt_lens) != len(output_lens):
        raise ValueError(f"{len(prompt_lens)} prompt lengths for {len(output_lens)} output lengths")
    if any(p < 1 for p in prompt_lens) or any(o < 1 for o in output_lens):
        raise ValueError("prompt and output lengths must be at least 1")
    if max(prompt_lens, default=0) > max_num_batched_tokens:
        raise ValueError(f"a prompt of {max(prompt_lens)} tokens never fits max_num_batched_tokens={max_num_batched_tokens}")
    waiting = deque(range(len(prompt_lens)))
    running: list[list[int]] = []  # [tokens in the cache, output tokens still to make]
    steps: list[Step] = []
    while waiting or running:
        admitted: list[int] = []
        tokens = 0
        while waiting and len(running) + len(admitted) < max_num_seqs:
            p = prompt_lens[waiting[0]]
            if tokens + p > max_num_batched_tokens:
                break
            admitted.append(waiting.popleft())
            tokens += p
        if admitted:
            steps.append(Step((0,) * len(admitted), tuple(prompt_lens[i] for i in admitted)))
            running += [[prompt_lens[i], output_lens[i] - 1] for i in admitted]
        else:
            steps.append(Step(tuple(c for c, _ in running), (1,) * len(running)))
            for seq in running:
                seq[0] += 1
                seq[1] -= 1
        running = [seq for seq in running if seq[1] > 0]
    return steps


class ScheduleRecorder:
    """Records the steps an LLMEngine's scheduler hands out, as :class:`Step` s.

    It wraps the scheduler's ``schedule`` method on that one instance (the package is not
    changed): per step it reads each scheduled sequence's ``num_computed_tokens`` (what the
    cache holds) and its scheduled count, O(batch) list work, a few microseconds at batch 256. And
    the host clock at each call (``times``): the time from one step's scheduling to the next is
    that step's share of the run (the host runs one step ahead of the GPU, so a step's share is
    the GPU time of its neighbour, give or take; the kinds come in long runs, so the sums hold)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.steps: list[Step] = []
        self.times: list[float] = []
        self._own = "schedule" in vars(scheduler)  # already wrapped on the instance (else: the class's method)
        self._inner = scheduler.schedule

        def schedule() -> Any:
            self.times.append(time.perf_counter())
            out = self._inner()
            self.steps.append(Step(tuple([s.num_computed_tokens for s in out.seqs]), tuple(out.num_scheduled_tokens)))
            return out

        scheduler.schedule = schedule

    def detach(self) -> list[Step]:
        """Give the scheduler its own method back; return the steps recorded."""
        if self._own:
            self.scheduler.schedule = self._inner
        else:
            del self.scheduler.schedule
        return self.steps

    def seconds_by_kind(self, end: float) -> dict[str, float]:
        """Wall seconds from each step's scheduling to the next's (the last: to ``end``), summed
        over the prefill steps (any sequence with more than one new token) and the decode steps."""
        out = {"prefill_s": 0.0, "decode_s": 0.0}
        for i, step in enumerate(self.steps):
            nxt = self.times[i + 1] if i + 1 < len(self.times) else end
            out["decode_s" if step.is_decode else "prefill_s"] += nxt - self.times[i]
        return out
