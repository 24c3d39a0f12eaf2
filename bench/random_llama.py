"""A random Llama checkpoint on disk, of the exact shape of Llama 3.2 1B (or a tiny one for CPU runs).

No weights can be downloaded on the GPU machine, so the end-to-end benchmark and the step
profile write a checkpoint of Llama-3.2-1B-Instruct's shape with random bf16 weights: speed does
not depend on the values. Every engine and peer loads it from the same directory
(``config.json``, ``model.safetensors``, a word-level ``tokenizer.json`` in which token ``j`` is
the word ``t{j}``).

    from random_llama import LLAMA_1B, TINY_LLAMA, make_random_llama
    n_params = make_random_llama(path)                         # the 1B shape, generated on the GPU
    make_random_llama(path, TINY_LLAMA, device="cpu")          # 2 layers, hidden 128, for CPU tests
"""

from __future__ import annotations

import json
import os

import torch

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

# The same architecture, small enough that the pure-torch reference ops run it in milliseconds.
TINY_LLAMA = dict(LLAMA_1B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, bos_token_id=1, eos_token_id=[2])
# Small enough that the forward pass is a minor share of a step: the host's own work, measured on any
# machine (bench_host.py; bench_serve.py --host-bound).
NEGLIGIBLE_LLAMA = dict(TINY_LLAMA, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, vocab_size=512)  # fmt: skip


def make_random_llama(path: str, cfg: dict = LLAMA_1B, device: str = "cuda") -> int:
    """Write config.json, random bf16 safetensors and a word-level tokenizer.json; return the param count.

    The weights are drawn on ``device`` (fast for the 1B shape on a GPU) and saved from the CPU."""
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
    if not cfg.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = w(cfg["vocab_size"], h)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    vocab = {f"t{j}": j for j in range(cfg["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(os.path.join(path, "tokenizer.json"))
    bos, eos = cfg["bos_token_id"], cfg["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": f"t{bos}", "eos_token": f"t{eos}", "add_bos_token": False}, f)
    return sum(t.numel() for t in tensors.values())
