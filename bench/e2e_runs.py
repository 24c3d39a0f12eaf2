"""The measurements behind bench/bench_e2e.py: tinyvllm and its peers, on one checkpoint.

Each function builds one engine (or peer), runs one workload of bench/workloads.py on it and
returns plain numbers; bench_e2e.py puts them beside the floors of bench/bounds.py.

How a decode step is timed (every engine the same way): the time of a run making
``decode_tokens + 1`` tokens minus the time of the same run making 1 token (the prefill and the
per-request overhead cancel), over ``decode_tokens``; best of ``repeats`` after a warm-up. Host
clock, synchronized (``torch.cuda.synchronize``) before and after. TTFT: a run making 1 token.
Throughput: one run of the whole workload through ``LLM.generate``, host clock, synchronized.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from bounds import ScheduleRecorder, Step
from workloads import LATENCY, LatencySpec, Request, latency_prompts, token_counts


@dataclass
class RunConfig:
    """Where and how the engines run: the GPU in bf16, or the CPU in float32 (``--tiny``)."""

    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    max_model_len: int = 4096
    repeats: int = 3
    latency: LatencySpec = field(default_factory=lambda: LATENCY)
    vocab_size: int | None = None  # prompt ids stay below it (and below 10000)
    compile: bool = True  # the peer under torch.compile (False on CPU: eager, same code)
    engine_kwargs: dict = field(default_factory=dict)  # more LLM(...) arguments (--engine-args)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds of fn(), synchronized with the device on both sides."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run the block with ``n`` CPU threads (None: unchanged), then restore the count. The tiny CPU
    runs use 1: a tiny model's ops are microseconds, and on a busy machine every op's thread-pool
    wake-up can cost milliseconds."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def release() -> None:
    """Free what the last engine left (its KV cache and graphs) before the next one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_ceilings(rc: RunConfig) -> dict:
    """Copy bandwidth and matmul rate of this device, measured now (perf.md: in the same run)."""
    if rc.device == "cuda":
        from common import copy_bandwidth, matmul_tflops

        return {"copy_GBps": copy_bandwidth(), "matmul_TFLOPs": matmul_tflops(8192, torch.bfloat16),
                "how": "2 GiB device-to-device copy (read + written bytes / time); 8192^3 bf16 torch.matmul"}
    # CPU (tiny mode): the same two measurements, small, on the host clock.
    src = torch.rand((16 << 20) // 4)
    dst = torch.empty_like(src)
    t = min(timed(lambda: dst.copy_(src), rc.sync) for _ in range(5))
    n = 256
    a, b = torch.randn(n, n), torch.randn(n, n)
    tm = min(timed(lambda: a @ b, rc.sync) for _ in range(5))
    return {"copy_GBps": 2 * src.numel() * 4 / t / 1e9, "matmul_TFLOPs": 2 * n**3 / tm / 1e12,
            "how": "CPU: 16 MiB copy; 256^3 float32 matmul (tiny mode)"}


# ---- tinyvllm ------------------------------------------------------------------------------------
def tinyvllm_engine(path: str, rc: RunConfig, enforce_eager: bool):
    """An LLM on the checkpoint, as the user builds it (CUDA graphs unless ``enforce_eager``); and
    the seconds its construction took (weights, KV cache, graph capture)."""
    from tinyvllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=path, dtype=rc.dtype, device=rc.device, max_model_len=rc.max_model_len, seed=0,
              enforce_eager=enforce_eager, **rc.engine_kwargs)
    return llm, time.perf_counter() - t0


