"""Clocks and power while our decode kernel, then torch SDPA, run back to back for 3 s each.

    python scripts/probe_clocks.py      # batch 256 x 4096, Llama 3.2 1B shapes, bf16

Is one kernel slower because the GPU slows down under it (power cap, heat)? nvidia-smi samples
the SM clock, memory clock, power and throttle reasons every 100 ms while each kernel runs in a
loop (warm L2, no flush: the steady state, unlike bench/bench_attention.py's cold calls).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from bench_attention import NUM_HEADS, NUM_KV_HEADS, paged_from_contiguous, sdpa_gqa  # noqa: E402

from tinyvllm.ops._kernels import extension_loaded  # noqa: E402

QUERY = "clocks.sm,clocks.mem,power.draw,clocks_throttle_reasons.active"


def run_and_sample(fn: Callable[[], object], seconds: float = 3.0) -> tuple[float, list[list[str]]]:
    """Call fn back to back for `seconds`; return us per call and nvidia-smi's samples meanwhile."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", "100"],
                           stdout=subprocess.PIPE, text=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0, calls = time.time(), 0
    start.record()
    while time.time() - t0 < seconds:
        for _ in range(50):
            fn()
        calls += 50
        torch.cuda.synchronize()
    end.record()
    torch.cuda.synchronize()
    smi.terminate()
    lines = smi.communicate()[0].strip().splitlines()[3:-1]  # drop the ramp at both ends
    return start.elapsed_time(end) * 1e3 / calls, [[x.strip() for x in line.split(",")] for line in lines]


def main() -> None:
    assert extension_loaded(), "tinyvllm._C is not built"
    b, length, d = 256, 4096, 64
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, NUM_HEADS, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, NUM_KV_HEADS, length, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kc, vc, tables = paged_from_contiguous(k, v, 16, gen)
    lens = torch.full((b,), length, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    op = torch.ops.tinyvllm.paged_attention_decode

    def ours() -> None:
        op(out, q, kc, vc, tables, lens, 1.0 / math.sqrt(d), -1)

    def sdpa() -> torch.Tensor:
        return sdpa_gqa(q.unsqueeze(2), k, v)

    for name, fn in [("ours", ours), ("sdpa", sdpa), ("ours", ours), ("sdpa", sdpa)]:
        us, rows = run_and_sample(fn)
        sm = [float(r[0]) for r in rows]
        power = [float(r[2]) for r in rows]
        print(f"{name}: {us:.1f} us/call, SM clock {min(sm):.0f}-{max(sm):.0f} MHz (mean {sum(sm) / len(sm):.0f}), "
              f"memory {rows[0][1]} MHz, power {sum(power) / len(power):.0f} W (max {max(power):.0f}), "
              f"throttle reasons {sorted(set(r[3] for r in rows))}")


if __name__ == "__main__":
    main()
