"""Anatomy of a decode step: a torch.profiler trace of tinyvllm's graph-replayed decode steps.

For each batch size (default 1, 64, 256) the engine is driven the way users drive it,
``LLMEngine.step()`` after ``LLMEngine.step()``, so the host's time between steps is real:
scheduling, input preparation, the graph replay, sampling and its sync, detokenization.

  1. add B requests of ``--prompt-len`` random tokens (greedy, ignore_eos, enough max_tokens that
     none finishes), step until all are prefilled, then ``--warmup`` decode steps;
  2. time ``--steps`` decode steps on the host clock, no profiler (the unprofiled period); then
     ``--steps`` more under cProfile (the host's time by Python function, printed and in the JSON);
  3. profile ``--steps`` more (CUDA and CPU activities; one more first, discarded, for the
     profiler's own start-up), each inside ``record_function("decode_step_<i>")``;
  4. group the GPU kernels per step and per kind and measure the gaps (bench/step_trace.py):
     time and count per step of gemm / our skinny gemm / rms_norm / rope / cache write /
     attention decode (or prefill) / merge / silu / sampling / other / memcpy; the GPU idle time inside a
     step (between its kernels) and between steps (the host's time).

The profiler's CPU-side recording makes the host slower than it is (about a microsecond per
op), so the profiled gap is an upper bound; the unprofiled period, next to the profiled GPU
busy time, tells the real one. Output: a markdown table printed and written (``.md``), JSON,
and the Chrome traces (``--trace-dir``; open them in Perfetto).

    python bench/profile_step.py --out bench/results/step_anatomy.json [--batches 1,64,256]
        [--prompt-len 512] [--steps 10] [--model PATH] [--trace-dir DIR] [--enforce-eager] [--tiny]
        [--no-freeze-heap] [--prefill-len 1024]

``--prefill-len L`` adds a column for the prompt steps of the `random` workload: max_num_seqs
prompts of L tokens at once, their first ``--steps`` steps (each a full token budget, eager).

``--model`` takes a checkpoint directory (bench/random_llama.py writes one); without it a
random Llama-3.2-1B-shaped one is written to a temporary directory. ``--tiny``: the CPU, a tiny
random Llama, batches 1 and 2; the trace then has CPU ops only; the outermost ones stand in for kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree's tinyvllm
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bounds import ScheduleRecorder  # noqa: E402
from e2e_runs import cpu_threads  # noqa: E402
from random_llama import LLAMA_1B, TINY_LLAMA, make_random_llama  # noqa: E402
from step_trace import anatomy, group_by_step, load_trace, markdown_table, step_windows  # noqa: E402
from workloads import latency_prompts  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/step_anatomy.json")
    ap.add_argument("--batches", default=None, help="comma-separated (default 1,64,256; tiny 1,2)")
    ap.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt (default 512; tiny 16)")
    ap.add_argument("--steps", type=int, default=None, help="decode steps timed and profiled (default 10; tiny 3)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (argmax); else the sampling kernels")
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: a random Llama-3.2-1B shape)")
    ap.add_argument("--trace-dir", default=None, help="keep the Chrome traces here (default: next to --out)")
    ap.add_argument("--enforce-eager", action="store_true", help="profile the eager decode step instead of the graphs")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny random Llama, float32")
    ap.add_argument("--prefill-len", type=int, default=0,
                    help="also profile the first --steps steps of a wave of max_num_seqs prompts of this many "
                         "tokens (the `random` workload's prompt steps: each a full token budget, mixed with the "
                         "decodes of the prompts before); 0: off")
    ap.add_argument("--no-freeze-heap", action="store_true",
                    help="leave the start-up heap to the garbage collector (the engine's own loops freeze it: gc_heap.py)")
    args = ap.parse_args(argv)
    try:
        args.batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,64,256")).split(",")]
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    args.prompt_len = args.prompt_len or (16 if args.tiny else 512)
    args.steps = args.steps or (3 if args.tiny else 10)
    if min(args.batches) < 1 or args.prompt_len < 1 or args.steps < 2 or args.warmup < 0:
        ap.error("--batches and --prompt-len must be positive, --steps at least 2 (a gap needs two steps)")
    return args


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def python_profile(engine, steps: int, device: str, top: int = 15) -> list[tuple[str, int, float, float]]:
    """cProfile over ``steps`` more decode steps: where the host's time goes, by Python function
    (the torch trace shows only ops and launches). Returns and prints the ``top`` functions by
    own time as (function, calls per step, own us per step, cumulative us per step)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    _sync(device)
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, prim calls, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    out = [(f"{os.path.basename(k[0])}:{k[1]}({k[2]})", round(v[0] / steps), round(v[2] / steps * 1e6, 1),
            round(v[3] / steps * 1e6, 1)) for k, v in rows]
    print("host functions by own time (calls/step, own us/step, cumulative us/step; cProfile slows each call):")
    for name, calls, own, cum in out:
        print(f"  {own:9.1f} {cum:9.1f} {calls:6d}  {name}")
    return out


