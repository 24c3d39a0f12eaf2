"""`tinyvllm bench serve`: load a running server with streamed completions and measure it,
with the metrics of vLLM's serving benchmark (benchmarks/benchmark_serving.py).

    tinyvllm serve &                                   # or any OpenAI-compatible server
    tinyvllm bench serve --num-prompts 200 --random-input-len 512 --random-output-len 128 \\
        --request-rate 1 4 inf --result-file bench.json

Requests (datasets.py) are sent to /v1/completions with ``stream: true`` and
``stream_options.include_usage``; arrivals follow a Poisson process at ``--request-rate``
requests/s (a gamma process with ``--burstiness`` != 1; ``inf`` sends all at once), and at most
``--max-concurrency`` are in flight. For each request, timed on the client:

* TTFT, time to first token: from sending to the first chunk that carries text.
* ITL, inter-token latency: the gap between two consecutive chunks (every gap of every request).
* TPOT, time per output token: (e2e latency - TTFT) / (output tokens - 1), per request with > 1 token.
* E2E latency: from sending to the last chunk.

Throughput: completed requests / duration, output tokens / duration, (prompt + output tokens) /
duration, where duration is the wall time from the first send to the last completion and output
tokens are the server's usage counts. Latencies are reported in ms: mean, median, std and the
``--metric-percentiles`` (default 50 and 99).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from tinyvllm.benchmarks.datasets import SampleRequest, random_requests, sharegpt_requests


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


# ---- the client ----------------------------------------------------------------------------------
async def send_request(session, url: str, payload: dict, headers: dict, prompt_len: int) -> RequestResult:
    result = RequestResult(prompt_len=prompt_len)
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", str(chunk["error"]))
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                elif chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
        result.latency = last - start
        result.success = result.ttft > 0.0
        if not result.success:
            result.error = "the stream carried no text chunk"
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
    return result


def arrival_gaps(rate: float, burstiness: float, n: int, rng: np.random.Generator) -> list[float]:
    """Seconds to wait before each request: gamma(shape=burstiness, mean=1/rate); burstiness 1 is Poisson."""
    if rate == float("inf"):
        return [0.0] * n
    return list(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n))


def _headers(args: argparse.Namespace) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def _payload(args: argparse.Namespace, model: str, r: SampleRequest) -> dict:
    return {"model": model, "prompt": r.prompt, "max_tokens": r.expected_output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}  # fmt: skip


async def initial_test(args: argparse.Namespace, r: SampleRequest, model: str) -> RequestResult:
    """One request alone before the runs, not counted (vLLM's "initial single prompt test run"): a
    request the server refuses fails here, once, and the first request's one-time costs (the
    server's first tokenization, its GPU's lazy start-up) stay out of the measured numbers."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        return await send_request(session, args.base_url.rstrip("/") + args.endpoint, _payload(args, model, r),
                                  _headers(args), r.prompt_len)  # fmt: skip


async def run_benchmark(args: argparse.Namespace, requests: list[SampleRequest], model: str, rate: float) -> dict:
    import aiohttp

    url = args.base_url.rstrip("/") + args.endpoint
    headers = _headers(args)
    gaps = arrival_gaps(rate, args.burstiness, len(requests), np.random.default_rng(args.seed))
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    connector = aiohttp.TCPConnector(limit=0)  # our semaphore limits concurrency, not the pool

    def payload(r: SampleRequest) -> dict:
        return _payload(args, model, r)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(r: SampleRequest) -> RequestResult:
            if limit is None:
                return await send_request(session, url, payload(r), headers, r.prompt_len)
            async with limit:
                return await send_request(session, url, payload(r), headers, r.prompt_len)

        start = time.perf_counter()
        tasks = []
        for r, gap in zip(requests, gaps):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(r)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return compute_metrics(results, duration, args.metric_percentiles) | {
        "request_rate": rate if rate != float("inf") else "inf",  # JSON has no infinity
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
    }  # fmt: skip


