"""exp33 (temporary): one kv head per warp, a block = 4 kv heads of a sequence, no merge (impl 3), against
the static split (tiles w, w+W, ...; impl 1) and SDPA, same buffers, interleaved."""
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
SHAPES = [(8, 1024), (64, 1024), (128, 1024), (128, 4096), (256, 512), (256, 1024), (256, 4096)]
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
    plans = {i: decode_plan(q, HK, L, impl=i, sum_seq_lens=b * L) for i in (1, 3)}
    fns = {
        "static": lambda: dec(o1, q, kc, vc, tables, lens, D ** -0.5, 1, b * L),
        "hpw": lambda: dec(o3, q, kc, vc, tables, lens, D ** -0.5, 3, b * L),
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
    print(f"{b:4d}x{L:<5d} static {med['static']:7.1f}  hpw {med['hpw']:7.1f}  sdpa {med['sdpa']:7.1f}  "
          f"hpw/static {med['static'] / med['hpw']:.3f}x  vs sdpa: static {med['sdpa'] / med['static']:.3f}x "
          f"hpw {med['sdpa'] / med['hpw']:.3f}x  splits {plans[1]['num_splits']}/{plans[3]['num_splits']} "
          f"warps {plans[1]['warps']}", flush=True)
    del k, v, kc, vc
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), sys.argv[1] if len(sys.argv) > 1 else "exp33.json"), "w"),
          indent=1)
