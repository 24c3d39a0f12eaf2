"""exp28 (temporary): does the read floor of the shuffled paged cache fall when a block reads
whole cache blocks (all kv heads of a 16-token block: 16 KiB contiguous) instead of one kv
head's 2 KiB page?

Same bytes, same number of thread blocks (8 per sequence) in every variant: with HR kv heads
per run, a row is (sequence, context chunk c of HR), it has 8/HR streams (groups of HR kv heads),
and each stream reads pages of HR x 2 KiB. HR = 1 is the paged floor of bench_attention.py.
"""
import json
import statistics
import sys

import torch

sys.path.insert(0, "bench")
import bench_attention as ba  # noqa: E402
from common import copy_bandwidth, device_info, time_us  # noqa: E402

import tinyvllm.ops._kernels as K  # noqa: E402

assert K.extension_loaded()

SHAPES = [(64, 1024), (64, 4096), (256, 512), (256, 1024), (256, 4096)]
CONFIGS = [(t, u, 0) for t in (128, 256) for u in (2, 4, 8)]
HK, D, BS = 8, 64, 16
op = torch.ops.tinyvllm.read_pages
res = {"device": device_info(), "copy_GBps": copy_bandwidth()}
for b, L in SHAPES:
    gen = torch.Generator().manual_seed(b * 100003 + L)
    q = torch.randn(b, 32, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, HK, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, HK, L, D, device="cuda", dtype=torch.bfloat16)
    kc, vc, tables = ba.paged_from_contiguous(k, v, BS, gen)
    lens = torch.full((b,), L, dtype=torch.int32, device="cuda")
    o = torch.empty_like(q)
    nb = L // BS
    fns, sums = {}, {}
    fns["ours"] = lambda: torch.ops.tinyvllm.paged_attention_decode(o, q, kc, vc, tables, lens, D ** -0.5, -1, b * L)
    q4 = q.unsqueeze(2)
    fns["sdpa"] = lambda: ba.sdpa_gqa(q4, k, v)
    for hr in (1, 2, 4, 8):
        s = HK // hr
        pk, pv = kc.view(kc.shape[0] * s, -1), vc.view(vc.shape[0] * s, -1)
        tab = tables[:, :nb].reshape(b * hr, nb // hr).contiguous()
        ck = torch.empty(b * hr, s, dtype=torch.int32, device="cuda")
        for t, u, r in CONFIGS:
            f = (lambda pk=pk, pv=pv, tab=tab, ck=ck, s=s, t=t, u=u, r=r: op(ck, pk, pv, tab, s, 1, t, u, r))
            f()
            torch.cuda.synchronize()
            x = ck.view(-1)
            acc = 0
            for w in x.tolist():
                acc ^= w & 0xFFFFFFFF
            sums[f"hr{hr}"] = acc
            fns[f"hr{hr} {t}/{u}"] = f
    rows = torch.arange(nb, device="cuda", dtype=torch.int32) + (HK * nb) * torch.arange(
        b, device="cuda", dtype=torch.int32).unsqueeze(1)
    ckc = torch.empty(b, HK, dtype=torch.int32, device="cuda")
    kk, vv = k.reshape(b * HK * nb, -1), v.reshape(b * HK * nb, -1)
    for t, u, r in CONFIGS:
        fns[f"contig {t}/{u}"] = (lambda t=t, u=u, r=r: op(ckc, kk, vv, rows, 1, nb, t, u, r))
    fns[f"contig 256/4"]()
    torch.cuda.synchronize()
    acc = 0
    for w in ckc.view(-1).tolist():
        acc ^= w & 0xFFFFFFFF
    sums["contig"] = acc
    assert len(set(sums.values())) == 1, sums
    times = {n: [] for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            times[n].append(time_us(f))
    med = {n: statistics.median(x) for n, x in times.items()}
    best = {}
    for key in ["hr1", "hr2", "hr4", "hr8", "contig"]:
        cand = {n: t for n, t in med.items() if n.startswith(key + " ")}
        bn = min(cand, key=cand.get)
        best[key] = (cand[bn], bn)
    res[f"{b}x{L}"] = {"median_us": med, "best": best}
    print(f"{b}x{L}: ours {med['ours']:.1f} sdpa {med['sdpa']:.1f} | " +
          " | ".join(f"{kk_} {t:.1f} ({n.split(' ')[1]})" for kk_, (t, n) in best.items()), flush=True)
    del k, v, kc, vc, kk, vv
    torch.cuda.empty_cache()
import os
out = os.environ.get("OUT", ".")
json.dump(res, open(os.path.join(out, sys.argv[1] if len(sys.argv) > 1 else "exp28_run_size.json"), "w"), indent=1)
