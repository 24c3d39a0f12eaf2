"""Engine statistics: the counters behind the periodic stats line and ``LLM.get_metrics()``.

While work runs, the engine logs one line every ``LOG_STATS_INTERVAL_S`` seconds (INFO on
the ``tinyvllm`` logger; off with ``disable_log_stats=True``), in vLLM's words::

    Avg prompt throughput: 8123.4 tokens/s, Avg generation throughput: 1510.2 tokens/s,
    Running: 64 reqs, Waiting: 192 reqs, KV cache usage: 87.5%, Prefix cache hit rate: 93.1%,
    Preemptions: 0

* throughputs: tokens since the previous line over the seconds since it. A prompt counts
  all its tokens when its first token is sampled (cached ones included, as vLLM counts);
  generation counts every sampled token;
* running / waiting: the scheduler's queues now; KV cache usage: blocks in use (cached
  blocks nobody uses are free);
* prefix cache hit rate: of the prompt tokens looked up by the last ~1000 admitted
  requests, the share found in the cache (vLLM's window);
* preemptions since the previous line.

``get_metrics()`` returns the same numbers as vLLM's ``LLM.get_metrics()`` does: a list of
``Counter`` (totals since the engine started) and ``Gauge`` (values now), under vLLM's
metric names, so that code reading them from vLLM reads them from tinyvllm unchanged::

    {m.name: m.value for m in llm.get_metrics()}["vllm:prefix_cache_hits"]
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from tinyvllm.engine.scheduler import Scheduler
    from tinyvllm.engine.sequence import Sequence

logger = logging.getLogger("tinyvllm")

LOG_STATS_INTERVAL_S = 5.0
HIT_RATE_WINDOW_REQUESTS = 1000  # vLLM's window for the logged prefix-cache hit rate


@dataclass
class Metric:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Counter(Metric):
    """A total since the engine started."""

    value: int = 0


@dataclass
class Gauge(Metric):
    """A value now."""

    value: float = 0.0


class EngineStats:
    """Counts what the engine's steps did; logs the stats line; builds ``get_metrics()``."""

    def __init__(self, scheduler: "Scheduler", *, log_stats: bool = True,
                 interval_s: float = LOG_STATS_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self.log_stats = log_stats
        self.interval_s = interval_s
        self.clock = clock
        # Totals since the start.
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.request_success: dict[str, int] = {}  # finish_reason -> finished requests
        # The current interval of the stats line (None: no work since the last one, or ever).
        self._interval_start: float | None = None
        self._interval_prompt = 0
        self._interval_generation = 0
        self._interval_preemptions_at = 0
        # (requests, queried tokens, hit tokens) per step with admissions, for the windowed hit rate.
        self._recent: deque[tuple[int, int, int]] = deque()
        self._recent_sums = [0, 0, 0]
        self._seen = (0, 0, 0)  # the scheduler's (requests, queries, hits) when last read

    # ---- recording -------------------------------------------------------------------------
    def on_step(self, sampled: list["Sequence"]) -> None:
        """After a step: ``sampled`` got one new token each. Logs the line when it is due."""
        now = self.clock()
        if self._interval_start is None:
            self._interval_start = now
            self._interval_preemptions_at = self.scheduler.num_preemptions
        for seq in sampled:
            if seq.num_output_tokens == 1:  # the prompt is done (a recomputed one is not counted twice)
                self.prompt_tokens += seq.num_prompt_tokens
                self._interval_prompt += seq.num_prompt_tokens
        self.generation_tokens += len(sampled)
        self._interval_generation += len(sampled)
        self._read_prefix_cache()
        if self.log_stats and now - self._interval_start >= self.interval_s:
            logger.info("%s", self.format_line(now))
            self._start_interval(now)
        if not self.scheduler.has_unfinished():
            self._interval_start = None  # idle: the next work starts a fresh interval

    def on_finished(self, seq: "Sequence") -> None:
        """A request finished (any reason: stop, length, abort, error)."""
        reason = seq.finish_reason or "unknown"
        self.request_success[reason] = self.request_success.get(reason, 0) + 1

    def _start_interval(self, now: float) -> None:
        self._interval_start = now
        self._interval_prompt = self._interval_generation = 0
        self._interval_preemptions_at = self.scheduler.num_preemptions

    def _read_prefix_cache(self) -> None:
        s = self.scheduler
        now = (s.prefix_cache_requests, s.prefix_cache_queries, s.prefix_cache_hits)
        delta = tuple(a - b for a, b in zip(now, self._seen))
        self._seen = now
        if delta[0] == 0:
            return
        self._recent.append(delta)
        self._recent_sums = [a + b for a, b in zip(self._recent_sums, delta)]
        while len(self._recent) > 1 and self._recent_sums[0] - self._recent[0][0] >= HIT_RATE_WINDOW_REQUESTS:
            old = self._recent.popleft()
            self._recent_sums = [a - b for a, b in zip(self._recent_sums, old)]

    # ---- reading ---------------------------------------------------------------------------
    @property
    def recent_hit_rate(self) -> float:
        """Hit tokens over queried tokens of the last ~1000 admitted requests (0 before any)."""
        _, queries, hits = self._recent_sums
        return hits / queries if queries else 0.0

    def format_line(self, now: float) -> str:
        s = self.scheduler
        elapsed = max(now - (self._interval_start if self._interval_start is not None else now), 1e-9)
        parts = [
            f"Avg prompt throughput: {self._interval_prompt / elapsed:.1f} tokens/s",
            f"Avg generation throughput: {self._interval_generation / elapsed:.1f} tokens/s",
            f"Running: {len(s.running)} reqs",
            f"Waiting: {len(s.waiting)} reqs",
            f"KV cache usage: {100 * s.block_manager.usage:.1f}%",
        ]
        if s.block_manager.enable_prefix_caching:
            parts.append(f"Prefix cache hit rate: {100 * self.recent_hit_rate:.1f}%")
        parts.append(f"Preemptions: {s.num_preemptions - self._interval_preemptions_at}")
        return ", ".join(parts)

    def get_metrics(self) -> list[Metric]:
        """vLLM's metric names: gauges now, counters since the engine started."""
        s = self.scheduler
        metrics: list[Metric] = [
            Gauge("vllm:num_requests_running", value=len(s.running)),
            Gauge("vllm:num_requests_waiting", value=len(s.waiting)),
            Gauge("vllm:kv_cache_usage_perc", value=s.block_manager.usage),  # a fraction, as vLLM's
            Counter("vllm:num_preemptions", value=s.num_preemptions),
            Counter("vllm:prompt_tokens", value=self.prompt_tokens),
            Counter("vllm:generation_tokens", value=self.generation_tokens),
            Counter("vllm:prefix_cache_queries", value=s.prefix_cache_queries),
            Counter("vllm:prefix_cache_hits", value=s.prefix_cache_hits),
        ]
        for reason, n in sorted(self.request_success.items()):
            metrics.append(Counter("vllm:request_success", {"finished_reason": reason}, n))
        return metrics
