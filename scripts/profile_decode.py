"""Run one decode attention launch (batch 256, context 4096, Llama 3.2 1B shapes) for a profiler.

    ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        -k regex:decode_tensor_cores -c 1 python scripts/profile_decode.py [--block-size 16]
    ncu ... -k regex:flash -c 1 python scripts/profile_decode.py --sdpa     # the peer, on contiguous k/v
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from bench_attention import NUM_HEADS, NUM_KV_HEADS, paged_from_contiguous  # noqa: E402

from tinyvllm.ops._kernels import extension_loaded  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--ordered", action="store_true", help="blocks in order (default: shuffled, as the benchmark)")
    ap.add_argument("--sdpa", action="store_true", help="run torch SDPA on contiguous k/v instead")
    ap.add_argument("--impl", type=int, default=-1, choices=[-1, 1, 3],
                    help="decode kernel: -1 automatic, 1 tensor cores (kv head shared by the block), "
                         "3 tensor cores (one kv head per warp)")
    args = ap.parse_args()
    assert extension_loaded()
    d, b, L = 64, args.batch, args.context
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, NUM_HEADS, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, NUM_KV_HEADS, L, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if args.sdpa:
        from bench_attention import sdpa_gqa

        o = sdpa_gqa(q.unsqueeze(2), k, v)
        torch.cuda.synchronize()
        print("ok", o.float().abs().mean().item())
        return
    kc, vc, tables = paged_from_contiguous(k, v, args.block_size, gen, shuffle=not args.ordered)
    del k, v
    lens = torch.full((b,), L, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    torch.ops.tinyvllm.paged_attention_decode(out, q, kc, vc, tables, lens, 1.0 / math.sqrt(d), args.impl, b * L)
    torch.cuda.synchronize()
    print("ok", out.float().abs().mean().item())


if __name__ == "__main__":
    main()
