"""The `online` workload: `tinyvllm serve` loaded by `tinyvllm bench serve` at several request
rates, against offline `LLM.generate` on the same requests, in one run on one card.

No weights can be downloaded on the GPU machine, so the model has the exact shape of Llama 3.2 1B
Instruct with random bf16 weights (bench/random_llama.py): speed does not depend on the values.

  1. The server: `python -m tinyvllm serve MODEL` in its own process (as a user starts it), and one
     request to warm it up, not counted.
  2. The client: `tinyvllm bench serve` (tinyvllm/benchmarks/serve.py, vLLM's metrics) with random
     token-id prompts (perf.md: ids from [0, 10000)), greedy, ignore_eos, at each request rate;
     at a finite rate R it sends about R x --seconds requests, at `inf` all --num-prompts at once.
  3. Offline: the server stopped, `LLM.generate` of the same --num-prompts requests in this
     process; and one prompt alone with max_tokens=1 (its prefill time, the TTFT floor).

Prefix caching is on on both sides (the default), so no prompt may come twice: each run has prompts
of its own (`bench serve --seed`), the run at saturation offline's, and the one-prompt probes are
prompts never computed before (a repeated 512-token prompt is a cache hit: one token's prefill).

Each run also reports how busy the server's process, its engine process and the client were (CPU
seconds over the run's duration, from /proc): at saturation, the one near 1.0 is the limit.

Targets (issue 24): at saturation (`inf`) the server's output throughput at least 90% of offline's
(the server costs little); at the lowest rate TTFT p50 under 2x one prompt's prefill time.

    python bench/bench_serve.py --out bench/results/serve.json [--rates 1,4,inf] [--num-prompts 1000]
    python bench/bench_serve.py --tiny --out /tmp/serve.json     (CPU smoke run: not a measurement)
    python bench/bench_serve.py --host-bound   (CPU: the server's host work against offline's, no model to speak of)
    python bench/bench_serve.py --paced   (CPU: the same, every model step as long as an H100's: the GPU's question)
    python bench/bench_serve.py --stream-intervals 10   (also rate inf with `serve --stream-interval 10`)
    python bench/bench_serve.py --in-process   (also the requests handed to AsyncLLMEngine here: no HTTP)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from random_llama import LLAMA_1B, NEGLIGIBLE_LLAMA, TINY_LLAMA, make_random_llama  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, log_path: str, extra: list[str], timeout: float = 600.0,
                 env: dict | None = None) -> subprocess.Popen:  # fmt: skip
    """`tinyvllm serve` in its own process (``env``: more environment variables); returns once /health answers."""
    cmd = [sys.executable, "-m", "tinyvllm", "serve", model, "--port", str(port), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tinyvllm serve exited with {proc.returncode}: {open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"tinyvllm serve not healthy after {timeout} s")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def warm_up(port: int, input_len: int) -> None:
    """One request before any run: the server's first one pays its one-time costs (the GPU's first
    kernels, lazy imports), which would land in the first run's server-side means."""
    body = json.dumps({"prompt": [1] * input_len, "max_tokens": 4, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()


PROBE_SEED = 1000  # the offline warm-up's and one-prompt probes' prompts (no run uses this seed)

# The server's histograms (tinyvllm/entrypoints/openai/metrics.py) whose mean each run reports: its
# TTFT and inter-token latency, and the first token's stages (the engine's queue, the prefill, the
# delivery back to the server).
SERVER_MEANS = (("time_to_first_token_seconds", "server_mean_ttft_ms"),
                ("inter_token_latency_seconds", "server_mean_itl_ms"),
                ("request_queue_time_seconds", "server_mean_queue_ms"),
                ("request_prefill_time_seconds", "server_mean_prefill_ms"),
                ("first_token_delivery_seconds", "server_mean_delivery_ms"))  # fmt: skip


def server_latencies(port: int) -> dict[str, float]:
    """The server's own TTFT and inter-token histograms (sums and counts) from /metrics: measured
    from the moment the request reached the engine's stream, so the client's TTFT minus the
    server's is HTTP, parsing and the client itself."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("tinyvllm:engine_steps_total "):
            out["engine_steps"] = float(line.split()[1])
        for key, _ in SERVER_MEANS:
            for part in ("sum", "count"):
                if line.startswith(f"tinyvllm:{key}_{part} "):
                    out[f"{key}_{part}"] = float(line.split()[1])
    return out


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system, every thread) a process has used so far: this one's, or another's
    from /proc/PID/stat (its 14th and 15th fields, in clock ticks)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # (after the command's name, which may hold spaces)
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def engine_pid(server_pid: int) -> int | None:
    """The server's engine process: the child it spawned (/proc/PID/task/PID/children, where the
    kernel lists them) that is not multiprocessing's resource tracker."""
    try:
        with open(f"/proc/{server_pid}/task/{server_pid}/children") as f:
            children = [int(c) for c in f.read().split()]
        for child in children:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmd = f.read()
            if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                return child
    except OSError:
        pass
    return None


def run_client(port: int, rate: float, num_prompts: int, input_len: int, output_len: int, vocab: int,
               result: str, server_pid: int | None = None, seed: int = 0) -> dict:
    """One `tinyvllm bench serve` run (in this process); its metrics as it wrote them, plus the
    server's means over the run (``SERVER_MEANS``) and how busy each process was: the CPU seconds
    it used over the run's duration (``*_cpu_busy``; 1.0 = one core all the time). A server or a
    client near 1.0 at saturation is the limit, not the engine. (On a GPU the engine process's
    figure reads near 1.0 whatever it does: its thread spins while it waits for the GPU.)"""
    pids = {"server": server_pid, "engine": engine_pid(server_pid) if server_pid else None}
    before, cpu0 = {}, {}

    def snapshot() -> None:  # (after bench serve's initial test request: its steps and CPU are not the run's)
        before.update(server_latencies(port))
        cpu0.update({name: cpu_seconds(pid) for name, pid in pids.items() if pid} | {"client": cpu_seconds()})

    from tinyvllm.benchmarks.serve import bench_serve_main
    from tinyvllm.entrypoints.cli import build_parser

    args = build_parser().parse_args([
        "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", str(num_prompts),
        "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--random-vocab-size", str(vocab),
        "--ignore-eos", "--request-rate", str(rate), "--seed", str(seed), "--result-file", result])  # fmt: skip
    rc = bench_serve_main(args, before_run=snapshot)
    cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items() if pid} | {"client": cpu_seconds()}
    with open(result) as f:
        run = json.load(f)["runs"][0]
    run["rc"] = rc
    run["seed"] = seed
    for name in cpu0:
        run[f"{name}_cpu_busy"] = (cpu1[name] - cpu0[name]) / run["duration"] if run.get("duration") else None
    after = server_latencies(port)
    run["engine_steps"] = int(after.get("engine_steps", 0) - before.get("engine_steps", 0))
    for key, name in SERVER_MEANS:
        n = after.get(f"{key}_count", 0) - before.get(f"{key}_count", 0)
        run[name] = 1e3 * (after.get(f"{key}_sum", 0) - before.get(f"{key}_sum", 0)) / n if n else None
    return run


