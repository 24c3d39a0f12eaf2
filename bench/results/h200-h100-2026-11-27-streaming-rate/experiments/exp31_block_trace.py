"""exp31 (temporary build): where each block's time goes, ours against the read floor.

The build records, per block, %globaltimer at its start (every warp), when its first tile has
landed (every warp; the read kernel: when its first batch of loads has been used), when its
loop ends (every warp), and at its very end (thread 0), plus its %smid."""
import gzip
import json
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, "bench")
import bench_attention as ba  # noqa: E402
import common  # noqa: E402
from common import device_info, time_us  # noqa: E402

import tinyvllm.ops._kernels as K  # noqa: E402

assert K.extension_loaded()
SHAPES = [(64, 1024), (64, 4096), (256, 512), (256, 1024), (256, 4096)]
HK, D, BS = 8, 64, 16
FLOOR = (256, 4, 0)
dec = torch.ops.tinyvllm.paged_attention_decode
read = torch.ops.tinyvllm.read_pages
flush = common._L2Flusher()
SM = torch.cuda.get_device_properties(0).multi_processor_count


def analyse(tr: np.ndarray, per_warp: bool) -> dict:
    tr = tr.astype(np.int64)
    if per_warp:
        S0 = np.stack([tr[:, w * 3 + 0] for w in range(4)], 1)
        S1 = np.stack([tr[:, w * 3 + 1] for w in range(4)], 1)
        S2 = np.stack([tr[:, w * 3 + 2] for w in range(4)], 1)
    else:  # the read kernel: thread 0's start and loop end (no stamp inside its loop: it cost registers)
        S0, S2 = tr[:, [0]], tr[:, [2]]
        S1 = S0
    end, sm = tr[:, 12], tr[:, 13]
    t0 = S0.min()
    start = S0.min(1)
    first = np.median(S1, 1) - start
    stream = S2.max(1) - np.median(S1, 1)
    spread = S2.max(1) - S2.min(1)
    epi = end - S2.max(1)
    life = end - start
    span = end.max() - t0
    gaps = []
    for s in np.unique(sm):
        idx = np.where(sm == s)[0]
        st, en = start[idx], end[idx]
        for j in range(len(idx)):
            prev = en[en <= st[j]]
            if len(prev):
                gaps.append(st[j] - prev.max())
    med = lambda x: float(np.median(x)) / 1e3  # noqa: E731
    return {
        "span_us": float(span) / 1e3,
        "block_start_to_first_tile_us": med(first),
        "first_tile_to_loop_end_us": med(stream),
        "warps_loop_end_spread_us": med(spread),
        "loop_end_to_block_end_us": med(epi),
        "block_life_us": med(life),
        "slot_refill_gap_us": med(gaps) if gaps else None,
        "refills": len(gaps),
        "slot_busy_fraction": float(life.sum()) / (SM * 5 * float(span)),
        "last_start_us": float(start.max() - t0) / 1e3,
        "first_wave_start_spread_us": float(np.sort(start)[:min(len(start), SM * 5)].max() - t0) / 1e3,
        "sm_end_min_med_max_us": [float(np.min(e)) / 1e3, float(np.median(e)) / 1e3, float(np.max(e)) / 1e3]
        if (e := np.array([end[sm == s].max() - t0 for s in np.unique(sm)])).size else None,
    }


res = {"device": device_info()}
raw = {}
for b, L in SHAPES:
    gen = torch.Generator().manual_seed(b * 100003 + L)
    k = torch.randn(b, HK, L, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, HK, L, D, device="cuda", dtype=torch.bfloat16)
    kc, vc, tables = ba.paged_from_contiguous(k, v, BS, gen)
    q = torch.randn(b, 32, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((b,), L, dtype=torch.int32, device="cuda")
    o = torch.empty_like(q)
    nb = L // BS
    pk, pv = kc.view(kc.shape[0] * HK, -1), vc.view(vc.shape[0] * HK, -1)
    tab = tables[:, :nb].contiguous()
    ck = torch.empty(b, HK, dtype=torch.int32, device="cuda")
    ours = lambda: dec(o, q, kc, vc, tables, lens, D ** -0.5, -1, b * L)  # noqa: E731
    floor = lambda: read(ck, pk, pv, tab, HK, 1, *FLOOR)  # noqa: E731
    ours()
    ref = ba.sdpa_gqa(q.unsqueeze(2), k, v).squeeze(2).float()
    assert (o.float() - ref).abs().max().item() < 2e-2
    q4 = q.unsqueeze(2)
    sdpa = lambda: ba.sdpa_gqa(q4, k, v)  # noqa: E731
    buf = torch.zeros(b * HK * 16, dtype=torch.int64, device="cuda")
    times = {"ours": [], "floor": [], "sdpa": [], "ours traced": [], "floor traced": []}
    for _ in range(3):
        times["ours"].append(time_us(ours))
        times["floor"].append(time_us(floor))
        times["sdpa"].append(time_us(sdpa))
        torch.ops.tinyvllm.set_trace(buf.data_ptr(), 0)
        times["ours traced"].append(time_us(ours))
        torch.ops.tinyvllm.set_trace(0, buf.data_ptr())
        times["floor traced"].append(time_us(floor))
        torch.ops.tinyvllm.set_trace(0, 0)
    out = {"times_us": {n: statistics.median(x) for n, x in times.items()}}
    for name, fn, dptr, rptr, pw in (("ours", ours, buf.data_ptr(), 0, True), ("floor", floor, 0, buf.data_ptr(), False)):
        runs = []
        for rep in range(3):
            buf.zero_()
            torch.ops.tinyvllm.set_trace(dptr, rptr)
            flush()
            fn()
            torch.cuda.synchronize()
            torch.ops.tinyvllm.set_trace(0, 0)
            tr = buf.view(-1, 16).cpu().numpy()
            assert (tr[:, 12] > 0).all() and (tr[:, 13] < 1000).all(), name
            runs.append(analyse(tr, pw))
            if rep == 0:
                raw[f"{b}x{L} {name}"] = tr.tolist()
        out[name] = {kk: (statistics.median([r[kk] for r in runs]) if not isinstance(runs[0][kk], list)
                          else runs[1][kk]) for kk in runs[0] if runs[0][kk] is not None}
    res[f"{b}x{L}"] = out
    t = out["times_us"]
    print(f"{b}x{L}: times " + " ".join(f"{n}={x:.1f}" for n, x in t.items()), flush=True)
    for name in ("ours", "floor"):
        r = out[name]
        print(f"   {name:5s} span {r['span_us']:.1f} life {r['block_life_us']:.2f} first {r['block_start_to_first_tile_us']:.2f} "
              f"stream {r['first_tile_to_loop_end_us']:.2f} spread {r['warps_loop_end_spread_us']:.2f} "
              f"end {r['loop_end_to_block_end_us']:.2f} refill {r.get('slot_refill_gap_us', float('nan')) or 0:.2f} "
              f"busy {r['slot_busy_fraction']:.3f} wave1 {r['first_wave_start_spread_us']:.2f} smend {r['sm_end_min_med_max_us']}",
              flush=True)
    del k, v, kc, vc
    torch.cuda.empty_cache()
d = os.environ.get("OUT", ".")
json.dump(res, open(os.path.join(d, sys.argv[1] if len(sys.argv) > 1 else "exp31_trace.json"), "w"), indent=1)
with gzip.open(os.path.join(d, "exp31_raw.json.gz"), "wt") as f:
    json.dump(raw, f)
