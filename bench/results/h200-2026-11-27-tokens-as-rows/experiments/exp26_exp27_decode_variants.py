"""exp26/exp27 (temporary, needs the patch beside it): decode variants against SDPA and the read floor.

This is the state of call 3 (exp27): impl 1 with an L2 bulk prefetch TV_EXP_PF tiles ahead, and
impl 3 (tokens as the mma's rows) with it. Calls 1 and 2 (exp26) ran the same loop with the
variants impl 1, impl 3, and impl 3 held to 5 blocks per SM (TV_EXP_TR_BPS=5); see the README.
Usage: python exp26_exp27_decode_variants.py TAG [BxL ...]
"""
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
SHAPES = [(1, 4096), (8, 512), (8, 1024), (8, 4096), (64, 512), (64, 1024), (64, 4096),
          (256, 128), (256, 512), (256, 1024), (256, 4096)]
if len(sys.argv) > 2:
    SHAPES = [tuple(int(x) for x in s.split("x")) for s in sys.argv[2:]]
FLOORS = [(256, 4, 0), (128, 2, 0)]
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
    VARS = {"pf0": (1, "0"), "pf2": (1, "2"), "pf4": (1, "4"), "pf8": (1, "8"), "tr_pf4": (3, "4")}
    for name, (impl, pf) in VARS.items():
        def f(impl=impl, pf=pf):
            os.environ["TV_EXP_PF"] = pf
            torch.ops.tinyvllm.paged_attention_decode(o, q, kc, vc, tables, lens, 1 / math.sqrt(d), impl, b * L)
            os.environ.pop("TV_EXP_PF", None)
        o.fill_(float("nan"))
        f()
        err = (o.float() - ref.float()).abs().max().item()
        assert err < 3e-2, (name, b, L, err)
        fns[name] = f
    fns["sdpa"] = lambda: ba.sdpa_gqa(q.unsqueeze(2), k, v)
    if b * L >= 65536:
        ck = torch.empty(b, 8, dtype=torch.int32, device="cuda")
        for t, u, r in FLOORS:
            fns[f"floor {t}/{u}/{r}"] = (lambda t=t, u=u, r=r: torch.ops.tinyvllm.read_pages(
                ck, kc.view(-1, 1024), vc.view(-1, 1024), tables, 8, 1, t, u, r))
    times = {n: [] for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            times[n].append(time_us(f))
    med = {n: statistics.median(x) for n, x in times.items()}
    out[f"{b}x{L}"] = med
    fl = min([t for n, t in med.items() if n.startswith("floor")], default=float("nan"))
    print(f"{tag} {b}x{L}: " + "  ".join(f"{n} {t:.1f}" for n, t in med.items()) + "  | sdpa/x: " +
          " ".join(f"{n} {med['sdpa'] / med[n]:.3f}" for n in VARS), flush=True)
    del q, k, v, kc, vc
    torch.cuda.empty_cache()
os.makedirs(os.environ.get("OUT", "out"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "out"), f"exp27_{tag}.json"), "w"), indent=1)
