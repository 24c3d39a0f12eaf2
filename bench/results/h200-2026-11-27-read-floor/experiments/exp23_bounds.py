"""exp23 (temporary): the decode kernel built with a different __launch_bounds__ (tag), ours vs SDPA vs floor."""
import json, math, os, statistics, sys
import torch
sys.path.insert(0, "bench")
import bench_attention as ba  # noqa: E402
from common import time_us  # noqa: E402
import tinyvllm.ops._kernels as K  # noqa: E402
assert K.extension_loaded()
tag = sys.argv[1]
SHAPES = [(8, 4096), (64, 512), (64, 1024), (64, 4096), (128, 4096), (256, 128), (256, 512), (256, 1024), (256, 4096)]
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
    ck = torch.empty(b, 8, dtype=torch.int32, device="cuda")
    op = torch.ops.tinyvllm.paged_attention_decode
    fns = {"ours": lambda: op(o, q, kc, vc, tables, lens, 1 / math.sqrt(d), -1, b * L),
           "sdpa": lambda: ba.sdpa_gqa(q.unsqueeze(2), k, v),
           "floor": lambda: torch.ops.tinyvllm.read_pages(ck, kc.view(-1, 1024), vc.view(-1, 1024), tables, 8, 1, 256, 4, 0)}
    fns["ours"]()
    ref = ba.sdpa_gqa(q.unsqueeze(2), k, v).squeeze(2)
    err = (o.float() - ref.float()).abs().max().item()
    assert err < 5e-2, err
    times = {n: [] for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            times[n].append(time_us(f))
    med = {n: statistics.median(x) for n, x in times.items()}
    med["plan"] = list(torch.ops.tinyvllm.paged_attention_decode_plan(q, 8, L, -1, b * L))
    out[f"{b}x{L}"] = med
    print(f"{tag} {b}x{L}: ours {med['ours']:.1f} sdpa {med['sdpa']:.1f} floor {med['floor']:.1f} "
          f"x{med['sdpa'] / med['ours']:.3f} plan {med['plan']}", flush=True)
    del q, k, v, kc, vc
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "out"), f"exp23_{tag}.json"), "w"), indent=1)