def tinyvllm_latency(llm, rc: RunConfig) -> dict:
    """Decode ms per step at each batch of the latency workload, and the TTFT of its long prompt."""
    from tinyvllm import SamplingParams

    spec = rc.latency

    def run(prompts: list[list[int]], n: int) -> None:
        llm.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)

    # Every run on prompts never computed before: with prefix caching on (the default) a prompt
    # run twice is a cache hit, a one-token "prefill", and a TTFT timed on it is no TTFT at all.
    seeds = itertools.count(100)

    def best(batch: int, prompt_len: int, n: int) -> float:
        """The fastest of ``repeats`` runs, each on new prompts (made before the clock starts)."""
        sets = [latency_prompts(batch, prompt_len, rc.vocab_size, seed=next(seeds)) for _ in range(rc.repeats)]
        return min(timed(lambda p=p: run(p, n), rc.sync) for p in sets)

    hits = _prefix_cache_hits(llm)
    run(latency_prompts(1, spec.prompt_len, rc.vocab_size, seed=next(seeds)), 8)  # warm-up
    run(latency_prompts(1, spec.ttft_prompt_len, rc.vocab_size, seed=next(seeds)), 1)
    out: dict = {"batches": {}}
    for b in spec.batches:
        run(latency_prompts(b, spec.prompt_len, rc.vocab_size, seed=next(seeds)), 4)  # warm-up at this batch
        t1 = best(b, spec.prompt_len, 1)
        tn = best(b, spec.prompt_len, spec.decode_tokens + 1)  # (both uncached: the prefill cancels)
        out["batches"][str(b)] = {"decode_step_ms": (tn - t1) / spec.decode_tokens * 1e3, "ttft_ms": t1 * 1e3}
    out["ttft_long_ms"] = best(1, spec.ttft_prompt_len, 1) * 1e3
    out["prefix_cache_hits"] = _prefix_cache_hits(llm) - hits  # (0: every prompt was computed in full)
    return out


def _prefix_cache_hits(llm) -> int:
    """Prompt tokens the engine has found in its prefix cache so far (vLLM's counter)."""
    return int({m.name: m.value for m in llm.get_metrics()}.get("vllm:prefix_cache_hits", 0))


def tinyvllm_throughput(llm, requests: list[Request], rc: RunConfig) -> tuple[dict, list[Step]]:
    """One timed ``LLM.generate`` of the whole workload; and the steps its scheduler made.

    Every request must come back with exactly its ``max_tokens`` tokens (ignore_eos): a run that
    did less work would not be comparable, so it raises."""
    from tinyvllm import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=r.temperature, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    # Warm-up (the sampling kernels) on prompts no request starts with, so that the prefix cache
    # holds nothing the timed run could reuse.
    llm.generate([{"prompt_token_ids": [1] * 8}] * 2, [SamplingParams(temperature=r.temperature, max_tokens=4,
                                                                      ignore_eos=True) for r in requests[:2]],
                 use_tqdm=False)
    engine = llm.llm_engine
    preempted = engine.scheduler.num_preemptions
    recorder = ScheduleRecorder(engine.scheduler)
    outs: list = []
    try:
        seconds = timed(lambda: outs.extend(llm.generate(prompts, params, use_tqdm=False)), rc.sync)
        by_kind = recorder.seconds_by_kind(time.perf_counter())
    finally:
        steps = recorder.detach()
    for r, o in zip(requests, outs, strict=True):
        got = len(o.outputs[0].token_ids)
        if got != r.max_tokens:
            raise RuntimeError(f"request {o.request_id} made {got} tokens, not its max_tokens={r.max_tokens}")
    prompt_tokens, output_tokens = token_counts(requests)
    return {
        "requests": len(requests), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "seconds": seconds, "output_tok_s": output_tokens / seconds,
        "total_tok_s": (prompt_tokens + output_tokens) / seconds, "steps": len(steps),
        "prefill_steps": sum(not s.is_decode for s in steps), "preemptions": engine.scheduler.num_preemptions - preempted,
        "max_num_seqs": engine.config.max_num_seqs, "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "step_seconds": by_kind,  # wall time of the steps with prompt tokens and of the pure decode steps
    }, steps