def profile_batch(engine, batch: int, args: argparse.Namespace, device: str, trace_path: str) -> dict:
    """Steps ``batch`` sequences to steady decode, times and profiles ``args.steps`` decode steps,
    and returns their anatomy (bench/step_trace.py) plus what was checked about them."""
    from tinyvllm import SamplingParams

    total = args.warmup + 3 * args.steps + 2  # decode steps this batch will run
    # Room for every step: the first prompts decode while later ones are still prefilling (a chunk
    # of the token budget a step), so a tight max_tokens would end them inside the timed steps.
    prefill_steps = -(-batch * args.prompt_len // engine.config.max_num_batched_tokens)
    params = SamplingParams(temperature=args.temperature, max_tokens=total + prefill_steps + 4, ignore_eos=True)
    vocab = engine.model_config.vocab_size if hasattr(engine, "model_config") else None
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for rid, p in zip(ids, latency_prompts(batch, args.prompt_len, vocab, seed=batch)):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    while engine.scheduler.waiting:  # the prefill steps
        engine.step()
    for _ in range(args.warmup):
        engine.step()

    _sync(device)
    gc_time = [0.0, 0.0]  # the garbage collector's time during the timed steps (its start, its total)

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_time[0] = time.perf_counter()
        else:
            gc_time[1] += time.perf_counter() - gc_time[0]

    gc.callbacks.append(on_gc)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    _sync(device)
    unprofiled_us = (time.perf_counter() - t0) / args.steps * 1e6
    gc.callbacks.remove(on_gc)
    gc_us = gc_time[1] / args.steps * 1e6
    print(f"batch {batch}: unprofiled period {unprofiled_us:.0f} us, of which the garbage collector {gc_us:.0f} us", flush=True)
    host_functions = python_profile(engine, args.steps, device)

    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    recorder = ScheduleRecorder(engine.scheduler)
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=args.steps, repeat=1), acc_events=True,
                 on_trace_ready=lambda p: p.export_chrome_trace(trace_path)) as prof:
        for i in range(args.steps + 1):
            with record_function(f"decode_step_{i}"):
                engine.step()
            prof.step()
    steps = recorder.detach()
    engine.abort_request(ids)
    engine.step()  # collect the aborted requests' outputs: the engine is empty for the next batch

    events = load_trace(trace_path)
    windows = step_windows(events)
    per_step, source, unassigned = group_by_step(events, windows)
    result = anatomy(per_step, windows)
    graphs = getattr(engine.model_runner, "graphs", None)
    result.update(
        batch=batch, source=source, unassigned_events=unassigned, unprofiled_period_us=unprofiled_us,
        host_functions=host_functions, gc_us_per_step=gc_us,
        all_decode_steps_of_batch=all(s.is_decode and len(s.new) == batch for s in steps),
        # each profiled step as (sequences, tokens): where the line above is False, which steps differ
        step_shapes=[(len(s.new), sum(s.new)) for s in steps],
        cuda_graphs=graphs is not None and graphs.shape_for(batch, 1) is not None,
        trace=trace_path,
    )
    if not result["all_decode_steps_of_batch"]:
        print(f"WARNING batch {batch}: not every profiled step is a decode step of {batch} sequences "
              f"(sequences, tokens per step: {result['step_shapes']})", flush=True)
    if result["cuda_graphs"] and result.get("events_per_step", 0) < 30:
        result["warning"] = ("few GPU events per step for a graph-replayed decode step (about 150 kernels): the "
                             "profiler may not have traced the graph's kernels (CUPTI); read the trace")
        print(f"WARNING batch {batch}: {result['warning']}", flush=True)
    return result