def run_in_process(model: str, num_prompts: int, input_len: int, output_len: int, vocab: int, extra: dict) -> dict:
    """The same requests handed at once to AsyncLLMEngine with the engine in its own process (what
    the server runs), in this process: the server's engine path without HTTP. Against offline it
    prices the engine process and its per-step outputs; against the served run, HTTP's admission."""
    import asyncio

    from tinyvllm import SamplingParams
    from tinyvllm.benchmarks.datasets import random_requests
    from tinyvllm.engine.async_llm_engine import AsyncLLMEngine
    from tinyvllm.sampling_params import RequestOutputKind
    from tinyvllm.engine.engine_config import EngineConfig

    requests = random_requests(None, num_prompts, input_len, output_len, seed=0, vocab_size=vocab)
    warm = random_requests(None, 1, input_len, output_len, seed=PROBE_SEED + 1, vocab_size=vocab)[0]

    async def main() -> dict:
        engine = AsyncLLMEngine.from_config(EngineConfig(model, **extra), engine_process=True)

        async def one(i: int, r) -> int:  # (DELTA outputs, as the server asks for them)
            params = SamplingParams(temperature=0, max_tokens=r.expected_output_len, ignore_eos=True,
                                    output_kind=RequestOutputKind.DELTA)  # fmt: skip
            tokens = 0
            async for out in engine.generate({"prompt_token_ids": r.prompt}, params, f"r{i}"):
                tokens += len(out.outputs[0].token_ids)
            return tokens

        try:
            await one(-1, warm)  # warm-up (a prompt of its own: requests[0] would then be a cache hit)
            steps, t0 = engine.get_stats()["num_engine_steps"], time.perf_counter()
            tokens = sum(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))
            seconds = time.perf_counter() - t0
            steps = engine.get_stats()["num_engine_steps"] - steps
        finally:
            await engine.shutdown()
        return {"seconds": seconds, "output_tokens": tokens, "output_throughput": tokens / seconds, "engine_steps": steps}

    return asyncio.run(main())