# ---- peers ---------------------------------------------------------------------------------------
def transformers_latency(path: str, rc: RunConfig) -> dict:
    """Hugging Face transformers' ``generate`` at batch 1: decode ms per step and TTFT."""
    from transformers import LlamaForCausalLM

    spec = rc.latency
    model = LlamaForCausalLM.from_pretrained(path, dtype=rc.dtype).to(rc.device).eval()
    ids = torch.tensor(latency_prompts(1, spec.prompt_len, rc.vocab_size), device=rc.device)
    long = torch.tensor(latency_prompts(1, spec.ttft_prompt_len, rc.vocab_size, seed=2), device=rc.device)

    def gen(x: torch.Tensor, n: int, model=model) -> None:
        with torch.inference_mode():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    gen(ids, 8)
    gen(ids, 1)
    t1 = min(timed(lambda: gen(ids, 1), rc.sync) for _ in range(rc.repeats))
    tn = min(timed(lambda: gen(ids, spec.decode_tokens + 1), rc.sync) for _ in range(rc.repeats))
    ttft = min(timed(lambda: gen(long, 1), rc.sync) for _ in range(rc.repeats))
    del model
    release()
    return {"batches": {"1": {"decode_step_ms": (tn - t1) / spec.decode_tokens * 1e3, "ttft_ms": t1 * 1e3}},
            "ttft_long_ms": ttft * 1e3}


def compile_latency(path: str, rc: RunConfig) -> dict:
    """The gpt-fast-style peer at each latency batch: decode ms per step (greedy).

    bench/static_batch.py's StaticBatchLlama (bench/static_llama.py's weights and layers, its
    grouped-query attention) with one static cache of ``max(batches)`` rows x (prompt + decode
    tokens) positions; a batch runs on its first rows. Compiled once at batch 1 and once more
    for the other batch sizes (dynamic batch); one CUDA graph per batch size. A batch where the
    peer fails records its error and the others go on."""
    from static_batch import StaticBatchLlama, run_static_batch, warm_up

    spec = rc.latency
    positions = spec.prompt_len + spec.decode_tokens
    model = StaticBatchLlama(path, max_batch=max(spec.batches), max_seq_len=positions, device=rc.device,
                             dtype=rc.dtype, compile=rc.compile)
    out: dict = {"compiled": rc.compile, "static_cache_positions": positions, "batches": {}}
    for b in spec.batches:
        try:
            prompts = latency_prompts(b, spec.prompt_len, rc.vocab_size)

            def run(n: int, model=model, prompts=prompts, b=b) -> float:
                return run_static_batch(model, prompts, [n] * b, temperature=0, sync=rc.sync)["seconds"]

            warm_up(model, b)  # compile (a new batch size recompiles once) and capture, untimed
            run(8)
            t1 = min(run(1) for _ in range(rc.repeats))
            tn = min(run(spec.decode_tokens + 1) for _ in range(rc.repeats))
            out["batches"][str(b)] = {"decode_step_ms": (tn - t1) / spec.decode_tokens * 1e3}
        except Exception as e:  # noqa: BLE001 - a peer's failure at one batch is a result, not the end of the run
            out["batches"][str(b)] = {"error": f"{type(e).__name__}: {e}"[:500]}
    del model
    release()
    return out


def compile_throughput(path: str, requests: list[Request], rc: RunConfig) -> dict:
    """The peer on a throughput workload: all requests as one static batch (bench/static_batch.py)."""
    from static_batch import StaticBatchLlama, run_static_batch, warm_up

    temps = {r.temperature for r in requests}
    if len(temps) != 1:
        raise ValueError(f"the static batch samples every row alike; the workload mixes temperatures {sorted(temps)}")
    prompts = [r.prompt_token_ids for r in requests]
    max_tokens = [r.max_tokens for r in requests]
    positions = -(-(max(map(len, prompts)) + max(max_tokens)) // 16) * 16
    model = StaticBatchLlama(path, max_batch=len(requests), max_seq_len=positions, device=rc.device, dtype=rc.dtype,
                             compile=rc.compile)
    warm_up(model, len(requests))
    res = run_static_batch(model, prompts, max_tokens, temps.pop(), sync=rc.sync)
    del model
    release()
    prompt_tokens, _ = token_counts(requests)
    res.update(compiled=rc.compile, requests=len(requests), prompt_tokens=prompt_tokens,
               output_tok_s=res["output_tokens"] / res["seconds"])
    return res
