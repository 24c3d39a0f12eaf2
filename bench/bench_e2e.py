"""End-to-end benchmark: tinyvllm against its floors and its peers, on a Llama-3.2-1B-shaped model.

The model has the exact shape of Llama 3.2 1B with random bf16 weights (bench/random_llama.py):
speed does not depend on the values. Workloads (bench/workloads.py; docs/course/15-measuring-speed.md, sections 5 and 11, gives the floors):

  latency  decode ms per step at batch 1, 8, 32, 128 (32-token prompts, 128 greedy tokens,
           ignore_eos) as a multiple of the floor: the step's weight + KV bytes at the copy
           bandwidth (or its FLOPs at the matmul rate, if larger); TTFT of a 1024-token prompt.
  nano     256 requests of 100-1024 prompt / 100-1024 output tokens, temperature 0.6;
  random   1000 x 1024 prompt / 128 output tokens, temperature 1.0:
           output tok/s and the fraction of the ideal bound: per model step
           max(weight + KV bytes / copy bandwidth, FLOPs / matmul rate), summed over the steps
           (bench/bounds.py); over the engine's own recorded schedule and over the ideal
           first-come-first-served schedule (no preemption).

Engines, one after the other in this process, on the same checkpoint:
  tinyvllm         as users get it (decode steps replayed as CUDA graphs): every workload
  tinyvllm eager   enforce_eager=True: latency
  transformers     Hugging Face generate: latency at batch 1
  torch.compile    a gpt-fast-style static-cache Llama (bench/static_llama.py, with a position
                   per row in bench/static_batch.py) under torch.compile(mode="reduce-overhead"):
                   latency at every batch; nano as one static batch of all 256 requests, the
                   engine's max_num_seqs, i.e. at equal batch
The ceilings (copy bandwidth, matmul rate) are measured at the start of the same run.

Output: a printed table, JSON (rewritten after every part, so a run cut short keeps what it
measured; each part's seconds and any error are in it) and a PNG of decode step time against
batch. ``--tiny`` runs the same code on the CPU (a 2-layer random Llama, float32, a few
requests, the peer uncompiled): for tests, not for numbers.

    python bench/bench_e2e.py --out bench/results/e2e.json [--skip-hf] [--skip-compile]
        [--workloads latency,nano,random] [--random-requests 1000] [--nano-requests 256] [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree's tinyvllm
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_runs as runs  # noqa: E402
from bounds import ModelShape, Step, ideal_schedule, latency_steps, schedule_bound, step_cost  # noqa: E402
from e2e_report import plot, print_tables_safe  # noqa: E402
from random_llama import LLAMA_1B, TINY_LLAMA, make_random_llama  # noqa: E402,F401  (re-exported for tests)
from workloads import LATENCY, TINY_LATENCY, nano_requests, random_requests, token_counts  # noqa: E402

WORKLOADS = ("latency", "nano", "random")
FULL_RANDOM_REQUESTS = 1000
FULL_NANO_REQUESTS = 256
TINY_REQUESTS = 4

# Rough seconds of each part on an H100 (the JSON's part_seconds gives the real ones: update these
# from it). torch.compile's cost is mostly Inductor compiling: once at batch 1, once more for the
# other batch sizes (dynamic batch), once for the static-batch nano step.
ESTIMATE_S = {
    "setup": 30, "tinyvllm build": 25, "tinyvllm latency": 4 + 3 * 4, "tinyvllm nano": 15, "tinyvllm random": 30,
    "tinyvllm_eager build": 10, "tinyvllm_eager latency": 4 + 5 * 4, "transformers latency": 30,
    "torch_compile latency": 150, "torch_compile nano": 80,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/e2e.json")
    ap.add_argument("--png", default=None, help="chart path (default: --out with .png)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of latency,nano,random")
    ap.add_argument("--engine-args", default="{}",
                    help='more LLM(...) arguments for tinyvllm, as JSON, e.g. \'{"async_scheduling": false}\'')
    ap.add_argument("--batches", default=None, help="latency batch sizes (default 1,8,32,128)")
    ap.add_argument("--skip-hf", action="store_true", help="do not time transformers")
    ap.add_argument("--skip-compile", action="store_true", help="do not run the torch.compile peer (its compiles are the slowest part)")
    ap.add_argument("--skip-eager", action="store_true", help="do not time tinyvllm with enforce_eager=True")
    ap.add_argument("--nano-requests", type=int, default=None,
                    help=f"default {FULL_NANO_REQUESTS} (tiny: {TINY_REQUESTS}); fewer for a quicker run, recorded as trimmed")
    ap.add_argument("--random-requests", type=int, default=None,
                    help=f"default {FULL_RANDOM_REQUESTS} (tiny: {TINY_REQUESTS}); fewer for a quicker run, recorded as trimmed")
    ap.add_argument("--repeats", type=int, default=None, help="best of this many timed runs (default 3; tiny 1)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny random Llama in float32, a few requests")
    args = ap.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        ap.error(f"--workloads: unknown {bad}; choose from {','.join(WORKLOADS)}")
    if args.batches is not None:
        try:
            args.batches = tuple(int(b) for b in args.batches.split(","))
        except ValueError:
            ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
        if any(b < 1 for b in args.batches):
            ap.error("--batches must be positive")
    for name, full in (("nano_requests", FULL_NANO_REQUESTS), ("random_requests", FULL_RANDOM_REQUESTS)):
        if getattr(args, name) is None:
            setattr(args, name, TINY_REQUESTS if args.tiny else full)
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def planned_parts(args: argparse.Namespace) -> list[str]:
    """The parts this run will do, in order (names as in ESTIMATE_S and the JSON's part_seconds)."""
    w = args.workloads
    parts = ["setup", "tinyvllm build"] + [f"tinyvllm {x}" for x in WORKLOADS if x in w]
    if "latency" in w:
        parts += [] if args.skip_eager else ["tinyvllm_eager build", "tinyvllm_eager latency"]
        parts += [] if args.skip_hf else ["transformers latency"]
        parts += [] if args.skip_compile else ["torch_compile latency"]
    if "nano" in w and not args.skip_compile:
        parts.append("torch_compile nano")
    return parts


def estimate_seconds(args: argparse.Namespace) -> dict[str, float]:
    """Expected seconds per part on an H100, scaled by the options (request counts, batches)."""
    n_batches = len(args.batches or LATENCY.batches)
    est = {}
    for p in planned_parts(args):
        s = float(ESTIMATE_S[p])
        if p.endswith(" latency") and p.startswith("tinyvllm"):
            s = 4 + (s - 4) * n_batches / 4
        if p == "tinyvllm nano" or p == "torch_compile nano":
            s *= 0.5 + 0.5 * args.nano_requests / FULL_NANO_REQUESTS
        if p == "tinyvllm random":
            s *= args.random_requests / FULL_RANDOM_REQUESTS
        est[p] = round(s)
    return est


class Run:
    """The result dict, written to JSON after every part; ``part(name)`` times a part and records
    its error (with the traceback's tail) instead of ending the run."""

    def __init__(self, out: str, result: dict, estimates: dict[str, float]) -> None:
        self.out, self.result, self.estimates = out, result, estimates
        result.setdefault("part_seconds", {})
        result.setdefault("errors", {})

    def write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        with open(self.out, "w") as f:
            json.dump(self.result, f, indent=1)

    @contextlib.contextmanager
    def part(self, name: str):
        print(f">>> {name} (expected ~{self.estimates.get(name, '?')} s on an H100)", flush=True)
        t0 = time.perf_counter()
        try:
            yield
        except Exception:  # noqa: BLE001 - recorded; the other parts still run
            self.result["errors"][name] = traceback.format_exc()[-3000:]
            print(f"!!! {name} failed:\n{self.result['errors'][name]}", flush=True)
        finally:
            self.result["part_seconds"][name] = round(time.perf_counter() - t0, 1)
            self.write()


# ---- floors and bounds ---------------------------------------------------------------------------
def latency_floors(shape: ModelShape, bw: float, rate: float, spec) -> dict:
    """Per batch: the mean decode-step floor over the workload's steps (ms), and its two parts."""
    floors = {}
    for b in spec.batches:
        s = schedule_bound(latency_steps(b, spec.prompt_len, spec.decode_tokens), shape, bw, rate)
        n = spec.decode_tokens
        mem = sum(step_cost(st, shape, bw, rate).memory_s for st in latency_steps(b, spec.prompt_len, n))
        comp = sum(step_cost(st, shape, bw, rate).compute_s for st in latency_steps(b, spec.prompt_len, n))
        floors[str(b)] = {"floor_ms": s["bound_s"] / n * 1e3, "memory_ms": mem / n * 1e3, "compute_ms": comp / n * 1e3}
    return floors


def add_floor_ratios(engine: dict, floors: dict) -> dict:
    """Each batch's decode step as a multiple of its floor (x_floor) and the floor's share of it."""
    for b, r in engine.get("batches", {}).items():
        if "decode_step_ms" in r and b in floors:
            r["x_floor"] = r["decode_step_ms"] / floors[b]["floor_ms"]
            r["fraction_of_floor"] = floors[b]["floor_ms"] / r["decode_step_ms"]
    return engine


def bound_summary(steps: list[Step], shape: ModelShape, bw: float, rate: float, output_tokens: int) -> dict:
    """A schedule's bound (bench/bounds.py) and the output tok/s it allows."""
    b = schedule_bound(steps, shape, bw, rate)
    b["output_tok_s"] = output_tokens / b["bound_s"]
    return b


# ---- the run -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench_e2e needs a CUDA GPU (or --tiny for a CPU smoke run)")
    with runs.cpu_threads(1 if args.tiny else None):
        return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    """Every part of the benchmark that ``args`` asks for; 1 if any part failed."""
    cfg = TINY_LLAMA if args.tiny else LLAMA_1B
    spec = TINY_LATENCY if args.tiny else LATENCY
    if args.batches:
        spec = type(spec)(batches=args.batches, prompt_len=spec.prompt_len, decode_tokens=spec.decode_tokens,
                          ttft_prompt_len=spec.ttft_prompt_len)
    rc = runs.RunConfig(device="cpu" if args.tiny else "cuda", dtype=torch.float32 if args.tiny else torch.bfloat16,
                        max_model_len=256 if args.tiny else 4096, repeats=args.repeats or (1 if args.tiny else 3),
                        latency=spec, vocab_size=cfg["vocab_size"], compile=not args.tiny,
                        engine_kwargs=json.loads(args.engine_args))
    shape = ModelShape.from_config(cfg, dtype_bytes=4 if args.tiny else 2)
    estimates = estimate_seconds(args)
    print("expected seconds per part (H100, rough): " + ", ".join(f"{k} {v}" for k, v in estimates.items())
          + f"; total ~{sum(estimates.values()) / 60:.1f} min")

    if rc.device == "cuda":
        from common import device_info

        info = device_info()
    else:
        info = {"device": "cpu (tiny mode)", "torch": torch.__version__}
    result: dict = {"card": info["device"], "device_info": info, "tiny": args.tiny,
                    "options": {k: v for k, v in vars(args).items() if k not in ("out", "png")},
                    "estimated_seconds": estimates,
                    "model": {"shape": "tiny" if args.tiny else "Llama-3.2-1B", **asdict(shape)}}
    run = Run(args.out, result, estimates)
    workloads = {}
    if "nano" in args.workloads:
        workloads["nano"] = nano_requests(args.nano_requests, tiny=args.tiny, vocab_size=cfg["vocab_size"])
    if "random" in args.workloads:
        workloads["random"] = random_requests(args.random_requests, tiny=args.tiny, vocab_size=cfg["vocab_size"])
    full = {"nano": FULL_NANO_REQUESTS, "random": FULL_RANDOM_REQUESTS}

    with tempfile.TemporaryDirectory() as path:
        with run.part("setup"):
            c = result["ceilings"] = runs.measure_ceilings(rc)
            bw, rate = c["copy_GBps"] * 1e9, c["matmul_TFLOPs"] * 1e12
            n_params = make_random_llama(path, cfg, device=rc.device)
            assert n_params == shape.params, (n_params, shape.params)
            if "latency" in args.workloads:
                result["latency"] = {
                    "spec": asdict(spec), "floors": latency_floors(shape, bw, rate, spec),
                    "ttft_long_bound_ms": step_cost(Step((0,), (spec.ttft_prompt_len,)), shape, bw, rate).bound_s * 1e3,
                    "engines": {},
                }
            from tinyvllm.engine.engine_config import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig

            for w, reqs in workloads.items():
                prompt_tokens, output_tokens = token_counts(reqs)
                steps = ideal_schedule([len(r.prompt_token_ids) for r in reqs], [r.max_tokens for r in reqs],
                                       EngineConfig.max_num_seqs, max(DEFAULT_MAX_NUM_BATCHED_TOKENS, rc.max_model_len))
                result[w] = {
                    "workload": {"requests": len(reqs), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
                                 "temperature": reqs[0].temperature, "ignore_eos": True,
                                 "trimmed_from": full[w] if len(reqs) < full[w] else None},
                    "ideal_bound": bound_summary(steps, shape, bw, rate, output_tokens), "engines": {},
                }
        if "setup" in result["errors"]:
            return 1

        def throughput(w: str, key: str, r: dict, steps: list[Step] | None) -> None:
            ideal = result[w]["ideal_bound"]
            r["fraction_of_ideal"] = ideal["bound_s"] / r["seconds"]
            if steps is not None:
                r["bound"] = bound_summary(steps, shape, bw, rate, r["output_tokens"])
                r["fraction_of_bound"] = r["bound"]["bound_s"] / r["seconds"]
            result[w]["engines"][key] = r

        llm = None
        with run.part("tinyvllm build"):
            llm, result["tinyvllm_startup_s"] = runs.tinyvllm_engine(path, rc, enforce_eager=False)
        if llm is not None:
            if "latency" in args.workloads:
                with run.part("tinyvllm latency"):
                    lat = runs.tinyvllm_latency(llm, rc)
                    result["latency"]["engines"]["tinyvllm"] = add_floor_ratios(lat, result["latency"]["floors"])
            for w, reqs in workloads.items():
                with run.part(f"tinyvllm {w}"):
                    throughput(w, "tinyvllm", *runs.tinyvllm_throughput(llm, reqs, rc))
            del llm
            runs.release()
        if "latency" in args.workloads:
            if not args.skip_eager:
                eager = None
                with run.part("tinyvllm_eager build"):
                    eager, _ = runs.tinyvllm_engine(path, rc, enforce_eager=True)
                if eager is not None:
                    with run.part("tinyvllm_eager latency"):
                        lat = runs.tinyvllm_latency(eager, rc)
                        result["latency"]["engines"]["tinyvllm_eager"] = add_floor_ratios(lat, result["latency"]["floors"])
                    del eager
                    runs.release()
            if not args.skip_hf:
                with run.part("transformers latency"):
                    lat = runs.transformers_latency(path, rc)
                    result["latency"]["engines"]["transformers"] = add_floor_ratios(lat, result["latency"]["floors"])
            if not args.skip_compile:
                with run.part("torch_compile latency"):
                    lat = runs.compile_latency(path, rc)
                    result["latency"]["engines"]["torch_compile"] = add_floor_ratios(lat, result["latency"]["floors"])
        if "nano" in workloads:
            if args.skip_compile:
                result["nano"]["engines"]["torch_compile"] = {"skipped": "--skip-compile"}
            else:
                with run.part("torch_compile nano"):
                    throughput("nano", "torch_compile", runs.compile_throughput(path, workloads["nano"], rc), None)
        if "random" in workloads:
            result["random"]["engines"]["torch_compile"] = {
                "skipped": "not run: the issue asks for the peer on nano only (random's 1000 requests would be "
                           "4 static batches of 256)"}
    run.write()
    print_tables_safe(result)
    print(f"wrote {args.out}")
    plot(result, args.png or os.path.splitext(args.out)[0] + ".png")
    print("seconds per part (expected): " + ", ".join(
        f"{k} {v} ({estimates.get(k, '?')})" for k, v in result["part_seconds"].items()))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
