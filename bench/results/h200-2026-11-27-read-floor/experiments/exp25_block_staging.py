"""exp22b (temporary): the decode kernel's load structure without its math (skeleton) vs the read floor."""
import json, math, os, statistics, sys
import torch
sys.path.insert(0, "bench")
import bench_attention as ba  # noqa: E402
from common import time_us  # noqa: E402
import tinyvllm.ops._kernels as K  # noqa: E402
assert K.extension_loaded()
SHAPES = [(64, 1024), (64, 4096), (256, 512), (256, 1024), (256, 4096)]
SKELS = [("4,2,1,0", 5), ("4,2,1,3", 5), ("4,2,1,3", 0), ("8,2,1,3", 0), ("8,2,1,3", 3), ("4,3,1,3", 0),
         ("8,3,1,3", 0), ("4,2,2,3", 0), ("8,2,2,3", 0)]
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
    ka, va = kc.view(-1, 1024), vc.view(-1, 1024)
    ck = torch.empty(b, 8, dtype=torch.int32, device="cuda")
    ck2 = torch.empty_like(ck)
    fns = {"ours": lambda: torch.ops.tinyvllm.paged_attention_decode(o, q, kc, vc, tables, lens, 1 / math.sqrt(d), -1, b * L),
           "sdpa": lambda: ba.sdpa_gqa(q.unsqueeze(2), k, v)}
    for t, u in [(256, 4), (256, 8)]:
        fns[f"floor {t}/{u}"] = (lambda t=t, u=u: torch.ops.tinyvllm.read_pages(ck, ka, va, tables, 8, 1, t, u, 0))
    fns["floor 256/4"]()
    for sk, bps in SKELS:
        def f(sk=sk, bps=bps):
            os.environ["TV_EXP_SKEL"] = sk
            try:
                return torch.ops.tinyvllm.read_pages(ck2, ka, va, tables, 8, 1, 128, 2, bps)
            finally:
                del os.environ["TV_EXP_SKEL"]
        fit = f()
        torch.cuda.synchronize()
        assert torch.equal(ck, ck2), sk
        fns[f"skel {sk} r{bps} x{fit}"] = f
    times = {n: [] for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            times[n].append(time_us(f))
    med = {n: statistics.median(x) for n, x in times.items()}
    out[f"{b}x{L}"] = med
    print(f"{b}x{L}: " + "  ".join(f"{n} {t:.1f}" for n, t in med.items()), flush=True)
    del q, k, v, kc, vc, ka, va
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "out"), "exp25.json"), "w"), indent=1)
