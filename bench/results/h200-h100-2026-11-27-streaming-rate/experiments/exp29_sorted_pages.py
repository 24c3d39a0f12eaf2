"""exp29 (temporary): does visiting each sequence's pages in address order lower the read floor
of the shuffled paged cache? Attention does not care in which order it visits the tokens (online
softmax), so a kernel could do that. Same pages, same reader; only the order of each table row."""
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, "bench")
import bench_attention as ba  # noqa: E402
from common import device_info, time_us  # noqa: E402

import tinyvllm.ops._kernels as K  # noqa: E402

assert K.extension_loaded()
SHAPES = [(64, 1024), (64, 4096), (256, 512), (256, 1024), (256, 4096)]
CONFIGS = [(t, u, 0) for t in (128, 256) for u in (2, 4, 8)]
HK, D, BS = 8, 64, 16
op = torch.ops.tinyvllm.read_pages
res = {"device": device_info()}
for b, L in SHAPES:
    gen = torch.Generator().manual_seed(b * 100003 + L)
    k = torch.randn(b, HK, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, HK, L, D, device="cuda", dtype=torch.bfloat16)
    kc, vc, tables = ba.paged_from_contiguous(k, v, BS, gen)
    q = torch.randn(b, 32, D, device="cuda", dtype=torch.bfloat16)
    q4 = q.unsqueeze(2)
    nb = L // BS
    pk, pv = kc.view(kc.shape[0] * HK, -1), vc.view(vc.shape[0] * HK, -1)
    variants = {
        "shuffled": tables[:, :nb].contiguous(),
        "each row sorted": tables[:, :nb].sort(dim=1).values.contiguous(),
        "each row sorted, descending": tables[:, :nb].sort(dim=1, descending=True).values.contiguous(),
    }
    fns, sums = {"sdpa": lambda: ba.sdpa_gqa(q4, k, v)}, {}
    for name, tab in variants.items():
        ck = torch.empty(b, HK, dtype=torch.int32, device="cuda")
        for t, u, r in CONFIGS:
            fns[f"{name}|{t}/{u}"] = (lambda tab=tab, ck=ck, t=t, u=u, r=r: op(ck, pk, pv, tab, HK, 1, t, u, r))
        fns[f"{name}|256/4"]()
        torch.cuda.synchronize()
        sums[name] = ck.clone()
    assert all(torch.equal(x, sums["shuffled"]) for x in sums.values())  # same pages, XOR is order-free
    times = {n: [] for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            times[n].append(time_us(f))
    med = {n: statistics.median(x) for n, x in times.items()}
    best = {}
    for name in variants:
        cand = {n.split("|")[1]: t for n, t in med.items() if n.startswith(name + "|")}
        bn = min(cand, key=cand.get)
        best[name] = (cand[bn], bn)
    res[f"{b}x{L}"] = {"median_us": med, "best": best}
    print(f"{b}x{L}: sdpa {med['sdpa']:.1f} | " + " | ".join(f"{n} {t:.1f} ({c})" for n, (t, c) in best.items()),
          flush=True)
    del k, v, kc, vc
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), sys.argv[1] if len(sys.argv) > 1 else "exp29.json"), "w"),
          indent=1)
