"""exp22 (temporary): our decode kernel's warps / blocks per SM / stages against the read floor."""
import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, "bench")
import bench_attention as ba  # noqa: E402
from common import time_us  # noqa: E402

import tinyvllm.ops._kernels as K  # noqa: E402

assert K.extension_loaded()
tag = sys.argv[1]
SHAPES = [(64, 1024), (64, 4096), (256, 512), (256, 1024), (256, 4096)]
VARIANTS = {"plan": {}, "W4 r4": {"TV_EXP_BPS": "4"}, "W4 r3": {"TV_EXP_BPS": "3"},
            "W8": {"TV_EXP_WARPS": "8"}, "W16": {"TV_EXP_WARPS": "16"}}
FLOORS = [(256, 8, 0), (128, 2, 0), (256, 4, 0)]
out = {}
for b, L in SHAPES:
    gen = torch.Generator().manual_seed(b * 100003 + L)
    d = 64
    q = torch.randn(b, 32, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, 8, L, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, 8, L, d, device="cuda", dtype=torch.bfloat16)
    kc, vc, tables = ba.paged_from_contiguous(k, v, 16, gen)
    lens = torch.full((b,), L, dtype=torch.int32, device="cuda")
    o = torch.empty_like(q)
    ref = ba.sdpa_gqa(q.unsqueeze(2), k, v).squeeze(2)
    fns = {}

    def mk(env):
        def f():
            for kk in ("TV_EXP_WARPS", "TV_EXP_BPS"):
                os.environ.pop(kk, None)
            os.environ.update(env)
            torch.ops.tinyvllm.paged_attention_decode(o, q, kc, vc, tables, lens, 1 / math.sqrt(d), -1, b * L)
        return f

    for name, env in VARIANTS.items():
        fns[name] = mk(env)
        fns[name]()
        err = (o.float() - ref.float()).abs().max().item()
        assert err < 5e-2, (name, err)
    fns["sdpa"] = lambda: ba.sdpa_gqa(q.unsqueeze(2), k, v)
    ck = torch.empty(b, 8, dtype=torch.int32, device="cuda")
    nb = L // 16
    for t, u, r in FLOORS:
        fns[f"floor {t}/{u}"] = (lambda t=t, u=u, r=r: torch.ops.tinyvllm.read_pages(
            ck, kc.view(-1, 1024), vc.view(-1, 1024), tables, 8, 1, t, u, r))
    times = {n: [] for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            times[n].append(time_us(f))
    for kk in ("TV_EXP_WARPS", "TV_EXP_BPS"):
        os.environ.pop(kk, None)
    med = {n: statistics.median(x) for n, x in times.items()}
    out[f"{b}x{L}"] = med
    print(f"{tag} {b}x{L}: " + "  ".join(f"{n} {t:.1f}" for n, t in med.items()), flush=True)
    del q, k, v, kc, vc
    torch.cuda.empty_cache()
os.makedirs(os.environ.get("OUT", "out"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "out"), f"exp22_{tag}.json"), "w"), indent=1)
