"""The torch.compile peer on a throughput workload: static batching of ragged requests.

bench/static_llama.py's gpt-fast-style Llama decodes a batch whose rows all sit at the same
position. A throughput workload (``nano``: prompts of 100-1024 tokens, outputs of 100-1024)
has a different position in every row, so this subclass adds :meth:`forward_rows`: positions
per row ([B, T]), a mask per row, and k/v written at each row's own positions of the static
cache. It is what a good PyTorch user without an engine would run:

* every request of the workload is one row of ONE batch (the engine's ``max_num_seqs`` is 256,
  nano has 256 requests: equal batch);
* each prompt is prefilled on its own (eager, one forward per row; prompts of one length, as in
  the latency workload, in one forward);
* then every row decodes until the longest output is done (static batching: a finished row
  keeps computing, its extra tokens are not counted), through ``forward_rows`` under
  ``torch.compile(mode="reduce-overhead")`` (one CUDA graph per step);
* sampling as the engine's (temperature, then ``argmax(p / Exp(1))``).

The static cache holds ``max(prompt) + max(output)`` positions per row and every step reads all
of them (masked), as gpt-fast does: at nano's 256 x 2048 that is 17 GB per step against the
engine's paged cache, which reads only what each sequence holds. Grouped-query attention runs
as Hk heads of G query rows (no copy of k/v per query head, see ``forward_rows``). The
latency workload runs on the same class: its rows share one position, a special case.

    peer = StaticBatchLlama(path, max_batch=256, max_seq_len=2048)
    warm_up(peer, batch=256)                        # compile and capture, untimed
    res = run_static_batch(peer, prompts, max_tokens, temperature=0.6)   # res["seconds"], ...
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from static_llama import StaticLlama


class StaticBatchLlama(StaticLlama):
    """StaticLlama with a position per row; ``decode`` is the compiled :meth:`forward_rows`."""

    def __init__(self, path: str, max_batch: int, max_seq_len: int, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16, compile: bool = True) -> None:
        super().__init__(path, max_batch, max_seq_len, device=device, dtype=dtype)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        # (StaticLlama compiled its forward lazily: nothing was compiled for it.)
        self.decode = torch.compile(self.forward_rows, mode="reduce-overhead", fullgraph=True) if compile else self.forward_rows

    def forward_rows(self, ids: torch.Tensor, pos: torch.Tensor, row0: int = 0) -> torch.Tensor:
        """ids [B, T], pos [B, T] (each row's own positions) -> logits of each row's last token
        [B, vocab] float32. Row b uses (and writes) cache row ``row0 + b``."""
        b, t = ids.shape
        hq, hk, d = self.n_heads, self.n_kv, self.head_dim
        g = hq // hk
        x = F.embedding(ids, self.embed)
        keys = torch.arange(self.cos.shape[0], device=ids.device)
        mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, S]: a token sees positions <= its own
        if t > 1:
            mask = mask.repeat(1, 1, g, 1)  # [B, 1, G*T, S]: the query rows are (group member, token) pairs
        rows = torch.arange(b, device=ids.device)[:, None]  # [B, 1], broadcast against pos [B, T]
        rope_pos = pos[:, None, :]  # [B, 1, T]: cos/sin [B, 1, T, D] broadcast over the heads
        for lw in self.layers:
            h = self._rms(x, lw.ln1)
            q, k, v = (h @ lw.wqkv.t()).split([hq * d, hk * d, hk * d], dim=-1)
            q = self._rope(q.view(b, t, hq, d).transpose(1, 2), rope_pos)
            k = self._rope(k.view(b, t, hk, d).transpose(1, 2), rope_pos)
            kc, vc = lw.k_cache[row0:row0 + b], lw.v_cache[row0:row0 + b]
            # kc[rows, :, pos] is [B, T, Hk, D] (the indexed dims first): row b, position pos[b, j].
            kc[rows, :, pos] = k.transpose(1, 2)
            vc[rows, :, pos] = v.view(b, t, hk, d)
            # Grouped-query attention as Hk heads of G*T query rows each (query head h reads kv
            # head h // G): SDPA's enable_gqa=True with a mask falls back to its math kernel, which
            # copies every kv head G times; this way the efficient kernel reads each once.
            a = F.scaled_dot_product_attention(q.reshape(b, hk, g * t, d), kc, vc, attn_mask=mask)
            x = x + a.reshape(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d) @ lw.wo.t()
            gate, up = (self._rms(x, lw.ln2) @ lw.w13.t()).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ lw.w2.t()
        return (self._rms(x[:, -1], self.norm) @ self.lm_head.t()).float()


def sample(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Greedy at temperature 0; else the engine's exponential race, argmax(softmax(l / T) / Exp(1))."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


@torch.inference_mode()
def warm_up(model: StaticBatchLlama, batch: int, steps: int = 3) -> None:
    """Compile and capture the decode step at ``batch`` rows before any timing (it writes
    position 0 of each row's cache, which the prefill of a real run overwrites)."""
    dev = model.embed.device
    tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    for _ in range(steps):
        tok = model.decode(tok, pos).argmax(-1)[:, None].clone()


@torch.inference_mode()
def run_static_batch(model: StaticBatchLlama, prompts: list[list[int]], max_tokens: list[int], temperature: float,
                     sync: Callable[[], None] = lambda: None) -> dict:
    """Generate ``max_tokens[i]`` tokens for every prompt as one static batch; time it.

    Returns seconds (host clock, synchronized with ``sync``), prefill seconds, the useful output
    tokens (sum of max_tokens) and the decode steps run (the longest output - 1)."""
    n = len(prompts)
    if n > model.max_batch:
        raise ValueError(f"{n} requests do not fit the static batch of {model.max_batch}")
    # Every row decodes until the longest output is done, so the longest prompt runs that many
    # steps too (its last token is never written to the cache).
    needed = max(map(len, prompts)) + max(max_tokens) - 1
    if needed > model.max_seq_len:
        raise ValueError(f"the static batch needs {needed} positions (longest prompt + longest output - 1), "
                         f"the static cache holds {model.max_seq_len}")
    dev = model.embed.device
    sync()
    t0 = time.perf_counter()
    if len({len(p) for p in prompts}) == 1:  # equal lengths (the latency workload): one prefill
        ids = torch.tensor(prompts, device=dev)
        pos = torch.arange(ids.shape[1], device=dev).expand(n, -1)
        tok = sample(model.forward_rows(ids, pos), temperature)[:, None]
    else:  # ragged: each prompt into its own row
        tok = torch.cat([sample(model.forward_rows(torch.tensor([p], device=dev), torch.arange(len(p), device=dev)[None],
                                                   row0=row), temperature) for row, p in enumerate(prompts)])[:, None]
    pos = torch.tensor([[len(p)] for p in prompts], device=dev)
    sync()
    prefill_s = time.perf_counter() - t0
    steps = max(max_tokens) - 1
    for _ in range(steps):
        tok = sample(model.decode(tok, pos), temperature)[:, None].clone()
        pos = pos + 1
    sync()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "prefill_s": prefill_s, "output_tokens": sum(max_tokens), "decode_steps": steps,
            "static_cache_positions": model.max_seq_len, "batch": n}
