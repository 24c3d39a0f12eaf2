"""exp34 (temporary): the automatic plan (impl -1; one kv head per warp in its window) against
impl 1 (the warps of a block share one kv head) and SDPA, same buffers, interleaved."""
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, "bench")
import bench_attention as ba  # noqa: E402
from common import device_info, time_us  # noqa: E402

import tinyvllm.ops._kernels as K  # noqa: E402
from tinyvllm.ops import decode_plan  # noqa: E402

assert K.extension_loaded()
SHAPES = [(b, L) for L in (512, 1024) for b in (176, 184, 192, 200, 240, 248, 256, 264, 288, 314, 320)] + [(256, 128), (256, 4096)]
HK, D, BS = 8, 64, 16
ROUNDS = int(os.environ.get("ROUNDS", "5"))
dec = torch.ops.tinyvllm.paged_attention_decode
res = {"device": device_info(), "rounds": ROUNDS}
for b, L in SHAPES:
    gen = torch.Generator().manual_seed(b * 100003 + L)
    k = torch.randn(b, HK, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, HK, L, D, device="cuda", dtype=torch.bfloat16)
    kc, vc, tables = ba.paged_from_contiguous(k, v, BS, gen)
    q = torch.randn(b, 32, D, device="cuda", dtype=torch.bfloat16)
    q4 = q.unsqueeze(2)
    lens = torch.full((b,), L, dtype=torch.int32, device="cuda")
    o1, o3 = torch.empty_like(q), torch.empty_like(q)
    plans = {i: decode_plan(q, HK, L, impl=i, sum_seq_lens=b * L) for i in (1, -1)}
    fns = {
        "shared": lambda: dec(o1, q, kc, vc, tables, lens, D ** -0.5, 1, b * L),
        "auto": lambda: dec(o3, q, kc, vc, tables, lens, D ** -0.5, -1, b * L),
        "sdpa": lambda: ba.sdpa_gqa(q4, k, v),
    }
    for f in fns.values():
        f()
    ref = ba.sdpa_gqa(q4, k, v).squeeze(2).float()
    err1 = (o1.float() - ref).abs().max().item()
    err3 = (o3.float() - ref).abs().max().item()
    assert err1 < 2e-2 and err3 < 2e-2, (err1, err3)
    times = {n: [] for n in fns}
    for _ in range(ROUNDS):
        for n, f in fns.items():
            times[n].append(time_us(f))
    med = {n: statistics.median(x) for n, x in times.items()}
    res[f"{b}x{L}"] = {"times_us": times, "median_us": med, "max_err": [err1, err3], "plans": plans}
    print(f"{b:4d}x{L:<5d} shared {med['shared']:7.1f}  auto {med['auto']:7.1f}  sdpa {med['sdpa']:7.1f}  "
          f"auto/shared {med['shared'] / med['auto']:.3f}x  vs sdpa: shared {med['sdpa'] / med['shared']:.3f}x "
          f"auto {med['sdpa'] / med['auto']:.3f}x  auto head_per_warp {plans[-1]['head_per_warp']} "
          f"splits {plans[-1]['num_splits']}", flush=True)
    del k, v, kc, vc
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), sys.argv[1] if len(sys.argv) > 1 else "exp34.json"), "w"),
          indent=1)
