"""The peer the engine benchmark times beside tinyvllm: a gpt-fast-style Llama.

A plain-torch Llama with a STATIC KV cache ([batch, kv_heads, max_seq_len, head_dim] per
layer, written in place at the new positions), whose one-token decode step runs under
``torch.compile(mode="reduce-overhead")``: Inductor fuses the elementwise work and replays
the whole step as one CUDA graph. It is what "a good PyTorch user with no engine" gets, so
an engine that is slower than it is losing time to its own overhead (Python, launches,
host syncs), not to the GPU.

What it does NOT do, and tinyvllm does: paged blocks, continuous batching (every sequence
of a batch here starts and stops together), sampling beyond greedy. It reads the whole
static cache every step (masked), as gpt-fast does; with ``max_seq_len`` sized to the
workload that costs little at Llama-3.2-1B shapes (32 KiB of k/v per token).

Weights come from the same ``config.json`` + ``model.safetensors`` as the engine's (the
benchmark writes a random Llama-3.2-1B-shaped checkpoint). RoPE uses the engine's
``inverse_frequencies`` (the Llama 3 scaling), applied the Hugging Face way (rotate half).

    python bench/static_llama.py PATH   # prints decode ms/step at batch 1 and its greedy tokens
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F


class _Layer(torch.nn.Module):
    """One decoder layer's weights and its static k/v cache, as buffers (so that torch.compile
    treats them as fixed addresses that the CUDA graph may write in place)."""

    def __init__(self, w: dict[str, torch.Tensor], p: str, cache_shape: tuple[int, ...]) -> None:
        super().__init__()
        cat = torch.cat
        self.register_buffer("ln1", w[p + "input_layernorm.weight"])
        self.register_buffer("ln2", w[p + "post_attention_layernorm.weight"])
        self.register_buffer("wqkv", cat([w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
        self.register_buffer("wo", w[p + "self_attn.o_proj.weight"])
        self.register_buffer("w13", cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]))
        self.register_buffer("w2", w[p + "mlp.down_proj.weight"])
        self.register_buffer("k_cache", torch.zeros(cache_shape, device=self.wo.device, dtype=self.wo.dtype))
        self.register_buffer("v_cache", torch.zeros(cache_shape, device=self.wo.device, dtype=self.wo.dtype))


class StaticLlama(torch.nn.Module):
    """A Llama decoder over a static KV cache; ``decode`` is the compiled one-token step."""

    def __init__(self, path: str, max_batch: int, max_seq_len: int, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        from safetensors.torch import load_file

        from tinyvllm.model.rope import inverse_frequencies

        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        w = {k: v.to(device=device, dtype=dtype) for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg["num_key_value_heads"]
        self.head_dim = cfg.get("head_dim") or cfg["hidden_size"] // self.n_heads
        self.eps = cfg["rms_norm_eps"]
        self.register_buffer("embed", w["model.embed_tokens.weight"])
        self.register_buffer("lm_head", self.embed if cfg.get("tie_word_embeddings") else w["lm_head.weight"])
        self.register_buffer("norm", w["model.norm.weight"])
        shape = (max_batch, self.n_kv, max_seq_len, self.head_dim)
        self.layers = torch.nn.ModuleList(_Layer(w, f"model.layers.{i}.", shape) for i in range(self.n_layers))
        del w
        inv_freq = inverse_frequencies(self.head_dim, cfg["rope_theta"], cfg.get("rope_scaling"))
        angles = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], -1).to(device))  # [S, D] float32
        self.register_buffer("sin", torch.cat([angles.sin(), angles.sin()], -1).to(device))
        self.register_buffer("causal", torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device)))
        self.decode = torch.compile(self.forward, mode="reduce-overhead", fullgraph=True)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x [B, H, T, D]; rotate-half pairing: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
        cos, sin = self.cos[pos], self.sin[pos]  # [T, D]
        x1, x2 = x.float().chunk(2, dim=-1)
        return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids [B, T], pos [T] (positions of these tokens) -> logits of the last position [B, vocab] float32."""
        b, t = ids.shape
        hq, hk, d = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids, self.embed)
        mask = self.causal[pos]  # [T, S]: token at pos p sees cache positions <= p
        for lw in self.layers:
            h = self._rms(x, lw.ln1)
            q, k, v = (h @ lw.wqkv.t()).split([hq * d, hk * d, hk * d], dim=-1)
            q = self._rope(q.view(b, t, hq, d).transpose(1, 2), pos)
            k = self._rope(k.view(b, t, hk, d).transpose(1, 2), pos)
            v = v.view(b, t, hk, d).transpose(1, 2)
            kc, vc = lw.k_cache[:b], lw.v_cache[:b]
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
            x = x + a.transpose(1, 2).reshape(b, t, hq * d) @ lw.wo.t()
            gate, up = (self._rms(x, lw.ln2) @ lw.w13.t()).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ lw.w2.t()
        return (self._rms(x[:, -1], self.norm) @ self.lm_head.t()).float()

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, n: int) -> torch.Tensor:
        """Greedy: prefill ``prompt`` [B, P] eagerly, then n - 1 compiled decode steps. Returns [B, n]."""
        p = prompt.shape[1]
        tok = self.forward(prompt, torch.arange(p, device=prompt.device)).argmax(-1)
        out = [tok]
        for i in range(n - 1):
            pos = torch.tensor([p + i], device=prompt.device)
            tok = self.decode(tok[:, None], pos).argmax(-1).clone()
            out.append(tok)
        return torch.stack(out, 1)


def decode_step_ms(model: StaticLlama, prompt: torch.Tensor, n: int = 128, repeats: int = 3) -> float:
    """Mean decode step (prefill excluded) in ms: (time of n+1 tokens - time of 1 token) / n, best of repeats."""
    import time

    def timed(k: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(prompt, k)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    model.generate(prompt, 8)  # compile and capture outside the timing
    model.generate(prompt, 8)
    t1 = min(timed(1) for _ in range(repeats))
    tn = min(timed(n + 1) for _ in range(repeats))
    return (tn - t1) / n * 1e3


if __name__ == "__main__":
    path = sys.argv[1]
    m = StaticLlama(path, max_batch=1, max_seq_len=256)
    prompt = torch.randint(0, 10000, (1, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    print(f"decode {decode_step_ms(m, prompt):.3f} ms/step; greedy {m.generate(prompt, 16)[0].tolist()}")