# ---- the metrics -----------------------------------------------------------------------------------
def compute_metrics(results: list[RequestResult], duration: float, percentiles: list[float]) -> dict:
    """vLLM's definitions (see the module docstring); latencies in ms."""
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    series = {"ttft": [r.ttft for r in ok], "tpot": tpots, "itl": [x for r in ok for x in r.itl],
              "e2el": [r.latency for r in ok]}  # fmt: skip
    metrics = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration, "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }  # fmt: skip
    for name, values in series.items():
        ms = np.asarray(values or [0.0]) * 1000.0
        metrics[f"mean_{name}_ms"] = float(ms.mean())
        metrics[f"median_{name}_ms"] = float(np.median(ms))
        metrics[f"std_{name}_ms"] = float(ms.std())
        for p in percentiles:
            metrics[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    metrics["input_lens"] = [r.prompt_len for r in results]
    metrics["output_lens"] = [r.output_tokens for r in results]
    metrics["ttfts"] = [r.ttft for r in results]
    metrics["errors"] = [r.error for r in results]
    return metrics


def format_table(m: dict, percentiles: list[float]) -> str:
    rate = str(m["request_rate"])
    rows = [
        ("Request rate (req/s)", rate), ("Max concurrency", m["max_concurrency"] or "none"),
        ("Successful requests", m["completed"]), ("Failed requests", m["failed"]),
        ("Benchmark duration (s)", f"{m['duration']:.2f}"), ("Total input tokens", m["total_input_tokens"]),
        ("Total generated tokens", m["total_output_tokens"]),
        ("Request throughput (req/s)", f"{m['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{m['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{m['total_token_throughput']:.2f}"),
    ]  # fmt: skip
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}  # fmt: skip
    lines = ["{:=^60}".format(" Serving Benchmark Result ")] + [f"{k:<45}{v:>15}" for k, v in rows]
    for name, title in titles.items():
        lines.append("{:-^60}".format(f" {title} "))
        lines.append(f"{'Mean ' + name.upper() + ' (ms)':<45}{m[f'mean_{name}_ms']:>15.2f}")
        lines.append(f"{'Median ' + name.upper() + ' (ms)':<45}{m[f'median_{name}_ms']:>15.2f}")
        for p in percentiles:
            lines.append(f"{f'P{p:g} ' + name.upper() + ' (ms)':<45}{m[f'p{p:g}_{name}_ms']:>15.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)


# ---- the command -----------------------------------------------------------------------------------
def _get_json(url: str, api_key: str | None, body: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as resp:
        return json.loads(resp.read())


def bench_serve_main(args: argparse.Namespace, before_run: Callable[[], None] | None = None) -> int:
    """`tinyvllm bench serve`: the initial test request, then a run per request rate (``before_run``,
    if given, is called just before each run: a caller's snapshot of the server's counters)."""
    base = args.base_url.rstrip("/")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("tinyvllm: error: `tinyvllm bench serve` needs aiohttp: pip install -e '.[serve]'", file=sys.stderr)
        return 1
    try:
        models = _get_json(base + "/v1/models", args.api_key)["data"]
        model = args.model or models[0]["id"]
        max_model_len = models[0].get("max_model_len")

        def tokenize(text: str, add_special_tokens: bool = True) -> list[int]:
            body = {"model": model, "prompt": text, "add_special_tokens": add_special_tokens}
            return _get_json(base + "/tokenize", args.api_key, body)["tokens"]

        if args.dataset_name == "random":
            requests = random_requests(lambda t: tokenize(t, False), args.num_prompts, args.random_input_len,
                                       args.random_output_len, args.random_range_ratio, args.seed,
                                       args.random_vocab_size)  # fmt: skip
        else:
            if not args.dataset_path:
                raise ValueError("--dataset-name sharegpt needs --dataset-path FILE")
            requests = sharegpt_requests(args.dataset_path, tokenize, args.num_prompts, args.seed,
                                         args.sharegpt_output_len, max_model_len)  # fmt: skip
    except (OSError, ValueError, KeyError) as e:
        print(f"tinyvllm: error: {e}", file=sys.stderr)
        return 1
    if requests:
        print("Starting initial single prompt test run...", flush=True)
        first = asyncio.run(initial_test(args, requests[0], model))
        if not first.success:
            print(f"tinyvllm: error: the initial test request failed: {first.error}", file=sys.stderr)
            return 1
    runs = []
    for rate in args.request_rate:
        if before_run is not None:
            before_run()
        metrics = asyncio.run(run_benchmark(args, requests, model, rate))
        print(format_table(metrics, args.metric_percentiles), flush=True)
        runs.append(metrics)
    result = {"date": datetime.now().isoformat(timespec="seconds"), "base_url": base, "model": model,
              "dataset_name": args.dataset_name, "dataset_path": args.dataset_path, "num_prompts": len(requests),
              "seed": args.seed, "runs": runs}  # fmt: skip
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(result, f, indent=1)
        print(f"tinyvllm: results written to {args.result_file}")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    bench = subparsers.add_parser("bench", help="benchmarks (bench serve: load a running server)")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    p = sub.add_parser(
        "serve", help="measure a running server: TTFT, TPOT, ITL, latency, throughput",
        description=__doc__.split("\n\n")[0] + ".",
        epilog="examples:\n  tinyvllm bench serve --num-prompts 100 --request-rate 4\n"
               "  tinyvllm bench serve --dataset-name sharegpt --dataset-path sharegpt.json --max-concurrency 32\n"
               "  tinyvllm bench serve --request-rate 1 4 inf --result-file results.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="the served model name (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    p.add_argument("--dataset-name", choices=["random", "sharegpt"], default="random")
    p.add_argument("--dataset-path", default=None, help="a ShareGPT-format JSON file (--dataset-name sharegpt)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-vocab-size", type=int, default=None,
                   help="draw random prompt ids from [0, N) (perf.md: 10000) instead of tokenizing random words")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override each conversation's output length")
    p.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")],
                   help="requests/s (Poisson arrivals); several values run one after another; inf = all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly the expected output lengths")
    p.add_argument("--metric-percentiles", type=lambda s: [float(x) for x in s.split(",")], default=[50.0, 99.0],
                   help="comma-separated percentiles to report (default 50,99)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None, help="write every metric (and per-request lists) as JSON here")
    p.set_defaults(func=bench_serve_main)
    return bench
