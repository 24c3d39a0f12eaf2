"""exp30 (temporary): our decode kernel over each sequence's pages in address order.

Decode attention's output does not depend on the order in which a sequence's FULL blocks are
visited (online softmax sums the same terms), and only the last block can be partial. So the
table row may list the full blocks sorted by block number. exp29 showed the plain read of
the pages 1.7-2% faster at one wave when sorted. Does our kernel gain the same?"""
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
SHAPES = [(8, 512), (8, 1024), (8, 4096), (64, 512), (64, 1024), (64, 4096), (256, 512), (256, 1024), (256, 4096)]
HK, D, BS = 8, 64, 16
read = torch.ops.tinyvllm.read_pages
dec = torch.ops.tinyvllm.paged_attention_decode
res = {"device": device_info()}
for b, L in SHAPES:
    gen = torch.Generator().manual_seed(b * 100003 + L)
    k = torch.randn(b, HK, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, HK, L, D, device="cuda", dtype=torch.bfloat16)
    kc, vc, tables = ba.paged_from_contiguous(k, v, BS, gen)
    q = torch.randn(b, 32, D, device="cuda", dtype=torch.bfloat16)
    q4 = q.unsqueeze(2)
    lens = torch.full((b,), L, dtype=torch.int32, device="cuda")
    nb = L // BS
    srt = tables.sort(dim=1).values.contiguous()  # every block is full here (L % 16 == 0)
    o1, o2 = torch.empty_like(q), torch.empty_like(q)
    fns = {
        "ours shuffled": lambda: dec(o1, q, kc, vc, tables, lens, D ** -0.5, -1, b * L),
        "ours sorted": lambda: dec(o2, q, kc, vc, srt, lens, D ** -0.5, -1, b * L),
        "sdpa": lambda: ba.sdpa_gqa(q4, k, v),
    }
    fns["ours shuffled"]()
    fns["ours sorted"]()
    ref = ba.sdpa_gqa(q4, k, v).squeeze(2).float()
    err = max((o1.float() - ref).abs().max().item(), (o2.float() - ref).abs().max().item())
    assert err < 2e-2, err
    if b >= 64:
        pk, pv = kc.view(kc.shape[0] * HK, -1), vc.view(vc.shape[0] * HK, -1)
        ck = torch.empty(b, HK, dtype=torch.int32, device="cuda")
        for name, tab in (("floor shuffled", tables[:, :nb].contiguous()), ("floor sorted", srt[:, :nb].contiguous())):
            for t, u in ((256, 4), (256, 8), (128, 8), (128, 2)):
                fns[f"{name}|{t}/{u}"] = (lambda tab=tab, t=t, u=u: read(ck, pk, pv, tab, HK, 1, t, u, 0))
    times = {n: [] for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            times[n].append(time_us(f))
    med = {n: statistics.median(x) for n, x in times.items()}
    row = {n: t for n, t in med.items() if "|" not in n}
    for name in ("floor shuffled", "floor sorted"):
        cand = {n: t for n, t in med.items() if n.startswith(name + "|")}
        if cand:
            row[name] = min(cand.values())
    res[f"{b}x{L}"] = {"median_us": med, "summary": row, "max_err": err}
    print(f"{b}x{L}: " + " | ".join(f"{n} {t:.1f}" for n, t in row.items()), flush=True)
    del k, v, kc, vc
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), sys.argv[1] if len(sys.argv) > 1 else "exp30.json"), "w"),
          indent=1)
