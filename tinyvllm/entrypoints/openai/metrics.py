"""The server's Prometheus metrics (GET /metrics), with vLLM's names under ``tinyvllm:``.

Counted per request as its stream passes through :meth:`ServerMetrics.track`:

    tinyvllm:prompt_tokens_total, tinyvllm:generation_tokens_total
    tinyvllm:request_success_total{finished_reason="stop|length|abort|error"}
    tinyvllm:time_to_first_token_seconds      arrival -> the first output that carries tokens
    tinyvllm:inter_token_latency_seconds      the gap between two outputs that carry tokens
    tinyvllm:e2e_request_latency_seconds      arrival -> the last output

and, of the first token, where its time went (the engine's clock, `RequestOutput.metrics`):

    tinyvllm:request_queue_time_seconds       the engine's add_request -> its first step
    tinyvllm:request_prefill_time_seconds     its first step -> the first token known on the host
    tinyvllm:first_token_delivery_seconds     the first token known -> here (the pipe from the engine
                                              process, the threads, the event loop)

The time to first token less these three is what the server spent before the engine had the request
(parsing, tokenizing, the pipe to the engine process).

Read from the engine at each scrape (the engine thread's snapshot after its latest step):

    tinyvllm:num_requests_running, tinyvllm:num_requests_waiting
    tinyvllm:num_kv_blocks, tinyvllm:num_free_kv_blocks, tinyvllm:kv_cache_usage_perc (0..1)
    tinyvllm:engine_steps_total               model steps run (tokens / steps: how full they were)
    tinyvllm:prefix_cache_queries_total, tinyvllm:prefix_cache_hits_total   prompt tokens looked up in
                                              the prefix cache, and found there (vLLM's counters)

Each server has its own registry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tinyvllm.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)  # fmt: skip


class _EngineCollector:
    """Gauges computed at scrape time from the engine's stats snapshot."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        s = self.engine.get_stats()
        for name, doc, value in [
            ("num_requests_running", "Requests in the running batch.", s["num_requests_running"]),
            ("num_requests_waiting", "Requests waiting to be scheduled.", s["num_requests_waiting"]),
            ("num_kv_blocks", "KV-cache blocks in all.", s["num_kv_blocks"]),
            ("num_free_kv_blocks", "KV-cache blocks free.", s["num_free_kv_blocks"]),
            ("kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = full).",
             1.0 - s["num_free_kv_blocks"] / max(1, s["num_kv_blocks"])),
        ]:  # fmt: skip
            yield GaugeMetricFamily(f"tinyvllm:{name}", doc, value=value)
        # (the same number of tokens in fewer, fuller steps is what a server at saturation wants)
        yield CounterMetricFamily("tinyvllm:engine_steps", "Model steps the engine has run.",
                                  value=s.get("num_engine_steps", 0))  # fmt: skip
        # vLLM's prefix-cache counters, in prompt tokens: hits / queries is the hit rate
        yield CounterMetricFamily("tinyvllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=s.get("prefix_cache_queries", 0))  # fmt: skip
        yield CounterMetricFamily("tinyvllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=s.get("prefix_cache_hits", 0))  # fmt: skip


class ServerMetrics:
    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("tinyvllm:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("tinyvllm:generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter("tinyvllm:request_success", "Requests finished, by finish reason.",
                                       ["finished_reason"], registry=r)  # fmt: skip
        def latency(name: str, doc: str) -> Histogram:
            return Histogram(f"tinyvllm:{name}_seconds", doc, buckets=_LATENCY_BUCKETS, registry=r)

        self.ttft = latency("time_to_first_token", "Time to the first token.")
        self.itl = latency("inter_token_latency", "Time between two outputs of a request.")
        self.e2e = latency("e2e_request_latency", "Arrival to the last output.")
        self.queue_time = latency("request_queue_time", "Engine arrival to the first step.")
        self.prefill_time = latency("request_prefill_time", "First step to the first token.")
        self.delivery = latency("first_token_delivery", "First token known to the server having it.")
        r.register(_EngineCollector(engine))

    def _first_token_stages(self, out: RequestOutput) -> None:
        m = out.metrics
        if m is None or m.first_token_time is None or m.first_scheduled_time is None:
            return
        self.queue_time.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        self.prefill_time.observe(max(0.0, m.first_token_time - m.first_scheduled_time))
        self.delivery.observe(max(0.0, time.time() - m.first_token_time))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def track(self, stream: AsyncIterator[RequestOutput], num_prompt_tokens: int, delta: bool = False,
                    arrival: float | None = None) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Pass ``stream`` through, recording its timings and token counts (``delta``: its outputs
        are DELTA ones, each with the new tokens only; else each holds all tokens so far;
        ``arrival``: when the request was added, ``time.perf_counter()``; default: the first read)."""
        arrival = last = time.perf_counter() if arrival is None else arrival
        num_tokens = 0
        finished_reason = "abort"  # unless the stream ends properly
        try:
            async with aclosing(stream) as s:
                async for out in s:
                    now = time.perf_counter()
                    total = sum(len(c.token_ids) for c in out.outputs) + (num_tokens if delta else 0)
                    if total > num_tokens:
                        # One inter-token sample per token: an output that brings k tokens at once (a
                        # stream that fell behind gets several steps merged) splits its interval evenly.
                        new = total - num_tokens
                        if num_tokens == 0:
                            self.ttft.observe(now - arrival)
                            self._first_token_stages(out)
                            new -= 1
                        for _ in range(new):
                            self.itl.observe((now - last) / (total - num_tokens))
                        self.generation_tokens.inc(total - num_tokens)
                        num_tokens, last = total, now
                    if out.finished:
                        reasons = [c.finish_reason for c in out.outputs if c.finish_reason]
                        finished_reason = "error" if out.error else (reasons[0] if reasons else "abort")
                    yield out
        except Exception:
            finished_reason = "error"
            raise
        finally:
            self.prompt_tokens.inc(num_prompt_tokens)
            self.request_success.labels(finished_reason=finished_reason).inc()
            self.e2e.observe(time.perf_counter() - arrival)
