"""Feature benchmark: prefix caching and chunked prefill, each on and off in the same run.

No weights can be downloaded on the GPU machine, so the model has the exact shape of Llama 3.2 1B
Instruct with random bf16 weights (bench_e2e.make_random_llama): speed does not depend on values.

Workloads (greedy, ignore_eos, token-id prompts):

  prefix   256 requests sharing a 1024-token system prompt, each followed by 64 unique tokens,
           128 output tokens each, all submitted at once to LLM.generate. Per setting of
           enable_prefix_caching: TTFT (RequestOutput.metrics: first_token_time - arrival_time)
           mean / p50 / p90, output and total (prompt + output) tokens per second, and the
           prefix-cache hit rate from LLM.get_metrics().
  chunked  32 requests decode (32-token prompts) while 4 prompts of 8192 tokens arrive, one every
           16 steps, through LLMEngine.add_request/step. Per setting of enable_chunked_prefill
           (on: a budget of --chunk-budget tokens per step; off: every prompt in one step):
           inter-token latency of the 32 decoding requests (mean, p50, p99, max: the stall a
           long prompt causes) and the long prompts' TTFT.

--tiny runs the same code on a tiny random Llama on CPU with small workloads, in seconds: a smoke
test of the script (tests/test_bench_features.py), not a measurement.

    python bench/bench_features.py --out bench/results/features.json [--chunk-budget 2048]
    python bench/bench_features.py --tiny --out /tmp/features.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import LLAMA_1B, make_random_llama  # noqa: E402

TINY_LLAMA = {
    **LLAMA_1B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
    "bos_token_id": 1, "eos_token_id": [2], "rope_scaling": None,
}  # fmt: skip

# Workload sizes: the issue's (GPU) and the smoke test's (--tiny).
FULL = dict(prefix_requests=256, system_len=1024, suffix_len=64, prefix_out=128,
            decoders=32, decoder_prompt=32, long_prompts=4, long_len=8192, arrive_every=16)
TINY = dict(prefix_requests=8, system_len=32, suffix_len=4, prefix_out=3,
            decoders=3, decoder_prompt=4, long_prompts=2, long_len=40, arrive_every=2)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary_ms(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"mean_ms": statistics.fmean(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms), "n": len(ms)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_prefix(path: str, w: dict, caching: bool, llm_kw: dict) -> dict:
    """The prefix workload with enable_prefix_caching=caching."""
    from tinyvllm import LLM, SamplingParams

    llm = LLM(model=path, enable_prefix_caching=caching, disable_log_stats=True, **llm_kw)
    rng = random.Random(0)
    vocab = 10000 if llm_kw["device"] == "cuda" else 500
    system = [rng.randrange(vocab) for _ in range(w["system_len"])]
    prompts = [{"prompt_token_ids": system + [rng.randrange(vocab) for _ in range(w["suffix_len"])]}
               for _ in range(w["prefix_requests"])]
    params = SamplingParams(temperature=0, max_tokens=w["prefix_out"], ignore_eos=True)
    warm = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(w["system_len"] + w["suffix_len"])]}
            for _ in range(8)]  # other tokens: the warm-up leaves nothing the workload could hit
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    before = {m.name: m.value for m in llm.get_metrics()}
    sync(llm_kw["device"])
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(llm_kw["device"])
    seconds = time.perf_counter() - t0
    after = {m.name: m.value for m in llm.get_metrics()}
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    queries = after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"]
    hits = after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"]
    res = {
        "enable_prefix_caching": caching,
        "seconds": seconds,
        "output_tok_s": out_tokens / seconds,
        "total_tok_s": (out_tokens + prompt_tokens) / seconds,
        "ttft": summary_ms([o.metrics.first_token_time - o.metrics.arrival_time for o in outs]),
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "cached_prompt_tokens": sum(o.num_cached_tokens for o in outs),
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
    }
    del llm
    if llm_kw["device"] == "cuda":
        torch.cuda.empty_cache()
    return res


def bench_chunked(path: str, w: dict, chunked: bool, budget: int, llm_kw: dict) -> dict:
    """The chunked workload with enable_chunked_prefill=chunked (budget: its token budget)."""
    from tinyvllm import SamplingParams
    from tinyvllm.engine.llm_engine import LLMEngine

    kw = dict(llm_kw, max_model_len=w["long_len"] + 512, enable_prefix_caching=False, disable_log_stats=True)
    if chunked:
        kw["max_num_batched_tokens"] = budget
    engine = LLMEngine.from_model(path, enable_chunked_prefill=chunked, **kw)
    rng = random.Random(1)
    vocab = 10000 if llm_kw["device"] == "cuda" else 500
    greedy = dict(temperature=0, ignore_eos=True)

    def run_until_first_token(rid: str) -> None:
        while not engine.requests[rid].seqs[0].num_output_tokens:
            engine.step()

    # Warm-up: one long prompt (the first prefill of a size allocates and tunes), then gone.
    engine.add_request("warm", {"prompt_token_ids": [rng.randrange(vocab) for _ in range(w["long_len"])]},
                       SamplingParams(max_tokens=2, **greedy))
    while engine.has_unfinished_requests():
        engine.step()
    decoders = [f"d{i}" for i in range(w["decoders"])]
    for rid in decoders:
        prompt = [rng.randrange(vocab) for _ in range(w["decoder_prompt"])]
        engine.add_request(rid, {"prompt_token_ids": prompt}, SamplingParams(max_tokens=kw["max_model_len"], **greedy))
    for rid in decoders:
        run_until_first_token(rid)
    for _ in range(4):  # a few plain decode steps (CUDA graphs replay from here)
        engine.step()

    sync(llm_kw["device"])
    start = time.perf_counter()  # every decoder just got a token in the last step
    token_times: dict[str, list[float]] = {rid: [start] for rid in decoders}
    long_ids = [f"long{j}" for j in range(w["long_prompts"])]
    arrived: dict[str, float] = {}
    first_token: dict[str, float] = {}
    step = 0
    while len(first_token) < len(long_ids):
        if step % w["arrive_every"] == 0 and len(arrived) < len(long_ids):
            rid = long_ids[len(arrived)]
            engine.add_request(rid, {"prompt_token_ids": [rng.randrange(vocab) for _ in range(w["long_len"])]},
                               SamplingParams(max_tokens=1, **greedy))
            arrived[rid] = time.perf_counter()
        outs = engine.step()  # ends with the sampled ids' copy to the host: the step is done
        now = time.perf_counter()
        for o in outs:
            if o.request_id in token_times:
                token_times[o.request_id].append(now)
            elif o.request_id in arrived and o.request_id not in first_token:
                first_token[o.request_id] = now
        step += 1
    engine.abort_request(decoders)
    engine.step()
    itl = [b - a for ts in token_times.values() for a, b in zip(ts, ts[1:])]
    res = {
        "enable_chunked_prefill": chunked,
        "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "steps": step,
        "inter_token_latency": summary_ms(itl),
        "long_prompt_ttft": summary_ms([first_token[r] - arrived[r] for r in long_ids]),
    }
    del engine
    if llm_kw["device"] == "cuda":
        torch.cuda.empty_cache()
    return res


def print_table(result: dict) -> None:
    print(f"\n{result['card']}  prefix: {result['workloads']['prefix']}")
    print(f"{'prefix caching':<16}{'TTFT mean ms':>14}{'p50':>10}{'p90':>10}{'out tok/s':>12}{'total tok/s':>13}{'hit rate':>10}")
    for r in result["prefix"]:
        t = r["ttft"]
        print(f"{'on' if r['enable_prefix_caching'] else 'off':<16}{t['mean_ms']:>14.1f}{t['p50_ms']:>10.1f}"
              f"{t['p90_ms']:>10.1f}{r['output_tok_s']:>12.0f}{r['total_tok_s']:>13.0f}{100 * r['prefix_cache_hit_rate']:>9.1f}%")
    print(f"\nchunked: {result['workloads']['chunked']}")
    print(f"{'chunked prefill':<16}{'budget':>8}{'ITL mean ms':>13}{'p50':>9}{'p99':>9}{'max':>9}{'long TTFT ms':>14}{'steps':>7}")
    for r in result["chunked"]:
        i, t = r["inter_token_latency"], r["long_prompt_ttft"]
        print(f"{'on' if r['enable_chunked_prefill'] else 'off':<16}{r['max_num_batched_tokens']:>8}{i['mean_ms']:>13.2f}"
              f"{i['p50_ms']:>9.2f}{i['p99_ms']:>9.2f}{i['max_ms']:>9.2f}{t['mean_ms']:>14.1f}{r['steps']:>7}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/features.json; none with --tiny)")
    ap.add_argument("--chunk-budget", type=int, default=None, help="max_num_batched_tokens with chunking (2048; --tiny: 12)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama on CPU, small workloads: a smoke test")
    args = ap.parse_args(argv)
    if args.tiny:
        device, cfg, w, budget = "cpu", TINY_LLAMA, TINY, args.chunk_budget or 12
        llm_kw = dict(device="cpu", max_model_len=256, num_kv_blocks=128, block_size=8, max_num_seqs=8)
        out = args.out
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_features needs a CUDA GPU (or --tiny)")
        device, cfg, w, budget = "cuda", LLAMA_1B, FULL, args.chunk_budget or 2048
        llm_kw = dict(device="cuda", dtype="bfloat16", max_model_len=4096, seed=0)
        out = args.out or "bench/results/features.json"
    with tempfile.TemporaryDirectory() as path:
        make_random_llama(path, cfg, device=device)
        prefix = [bench_prefix(path, w, caching, llm_kw) for caching in (True, False)]
        chunk_kw = {k: v for k, v in llm_kw.items() if k != "max_model_len"}
        chunked = [bench_chunked(path, w, on, budget, chunk_kw) for on in (True, False)]
    if device == "cuda":
        from common import device_info

        info = device_info()
    else:
        info = {"device": "cpu (--tiny smoke test, not a measurement)", "torch": torch.__version__}
    result = {
        "card": info["device"],
        "device_info": info,
        "model": "Llama-3.2-1B shape, random bf16 weights" if device == "cuda" else "tiny random Llama",
        "workloads": {
            "prefix": {k: w[k] for k in ("prefix_requests", "system_len", "suffix_len", "prefix_out")},
            "chunked": {k: w[k] for k in ("decoders", "decoder_prompt", "long_prompts", "long_len", "arrive_every")},
        },
        "prefix": prefix,
        "chunked": chunked,
        "prefix_caching_ttft_speedup": prefix[1]["ttft"]["mean_ms"] / prefix[0]["ttft"]["mean_ms"],
        "prefix_caching_throughput_speedup": prefix[0]["output_tok_s"] / prefix[1]["output_tok_s"],
        "chunked_max_itl_ratio": chunked[1]["inter_token_latency"]["max_ms"] / chunked[0]["inter_token_latency"]["max_ms"],
    }
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}")
    print_table(result)
    return result


if __name__ == "__main__":
    main()