def run_offline(model: str, num_prompts: int, input_len: int, output_len: int, vocab: int, extra: dict) -> dict:
    """LLM.generate of the same requests (bench serve's sampler, same seed), and one prompt's prefill."""
    from tinyvllm import LLM, SamplingParams
    from tinyvllm.benchmarks.datasets import random_requests

    requests = random_requests(None, num_prompts, input_len, output_len, seed=0, vocab_size=vocab)
    llm = LLM(model=model, **extra)
    prompts = [{"prompt_token_ids": r.prompt} for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r.expected_output_len, ignore_eos=True) for r in requests]
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    # The warm-up and the one-prompt probes on prompts of their own, each computed once: with prefix
    # caching on, a prompt computed before is a cache hit (one token's prefill), not a prefill.
    probes = [{"prompt_token_ids": r.prompt}
              for r in random_requests(None, 12, input_len, 1, seed=PROBE_SEED, vocab_size=vocab)]  # fmt: skip
    llm.generate(probes[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    prefill, cached = [], 0
    for p in probes[4:9]:
        t0 = time.perf_counter()
        out = llm.generate([p], one, use_tqdm=False)[0]
        prefill.append(time.perf_counter() - t0)
        cached += out.num_cached_tokens or 0
    # The same after a second of idle, as a request at rate 1 finds the engine: the host's caches
    # and clocks (and the GPU's) have cooled; this is what the server's first token pays at low load.
    idle = []
    for p in probes[9:12]:
        time.sleep(1.0)
        t0 = time.perf_counter()
        llm.generate([p], one, use_tqdm=False)
        idle.append(time.perf_counter() - t0)
    t0, steps = time.perf_counter(), llm.llm_engine.num_steps
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds, steps = time.perf_counter() - t0, llm.llm_engine.num_steps - steps
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"num_prompts": num_prompts, "seconds": seconds, "output_throughput": tokens / seconds,
            "output_tokens": tokens, "engine_steps": steps, "prefill_ms_one_prompt": 1000 * min(prefill),
            "prefill_ms_after_idle": 1000 * sorted(idle)[len(idle) // 2],
            "prefill_probes_cached_tokens": cached}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="serve.json")
    ap.add_argument("--rates", default="1,4,inf", help="request rates (requests/s), comma-separated")
    # 1000, vLLM's default: with 200 (row 97) the run at inf lasted 1.0 s against offline's 0.83 s,
    # short enough that the requests' arrival over HTTP and the last ones' tail weigh in the ratio.
    ap.add_argument("--num-prompts", type=int, default=1000, help="requests at rate inf and offline")
    ap.add_argument("--seconds", type=float, default=20.0, help="about how long each finite-rate run sends")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny random Llama")
    ap.add_argument("--in-process", action="store_true",
                    help="also the same requests handed at once to AsyncLLMEngine in this process (no HTTP)")
    ap.add_argument("--host-bound", action="store_true",
                    help="on the CPU, a model too small to matter and one thread per process: the server's host "
                         "work against offline's (default 512 prompts of 16 tokens, 64 out, rate inf)")
    ap.add_argument("--paced", action="store_true",
                    help="--host-bound with every model step as long as an H100's (bench/paced_step.py), and the "
                         "online workload's sizes but 16-token prompts (1000 prompts, 128 out, rate inf; the CPU "
                         "model's own attention over 512-token prompts would outweigh the pace): does one server "
                         "process keep up with a GPU's engine?")
    ap.add_argument("--stream-intervals", default="",
                    help="also rate inf with `serve --stream-interval N` for each N here, comma-separated (e.g. 10)")
    a = ap.parse_args(argv)
    a.host_bound = a.host_bound or a.paced
    given = {arg.split("=")[0] for arg in (argv if argv is not None else sys.argv[1:])}
    for flag, tiny, host_bound in (("--num-prompts", 6, 512), ("--input-len", 16, 16), ("--output-len", 4, 64),
                                   ("--seconds", 2.0, 2.0), ("--rates", "1,4,inf", "inf")):  # fmt: skip
        if flag not in given and (a.tiny or a.host_bound):  # (the CPU runs' own sizes, unless given)
            if a.paced and flag not in ("--rates", "--input-len"):
                continue  # (paced: the GPU's sizes, but the host-bound prompts)
            setattr(a, flag[2:].replace("-", "_"), host_bound if a.host_bound else tiny)
    cpu = a.tiny or a.host_bound
    # --host-bound: one thread per process (the server's engine too): the host's work, not the model's
    server_env = {"OMP_NUM_THREADS": "1"} if a.host_bound else {}
    if a.paced:  # the server's engine process, the in-process run's and offline's steps at an H100's pace
        import paced_step

        server_env |= paced_step.env()
        paced_step.install()
    rates = [float(r) for r in a.rates.split(",")]
    vocab = 500 if cpu else 10000  # prompt ids from [0, vocab): perf.md's 10000 (the CPU models have 512)
    work = tempfile.mkdtemp(prefix="tinyvllm-serve-")
    model = os.path.join(work, "model")
    os.makedirs(model)
    shape = NEGLIGIBLE_LLAMA if a.host_bound else TINY_LLAMA if a.tiny else LLAMA_1B
    make_random_llama(model, shape, device="cpu" if cpu else "cuda")
    if not cpu:
        import torch

        torch.cuda.empty_cache()  # the server process gets the card
    max_len = a.input_len + a.output_len + 64
    serve_args = ["--max-model-len", str(max_len)] + (["--device", "cpu"] if cpu else [])
    engine = {"max_model_len": max_len} | ({"device": "cpu"} if cpu else {})
    if a.host_bound:  # a KV cache for 256 running sequences, as on a GPU (a CPU's default holds a few)
        blocks = 256 * (-(-max_len // 16) + 1)
        serve_args += ["--num-kv-blocks", str(blocks)]
        engine["num_kv_blocks"] = blocks
    port = free_port()
    server = start_server(model, port, os.path.join(work, "serve.log"), serve_args, env=server_env)
    runs = []
    try:
        warm_up(port, a.input_len)
        for i, rate in enumerate(rates):
            n = a.num_prompts if math.isinf(rate) else max(2, min(a.num_prompts, round(rate * a.seconds)))
            # Each run its own prompts (prefix caching is on: a run must not find an earlier run's
            # prompts cached); seed 0, offline's requests, for the run at saturation.
            seed = 0 if math.isinf(rate) else 1 + i
            runs.append(run_client(port, rate, n, a.input_len, a.output_len, vocab,
                                   os.path.join(work, "run.json"), server.pid, seed))
    finally:
        stop_server(server)
    # vLLM's --stream-interval N: a stream's outputs every N tokens, the host's work per token / N
    thinned = {}
    for interval in [int(n) for n in a.stream_intervals.split(",") if n]:
        server = start_server(model, port, os.path.join(work, f"serve-{interval}.log"),
                              serve_args + ["--stream-interval", str(interval)], env=server_env)  # fmt: skip
        try:
            warm_up(port, a.input_len)
            thinned[interval] = run_client(port, math.inf, a.num_prompts, a.input_len, a.output_len, vocab,
                                           os.path.join(work, "run.json"), server.pid)  # fmt: skip
        finally:
            stop_server(server)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1 if a.host_bound else threads)
    try:
        offline = run_offline(model, a.num_prompts, a.input_len, a.output_len, vocab, engine)
        in_process = None
        if a.in_process:  # (its engine process inherits this environment: the server's threads)
            saved = dict(os.environ)
            os.environ.update(server_env)
            try:
                in_process = run_in_process(model, a.num_prompts, a.input_len, a.output_len, vocab, engine)
            finally:
                os.environ.clear()
                os.environ.update(saved)
    finally:
        torch.set_num_threads(threads)
    shutil.rmtree(work, ignore_errors=True)  # (the 1B checkpoint is 2.5 GB)
    result = {"card": _card(), "workload": {"input_len": a.input_len, "output_len": a.output_len,
              "num_prompts": a.num_prompts, "prompt_ids": "uniform in [0, 10000)", "greedy": True, "ignore_eos": True},
              "online": runs, "offline": offline}  # fmt: skip
    sat = [r for r in runs if r["request_rate"] == "inf"]
    if sat:
        result["saturation_vs_offline"] = sat[0]["output_throughput"] / offline["output_throughput"]
    if in_process is not None:
        result["in_process"] = in_process
        result["in_process_vs_offline"] = in_process["output_throughput"] / offline["output_throughput"]
    if thinned:
        result["stream_interval_runs"] = {str(n): r for n, r in thinned.items()}
        result["saturation_by_stream_interval"] = {str(n): r["output_throughput"] / offline["output_throughput"]
                                                   for n, r in thinned.items()}  # fmt: skip
    result["low_load_ttft_p50_over_prefill"] = runs[0]["median_ttft_ms"] / offline["prefill_ms_one_prompt"]
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['card']}: {a.input_len}-token prompts, {a.output_len} output tokens, greedy, ignore_eos")
    print(f"{'rate':>6} {'reqs':>5} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'server TTFT/ITL mean':>21}")  # fmt: skip
    for r in runs:
        server = f"{r['server_mean_ttft_ms'] or 0:.1f} / {r['server_mean_itl_ms'] or 0:.2f}"
        print(f"{r['request_rate']:>6} {r['completed']:>5} {r['output_throughput']:>10.0f} {r['median_ttft_ms']:>9.1f} "
              f"{r['p99_ttft_ms']:>9.1f} {r['median_tpot_ms']:>9.2f} {r['median_itl_ms']:>8.2f} {r['p99_itl_ms']:>8.2f} "
              f"{server:>21}")  # fmt: skip
    print("server-side first token, mean ms: TTFT = before the engine + queue + prefill + delivery")
    for r in runs:
        stages = [r.get(k) for k in ("server_mean_queue_ms", "server_mean_prefill_ms", "server_mean_delivery_ms")]
        if r["server_mean_ttft_ms"] is not None and None not in stages:
            before = r["server_mean_ttft_ms"] - sum(stages)
            print(f"{r['request_rate']:>6}: {r['server_mean_ttft_ms']:.2f} = {before:.2f} + {stages[0]:.2f} + "
                  f"{stages[1]:.2f} + {stages[2]:.2f}")
    print("CPU busy over each run (CPU seconds / its duration): server process / engine process / client")
    for label, r in [(r["request_rate"], r) for r in runs] + [(f"inf/{n}", r) for n, r in thinned.items()]:
        busy = " / ".join("-" if r.get(f"{k}_cpu_busy") is None else f"{r[f'{k}_cpu_busy']:.2f}"
                          for k in ("server", "engine", "client"))  # fmt: skip
        print(f"{label:>6}: {busy}")  # (inf/N: the run with --stream-interval N)
    print(f"offline LLM.generate: {offline['output_throughput']:.0f} out tok/s; one prompt's prefill "
          f"{offline['prefill_ms_one_prompt']:.1f} ms (after a second of idle, median of 3: "
          f"{offline['prefill_ms_after_idle']:.1f} ms)")
    if sat:
        print(f"saturation / offline: {result['saturation_vs_offline']:.3f} (target >= 0.90); model steps: "
              f"{sat[0]['engine_steps']} served, {offline['engine_steps']} offline for the same tokens")
    if in_process is not None:
        print(f"in one process, no HTTP (AsyncLLMEngine, the engine process): {in_process['output_throughput']:.0f} "
              f"out tok/s = {result['in_process_vs_offline']:.3f} of offline, {in_process['engine_steps']} model steps")
    for n, r in thinned.items():
        print(f"saturation / offline with --stream-interval {n}: {result['saturation_by_stream_interval'][str(n)]:.3f} "
              f"({r['output_throughput']:.0f} out tok/s, TTFT p50 {r['median_ttft_ms']:.1f} ms, "
              f"ITL p50 {r['median_itl_ms']:.2f} ms, {r['engine_steps']} model steps)")
    print(f"TTFT p50 at rate {runs[0]['request_rate']} / prefill: {result['low_load_ttft_p50_over_prefill']:.2f} "
          "(target < 2)")
    print(f"wrote {a.out}")
    return result


def _card() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(0 if all(r["rc"] == 0 for r in main()["online"]) else 1)
