"""CPU benchmark: tinyvllm against transformers on the default model, in the same run.

What a user without a GPU gets: SmolLM2-135M-Instruct (the default model), float32, greedy,
128 new tokens per prompt (ignore_eos, so both make exactly 128), at 1 prompt and at 16
prompts in one batch. Both engines read the same dequantized weights; transformers runs its
default attention (SDPA) with its dynamic KV cache and left padding for the batch.

Each repetition times one whole ``generate`` call (prefill included) of tinyvllm, then of
transformers, so slow moments of a shared machine hit both. On a machine others use too, a
busy moment can make one call several times slower (threads wait for a core), so the table
gives each one's BEST time (the least disturbed run) and the JSON every run, the medians and
the load average. Greedy outputs are compared too: how many prompts have the same tokens up
to the first EOS (at most 32; transformers' min_new_tokens hides EOS, tinyvllm's ignore_eos
does not); a sanity check, not a test (float32 sums in another order may flip a near-tie).

    python bench/bench_cpu.py --out bench/results/cpu.json [--batches 1 16] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

# This tree's tinyvllm, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three laws of thermodynamics are", "Write a haiku about the sea.", "import numpy as np\n",
    "The best way to learn a language is", "In 1969, the first humans", "Photosynthesis is the process",
    "Here is a recipe for pancakes:", "The difference between a list and a tuple in Python",
    "Dear hiring manager,", "The largest planet in the solar system", "To be or not to be,",
    "A good night's sleep helps", "The main causes of the French Revolution were",
]  # fmt: skip
NEW_TOKENS = 128


def load_models(threads: int | None):
    """(tinyvllm LLM, transformers model, tokenizer), both on the default model in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinyvllm import LLM
    from tinyvllm.loader import load_checkpoint, resolve_model

    if threads:
        torch.set_num_threads(threads)
    llm = LLM(dtype="float32", device="cpu", max_model_len=512, max_num_seqs=16)
    mc, weights = load_checkpoint(resolve_model(None), torch.float32)
    cfg = LlamaConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads, head_dim=mc.head_dim, rms_norm_eps=mc.rms_norm_eps,
        rope_theta=mc.rope_theta, max_position_embeddings=mc.max_position_embeddings,
        tie_word_embeddings=mc.tie_word_embeddings, bos_token_id=mc.bos_token_id, eos_token_id=mc.eos_token_ids,
        pad_token_id=0, torch_dtype=torch.float32,
    )  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    hf.tie_weights()
    return llm, hf, llm.get_tokenizer()


def run_tinyvllm(llm, prompt_ids: list[list[int]]) -> tuple[float, list[list[int]]]:
    from tinyvllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    return dt, [o.outputs[0].token_ids for o in outs]


@torch.inference_mode()
def run_transformers(hf, prompt_ids: list[list[int]]) -> tuple[float, list[list[int]]]:
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompt_ids])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    t0 = time.perf_counter()
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                      min_new_tokens=NEW_TOKENS, pad_token_id=0)
    dt = time.perf_counter() - t0
    return dt, out[:, width:].tolist()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def same_until_eos(ours: list[int], theirs: list[int], eos: set[int], n: int = 32) -> bool:
    cut = next((i for i, t in enumerate(ours[:n]) if t in eos), min(n, len(ours)))
    return ours[:cut] == theirs[:cut]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. 'shared machine')")
    args = ap.parse_args()

    import transformers

    llm, hf, tok = load_models(args.threads)
    eos = set(llm.llm_engine.config.eos_token_ids)
    run_tinyvllm(llm, [tok.encode(PROMPTS[0])])  # warm-up: first calls allocate and fault in pages
    run_transformers(hf, [tok.encode(PROMPTS[0])])
    rows = []
    for batch in args.batches:
        prompt_ids = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
        times: dict[str, list[float]] = {"tinyvllm": [], "transformers": []}
        loads = [os.getloadavg()[0]]
        for _ in range(args.repeats):
            dt, ours = run_tinyvllm(llm, prompt_ids)
            times["tinyvllm"].append(dt)
            dt, theirs = run_transformers(hf, prompt_ids)
            times["transformers"].append(dt)
            loads.append(os.getloadavg()[0])
        tokens = batch * NEW_TOKENS
        best = {k: min(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({
            "batch": batch, "new_tokens": NEW_TOKENS,
            "tinyvllm_tok_s": round(tokens / best["tinyvllm"], 1),
            "transformers_tok_s": round(tokens / best["transformers"], 1),
            "speedup": round(best["transformers"] / best["tinyvllm"], 3),
            "median_speedup": round(med["transformers"] / med["tinyvllm"], 3),
            "tinyvllm_s": [round(t, 3) for t in times["tinyvllm"]],
            "transformers_s": [round(t, 3) for t in times["transformers"]],
            "load_avg_1min": [round(x, 2) for x in loads],
            "same_tokens_until_eos": sum(same_until_eos(a, b, eos) for a, b in zip(ours, theirs)),
        })  # fmt: skip
        r = rows[-1]
        print(f"batch {batch:3d}: tinyvllm {r['tinyvllm_tok_s']:7.1f} tok/s, transformers "
              f"{r['transformers_tok_s']:7.1f} tok/s, best {r['speedup']:.2f}x, median {r['median_speedup']:.2f}x  "
              f"(runs {r['tinyvllm_s']} vs {r['transformers_s']} s; load {r['load_avg_1min']}; "
              f"same tokens until EOS {r['same_tokens_until_eos']}/{batch})", flush=True)

    print("\n| prompts | tinyvllm tok/s | transformers tok/s | tinyvllm / transformers (best; median) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['tinyvllm_tok_s']} | {r['transformers_tok_s']} | "
              f"{r['speedup']:.2f}x; {r['median_speedup']:.2f}x |")
    result = {
        "benchmark": "bench_cpu", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
        "dtype": "float32", "greedy": True, "new_tokens": NEW_TOKENS, "repeats": args.repeats,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_avg_at_end": os.getloadavg()},
        "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "note": args.note, "rows": rows,
    }  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
