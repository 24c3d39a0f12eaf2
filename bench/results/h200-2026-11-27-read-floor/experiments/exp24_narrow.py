"""exp24 (temporary): blocks of 1 or 2 warps (one (sequence, kv head) each), so that more streams run per SM."""
import json, math, os, statistics, sys
import torch
sys.path.insert(0, "bench")
import bench_attention as ba  # noqa: E402
from common import time_us  # noqa: E402
import tinyvllm.ops._kernels as K  # noqa: E402
assert K.extension_loaded()
SHAPES = [(64, 1024), (64, 4096), (128, 1024), (128, 4096), (256, 512), (256, 1024), (256, 4096)]
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
    ref = ba.sdpa_gqa(q.unsqueeze(2), k, v).squeeze(2)
    op = torch.ops.tinyvllm.paged_attention_decode

    def ours(w=None):
        def f():
            os.environ.pop("TV_EXP_WARPS", None)
            if w:
                os.environ["TV_EXP_WARPS"] = str(w)
            op(o, q, kc, vc, tables, lens, 1 / math.sqrt(d), -1, b * L)
            os.environ.pop("TV_EXP_WARPS", None)
        return f

    fns = {"ours": ours(), "W1": ours(1), "W2": ours(2), "W8": ours(8), "sdpa": lambda: ba.sdpa_gqa(q.unsqueeze(2), k, v)}
    for n in ("ours", "W1", "W2", "W8"):
        fns[n]()
        err = (o.float() - ref.float()).abs().max().item()
        assert err < 5e-2, (n, err)
    for t, u, r in [(256, 4, 0), (128, 2, 0)]:
        fns[f"floor {t}/{u}"] = (lambda t=t, u=u, r=r: torch.ops.tinyvllm.read_pages(ck, ka, va, tables, 8, 1, t, u, r))
    fns["floor 256/4"]()
    for sk in ("1,2,1,0", "2,2,1,0", "1,3,1,0", "2,3,1,0", "4,2,1,0"):
        def f(sk=sk):
            os.environ["TV_EXP_SKEL"] = sk
            try:
                return torch.ops.tinyvllm.read_pages(ck2, ka, va, tables, 8, 1, 128, 2, 0)
            finally:
                del os.environ["TV_EXP_SKEL"]
        fit = f()
        torch.cuda.synchronize()
        assert torch.equal(ck, ck2), sk
        fns[f"skel {sk} x{fit}"] = f
    times = {n: [] for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            times[n].append(time_us(f))
    med = {n: statistics.median(x) for n, x in times.items()}
    out[f"{b}x{L}"] = med
    print(f"{b}x{L}: " + "  ".join(f"{n} {t:.1f}" for n, t in med.items()), flush=True)
    del q, k, v, kc, vc, ka, va
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "out"), "exp24.json"), "w"), indent=1)