def profile_prefill_wave(engine, args: argparse.Namespace, device: str, trace_path: str) -> dict:
    """The first ``args.steps`` steps of ``max_num_seqs`` prompts of ``args.prefill_len`` tokens
    arriving at once: chunked prompt steps of a full token budget, eager (no graph holds them), with
    the decodes of the prompts already in. Timed without the profiler, then profiled as a second wave."""
    from tinyvllm import SamplingParams

    n = engine.config.max_num_seqs
    vocab = engine.model_config.vocab_size if hasattr(engine, "model_config") else None
    params = SamplingParams(temperature=args.temperature, max_tokens=4, ignore_eos=True)

    def wave(tag: str) -> list[str]:
        ids = [f"{tag}-{i}" for i in range(n)]
        for rid, p in zip(ids, latency_prompts(n, args.prefill_len, vocab, seed=len(tag))):
            engine.add_request(rid, {"prompt_token_ids": p}, params)
        return ids

    def finish(ids: list[str]) -> None:
        engine.abort_request(ids)
        while engine.has_unfinished_requests():
            engine.step()

    ids = wave("unprofiled")
    engine.step()  # (the first step also pays the wave's add_request work)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    _sync(device)
    unprofiled_us = (time.perf_counter() - t0) / args.steps * 1e6
    finish(ids)

    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    ids = wave("profiled")
    recorder = ScheduleRecorder(engine.scheduler)
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=args.steps, repeat=1), acc_events=True,
                 on_trace_ready=lambda p: p.export_chrome_trace(trace_path)) as prof:
        for i in range(args.steps + 1):
            with record_function(f"decode_step_{i}"):  # (the name step_trace.py looks for)
                engine.step()
            prof.step()
    steps = recorder.detach()
    finish(ids)
    events = load_trace(trace_path)
    windows = step_windows(events)
    per_step, source, unassigned = group_by_step(events, windows)
    result = anatomy(per_step, windows)
    result.update(source=source, unassigned_events=unassigned, unprofiled_period_us=unprofiled_us,
                  step_shapes=[(len(s.new), sum(s.new)) for s in steps], cuda_graphs=False, trace=trace_path)
    print(f"prefill wave ({n} x {args.prefill_len} tokens): unprofiled period {unprofiled_us:.0f} us; "
          f"(sequences, tokens) per profiled step {result['step_shapes']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("profile_step needs a CUDA GPU (or --tiny for a CPU smoke run)")
    device = "cpu" if args.tiny else "cuda"
    cfg = TINY_LLAMA if args.tiny else LLAMA_1B
    trace_dir = args.trace_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "traces")
    os.makedirs(trace_dir, exist_ok=True)
    from tinyvllm.engine.gc_heap import frozen_heap
    from tinyvllm.engine.llm_engine import LLMEngine

    with tempfile.TemporaryDirectory() as tmp, cpu_threads(1 if args.tiny else None):
        path = args.model
        if path is None:
            make_random_llama(tmp, cfg, device=device)
            path = tmp
        engine = LLMEngine.from_model(
            path, dtype=torch.float32 if args.tiny else torch.bfloat16, device=device,
            max_model_len=256 if args.tiny else max(4096, args.prefill_len + 64), max_num_seqs=max(256, *args.batches), seed=0,
            enforce_eager=args.enforce_eager,
        )
        results = {}
        # The steps run as the server's engine process runs them: its start-up heap frozen.
        with nullcontext() if args.no_freeze_heap else frozen_heap():
            for b in args.batches:
                results[str(b)] = profile_batch(engine, b, args, device, os.path.join(trace_dir, f"decode_b{b}.json"))
                print(f"batch {b}: {results[str(b)]['steps']} steps profiled", flush=True)
            if args.prefill_len:
                key = f"{engine.config.max_num_seqs}x{args.prefill_len} prompts"
                results[key] = profile_prefill_wave(engine, args, device, os.path.join(trace_dir, "prefill_wave.json"))

    if device == "cuda":
        from common import device_info

        info = device_info()
    else:
        info = {"device": "cpu (tiny mode)", "torch": torch.__version__}
    source = next(iter(results.values()))["source"]
    table = markdown_table(results, source)
    graphs = all(r["cuda_graphs"] for r in results.values())
    header = (f"Decode step anatomy, {info['device']}, {'tiny random Llama' if args.tiny else 'Llama-3.2-1B shape'}, "
              f"{args.prompt_len}-token prompts, {'CUDA graphs' if graphs else 'eager'}, "
              f"mean of {args.steps} steps (us)")
    print(f"\n{header}\n\n{table}\n")
    for b, r in results.items():
        print(f"B={b} top kernels (us/step, count/step): " + "; ".join(f"{n[:60]} {t} x{c}" for n, t, c in r.get("top", [])[:6]))
    payload = {"card": info["device"], "device_info": info, "tiny": args.tiny, "source": source,
               "options": {k: v for k, v in vars(args).items() if k != "out"}, "table_markdown": table,
               "batches": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"{header}\n\n{table}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
