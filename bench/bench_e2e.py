"""End-to-end benchmark: tinyvllm vs its peers on a Llama-3.2-1B-shaped model.

No weights can be downloaded on the GPU machine, so the model has the exact shape of
Llama 3.2 1B Instruct with random bf16 weights: speed does not depend on the values.

tinyvllm runs twice: as users get it (decode steps replayed as CUDA graphs) and with
enforce_eager=True (every kernel launched from Python), latency only.

Peers, timed in the same run on the same weights: Hugging Face transformers, and a
gpt-fast-style static-cache Llama under torch.compile(mode="reduce-overhead")
(bench/static_llama.py; latency only).

Workloads (defined in docs/course/15-measuring-speed.md):
  latency   batch 1, 32-token prompt, 128 greedy tokens: mean time per decode step
            (prefill excluded) and its fraction of the floor = weight bytes / copy bandwidth;
            TTFT for a 1024-token prompt.
  nano      256 requests (random.seed(0); prompt ids randint(0, 10000); prompt and output
            lengths randint(100, 1024)); ignore_eos, temperature 0.6; output tok/s.
            --nano-requests shrinks it for a quicker run.

    python bench/bench_e2e.py --out bench/results/e2e.json [--skip-hf] [--skip-compile] [--nano-requests 256]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth, device_info  # noqa: E402

LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_act="silu",
    torch_dtype="bfloat16",
)


def make_random_llama(path: str, cfg: dict = LLAMA_1B, device: str = "cuda") -> int:
    """Write config.json, random bf16 safetensors and a word-level tokenizer.json; return the param count."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nk = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    g = torch.Generator(device=device).manual_seed(0)

    def w(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(torch.bfloat16).cpu()

    tensors = {"model.embed_tokens.weight": w(cfg["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors[p + "self_attn.q_proj.weight"] = w(nq * d, h)
        tensors[p + "self_attn.k_proj.weight"] = w(nk * d, h)
        tensors[p + "self_attn.v_proj.weight"] = w(nk * d, h)
        tensors[p + "self_attn.o_proj.weight"] = w(h, nq * d)
        tensors[p + "mlp.gate_proj.weight"] = w(i, h)
        tensors[p + "mlp.up_proj.weight"] = w(i, h)
        tensors[p + "mlp.down_proj.weight"] = w(h, i)
        tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    vocab = {f"t{j}": j for j in range(cfg["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "t128000", "eos_token": "t128001", "add_bos_token": False}, f)
    return sum(t.numel() for t in tensors.values())


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_tinyvllm(path: str, args: argparse.Namespace, enforce_eager: bool = False) -> dict:
    """Latency (and, with CUDA graphs, the nano workload) of tinyvllm; enforce_eager=True: no graphs."""
    from tinyvllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=path, dtype="bfloat16", max_model_len=4096, seed=0, enforce_eager=enforce_eager)
    startup_s = time.perf_counter() - t0
    rng = random.Random(1)
    prompt32 = [{"prompt_token_ids": [rng.randrange(10000) for _ in range(32)]}]
    prompt1024 = [{"prompt_token_ids": [rng.randrange(10000) for _ in range(1024)]}]

    def run(prompts, n):
        return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)

    run(prompt32, 8)  # warm-up
    run(prompt1024, 1)
    t1 = min(timed(lambda: run(prompt32, 1)) for _ in range(3))
    t129 = min(timed(lambda: run(prompt32, 129)) for _ in range(3))
    ttft_1024 = min(timed(lambda: run(prompt1024, 1)) for _ in range(3))
    res = {"decode_step_ms": (t129 - t1) / 128 * 1e3, "ttft_32_ms": t1 * 1e3, "ttft_1024_ms": ttft_1024 * 1e3,
           "startup_s": startup_s}

    if args.nano_requests > 0 and not enforce_eager:
        random.seed(0)
        n = args.nano_requests
        prompts = [{"prompt_token_ids": [random.randint(0, 10000) for _ in range(random.randint(100, 1024))]} for _ in range(n)]
        params = [
            SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(100, 1024)) for _ in range(n)
        ]
        t = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
        out_tokens = sum(p.max_tokens for p in params)
        res.update(
            nano_requests=n,
            nano_prompt_tokens=sum(len(p["prompt_token_ids"]) for p in prompts),
            nano_output_tokens=out_tokens,
            nano_seconds=t,
            nano_output_tok_s=out_tokens / t,
        )
    del llm
    torch.cuda.empty_cache()
    return res


def bench_transformers(path: str) -> dict:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    rng = random.Random(1)
    ids32 = torch.tensor([[rng.randrange(10000) for _ in range(32)]], device="cuda")
    ids1024 = torch.tensor([[rng.randrange(10000) for _ in range(1024)]], device="cuda")

    def gen(ids, n):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    gen(ids32, 8)
    t1 = min(timed(lambda: gen(ids32, 1)) for _ in range(3))
    t129 = min(timed(lambda: gen(ids32, 129)) for _ in range(3))
    ttft = min(timed(lambda: gen(ids1024, 1)) for _ in range(3))
    del model
    torch.cuda.empty_cache()
    return {"decode_step_ms": (t129 - t1) / 128 * 1e3, "ttft_32_ms": t1 * 1e3, "ttft_1024_ms": ttft * 1e3}


def bench_static_llama(path: str) -> dict:
    """The torch.compile peer at batch 1: decode ms/step on the latency workload's 32-token prompt."""
    from static_llama import StaticLlama, decode_step_ms

    model = StaticLlama(path, max_batch=1, max_seq_len=256)
    rng = random.Random(1)
    prompt = torch.tensor([[rng.randrange(10000) for _ in range(32)]], device="cuda")
    res = {"decode_step_ms": decode_step_ms(model, prompt, n=128)}
    del model
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/e2e.json")
    ap.add_argument("--skip-hf", action="store_true", help="do not time transformers")
    ap.add_argument("--skip-compile", action="store_true", help="do not time the torch.compile peer")
    ap.add_argument("--nano-requests", type=int, default=256, help="0 skips the nano workload")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_e2e needs a CUDA GPU")

    bw = copy_bandwidth() * 1e9  # bytes/s
    with tempfile.TemporaryDirectory() as path:
        n_params = make_random_llama(path)
        weight_bytes = 2 * n_params
        floor_ms = weight_bytes / bw * 1e3
        ours = bench_tinyvllm(path, args)
        eager = bench_tinyvllm(path, args, enforce_eager=True)
        hf = None if args.skip_hf else bench_transformers(path)
        compiled = None if args.skip_compile else bench_static_llama(path)

    result = {
        "card": device_info()["device"],
        "device_info": device_info(),
        "copy_bandwidth_GBps": bw / 1e9,
        "weight_bytes": weight_bytes,
        "decode_floor_ms": floor_ms,
        "tinyvllm": ours,
        "tinyvllm_eager": eager,
        "transformers": hf,
        "torch_compile": compiled,
    }
    for r in (ours, eager):
        r["decode_fraction_of_floor"] = floor_ms / r["decode_step_ms"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\ncard {result['card']}  copy bandwidth {bw / 1e9:.0f} GB/s  decode floor {floor_ms:.3f} ms")
    print(f"{'engine':<14}{'decode ms/step':>16}{'% of floor':>12}{'TTFT 32 ms':>12}{'TTFT 1024 ms':>14}")
    for name, r in (("tinyvllm", ours), ("tinyvllm eager", eager), ("transformers", hf), ("torch.compile", compiled)):
        if r:
            ttft = f"{r['ttft_32_ms']:>12.2f}{r['ttft_1024_ms']:>14.2f}" if "ttft_32_ms" in r else ""
            print(f"{name:<14}{r['decode_step_ms']:>16.3f}{100 * floor_ms / r['decode_step_ms']:>11.1f}%{ttft}")
    if "nano_output_tok_s" in ours:
        print(
            f"nano: {ours['nano_requests']} requests, {ours['nano_output_tokens']} output tokens in "
            f"{ours['nano_seconds']:.1f} s = {ours['nano_output_tok_s']:.0f} output tok/s"
        )


if __name__ == "__main__":
    main()
